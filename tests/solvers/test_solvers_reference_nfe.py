"""``SolverResult.reference_nfe``: the NFE the paper's reference code would have reported, beside ours.

The oracles are the reference code's counters as read from its source (``deqlab.solvers.counting``):
DeepEquilibriumNetworks.jl v0.2 reports the solver's ``nf`` + 1 (L-Broyden ``nf = k + 1``; OrdinaryDiffEq's
Tsit5 ``nf = 3 + 6a`` for ``a`` attempted steps), FastDEQ.jl counts every evaluation + the post-solve
residual + the final ``z*`` (``k + 3``; Tsit5 ``6a + 5``), and neither ever stops at its starting guess.
"""

import pytest
import torch

from deqlab_solvers_helpers import Counted

from deqlab.solvers import ContinuousDEQSolver, DiscreteDEQSolver
from deqlab.solvers.counting import reference_nfe

F64 = torch.float64


def _half(z):
    return 0.5 * z + 1.0


@pytest.mark.parametrize("algorithm", ["lbroyden", "fixed_point", "anderson"])
def test_discrete_counts_are_k_plus_2_and_k_plus_3(algorithm):
    f = Counted(_half)
    kw = dict(mode="rel_norm", reltol_termination=1e-6, max_steps=60)
    jl = DiscreteDEQSolver(algorithm, **kw)(f, torch.zeros(3, 4, dtype=F64))
    k = jl.steps
    assert k >= 1 and jl.nfe == f.calls == k + 1
    assert (jl.reference_nfe, jl.reference_counting) == (k + 2, "deqjl")  # nf = k + 1, + the final z*
    fast = DiscreteDEQSolver(algorithm, reference_counting="fastdeq", **kw)(
        Counted(_half), torch.zeros(3, 4, dtype=F64)
    )
    assert (fast.steps, fast.reference_nfe, fast.reference_counting) == (k, k + 3, "fastdeq")


def test_a_solve_that_starts_at_the_fixed_point_counts_one_iteration_as_the_reference_does():
    # the reference never tests its starting guess: FastDEQ's floor is 4 (the paper's Skip rows read 4.001)
    z_star = torch.full((2, 3), 2.0, dtype=F64)
    for counting, expected in (("deqjl", 3), ("fastdeq", 4)):
        res = DiscreteDEQSolver("lbroyden", reference_counting=counting)(_half, z_star)
        assert (res.steps, res.nfe, res.reference_nfe) == (0, 1, expected)


@pytest.mark.parametrize("counting, offset", [("deqjl", 4), ("fastdeq", 5)])
def test_tsit5_is_six_per_attempted_step_plus_the_start_up(counting, offset):
    f = Counted(_half)
    res = ContinuousDEQSolver(
        "tsit5",
        mode="abs_norm",
        abstol_termination=1e-6,
        ode_abstol=1e-8,
        ode_reltol=1e-8,
        max_steps=500,
        reference_counting=counting,
    )(f, torch.zeros(2, 3, dtype=F64))
    a = res.steps  # stepper calls, accepted and rejected
    assert res.nfe == f.calls == 2 + 6 * a  # deqlab: f(u0), one initial-step evaluation, 6 per step
    assert res.reference_nfe == 6 * a + offset
    at_fixed_point = ContinuousDEQSolver("tsit5", reference_counting=counting)(
        _half, torch.full((2, 3), 2.0, dtype=F64)
    )
    assert at_fixed_point.steps == 0 and at_fixed_point.reference_nfe == 6 + offset  # one step at least


def test_a_given_first_step_has_no_initial_step_heuristic_to_count():
    res = ContinuousDEQSolver("tsit5", dt=0.5, mode="abs_norm", abstol_termination=1e-4)(
        _half, torch.zeros(1, 2, dtype=F64)
    )
    # OrdinaryDiffEq with a given dt: its f(u0) and 6 per step, nf = 1 + 6a, reported nf + 1
    assert res.nfe == 1 + 6 * res.steps and res.reference_nfe == 6 * res.steps + 2


def test_an_empty_batch_counts_nothing():
    for solver in (DiscreteDEQSolver(), ContinuousDEQSolver()):
        res = solver(_half, torch.zeros(0, 3))
        assert res.nfe == 0 and res.reference_nfe == 0


def test_the_two_conventions_and_an_unknown_one():
    assert reference_nfe("fastdeq", calls=10) == 12 and reference_nfe("deqjl", calls=10) == 11
    assert reference_nfe("deqjl", calls=10, uncounted=1) == 10  # OrdinaryDiffEq's VCAB3 leaves out f(u0)
    with pytest.raises(ValueError, match="reference_counting must be one of 'deqjl', 'fastdeq'"):
        DiscreteDEQSolver(reference_counting="paper")
    with pytest.raises(ValueError, match="reference_counting"):
        ContinuousDEQSolver(reference_counting="torchdeq")
