"""Per-sample early exit (``DiscreteDEQSolver(per_sample_exit=True)``): the same answer for less work.

Oracles: the per-sample closed-form fixed point of an affine map, and the full-batch solve of the same
solver (iterates, residuals, masks, statuses and step counts must be those of the full batch: exit only
stops evaluating samples whose result is already fixed).
"""

from __future__ import annotations

import pytest
import torch

from deqlab.solvers import (
    DiscreteDEQSolver,
    FixedPointAlgorithm,
    FixedPointIteration,
    PerSampleMap,
    SolverStatus,
    SubBatchMap,
)

ALGORITHMS = ["fixed_point", "anderson", "broyden", "lbroyden", "newton_krylov"]
B, N = 24, 8


def heterogeneous(dtype=torch.float64):
    """``f(z) = r_i tanh(W z) + b_i`` with per-sample contraction ``r_i`` from 0.05 to 0.95: sample 0 stops
    after a few steps, the last after tens, the situation per-sample exit is for."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(N, N, generator=g, dtype=dtype)
    W = W / torch.linalg.matrix_norm(W, 2)
    rate = torch.linspace(0.05, 0.95, B, dtype=dtype).view(B, 1)
    b = torch.randn(B, N, generator=g, dtype=dtype)
    calls = []

    def fn(z, r, b_):
        calls.append(z.shape[0])
        return r * torch.tanh(z @ W.T) + b_

    return PerSampleMap(fn, rate, b), calls


def solve(algorithm, per_sample_exit, dtype=torch.float64, **kw):
    f, calls = heterogeneous(dtype)
    kw = dict(dict(max_steps=200, abstol_termination=1e-9, reltol_termination=1e-9), **kw)
    solver = DiscreteDEQSolver(algorithm, per_sample_exit=per_sample_exit, **kw)
    return solver(f, torch.zeros(B, N, dtype=dtype)), calls


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("mode", ["rel_deq_default", "abs_deq_best", "abs", "rel_norm"])
def test_results_are_those_of_the_full_batch_solve_with_less_work(algorithm, mode):
    full, full_calls = solve(algorithm, False, mode=mode)
    part, part_calls = solve(algorithm, True, mode=mode)
    assert part.status is full.status is SolverStatus.CONVERGED
    torch.testing.assert_close(part.z, full.z, rtol=0, atol=1e-12)
    torch.testing.assert_close(part.abs_residual, full.abs_residual, rtol=0, atol=1e-12)
    assert torch.equal(part.converged, full.converged) and torch.equal(part.sample_steps, full.sample_steps)
    assert part.nfe == full.nfe and part.steps == full.steps  # the batched loop is the same
    assert full.sample_weighted_nfe == full.nfe
    # the work: rows evaluated, and fewer of them once the easy samples stopped
    assert part.sample_weighted_nfe == pytest.approx(sum(part_calls) / B)
    # Newton-Krylov's outer steps are few (quadratic convergence), so less of its work comes after an exit
    assert part.sample_weighted_nfe < (0.95 if algorithm == "newton_krylov" else 0.85) * full.nfe
    assert min(part_calls) < B and max(part_calls) == B and set(full_calls) == {B}


@pytest.mark.parametrize("algorithm", ["anderson", "lbroyden"])
def test_fixed_points_match_the_closed_form_of_an_affine_map(algorithm):
    rate = torch.linspace(0.1, 0.9, 10, dtype=torch.float64).view(10, 1)
    b = torch.arange(10, dtype=torch.float64).view(10, 1).expand(10, 3).contiguous()
    f = PerSampleMap(lambda z, r, b_: r * z + b_, rate, b)
    result = DiscreteDEQSolver(
        algorithm,
        per_sample_exit=True,
        abstol_termination=1e-10,
        reltol_termination=1e-10,
        max_steps=100,
        compact_below=1.0,
    )(f, torch.zeros(10, 3, dtype=torch.float64))
    assert result.all_converged
    torch.testing.assert_close(result.z, b / (1 - rate), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("k", [2, 3])
def test_check_every_compacts_only_at_checks_and_keeps_the_results(k):
    full, _ = solve("lbroyden", False, check_every=k)
    part, calls = solve("lbroyden", True, check_every=k)
    torch.testing.assert_close(part.z, full.z, rtol=0, atol=1e-12)
    assert torch.equal(part.sample_steps, full.sample_steps) and part.nfe == full.nfe
    # the working batch only changes right after a check: runs of equal sizes are multiples of k long
    # (after the first evaluation, the full batch's)
    sizes, runs = calls[1:], []
    for s in sizes:
        if runs and runs[-1][0] == s:
            runs[-1][1] += 1
        else:
            runs.append([s, 1])
    assert len(runs) > 1 and all(n % k == 0 for _, n in runs[:-1])


def test_samples_that_fail_keep_their_status():
    # sample 0 has no fixed point (r > 1 runs away), the others converge: statuses as in the full batch
    rate = torch.tensor([1.5] + [0.5] * 7, dtype=torch.float64).view(8, 1)
    f = PerSampleMap(lambda z, r: r * z + 1.0, rate)
    kw = dict(max_steps=60, abstol_termination=1e-9, reltol_termination=1e-9)
    full = DiscreteDEQSolver("fixed_point", **kw)(f, torch.zeros(8, 2, dtype=torch.float64))
    part = DiscreteDEQSolver("fixed_point", per_sample_exit=True, **kw)(f, torch.zeros(8, 2, dtype=torch.float64))
    assert part.status is full.status and part.status is not SolverStatus.CONVERGED
    assert torch.equal(part.converged, full.converged) and not part.converged[0] and part.converged[1:].all()
    torch.testing.assert_close(part.z, full.z, rtol=0, atol=0)


def test_float32_and_list_states():
    f32, _ = solve("anderson", True, dtype=torch.float32, abstol_termination=1e-5, reltol_termination=1e-5)
    full32, _ = solve("anderson", False, dtype=torch.float32, abstol_termination=1e-5, reltol_termination=1e-5)
    torch.testing.assert_close(f32.z, full32.z, rtol=1e-5, atol=1e-5)
    rate = torch.linspace(0.1, 0.9, 6, dtype=torch.float64).view(6, 1)
    fn = lambda z, r: [r * torch.tanh(z[0]) + 1.0, r.view(-1, 1, 1) * torch.tanh(z[1]) + 2.0]  # noqa: E731 - a list state
    z0 = [torch.zeros(6, 2, dtype=torch.float64), torch.zeros(6, 2, 2, dtype=torch.float64)]
    kw = dict(abstol_termination=1e-10, reltol_termination=1e-10, max_steps=200)
    part = DiscreteDEQSolver("lbroyden", per_sample_exit=True, **kw)(PerSampleMap(fn, rate), z0)
    assert part.all_converged and part.sample_weighted_nfe < part.nfe
    full = DiscreteDEQSolver("lbroyden", **kw)(PerSampleMap(fn, rate), z0)
    for a, b in zip(part.z, full.z):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    fz = fn(part.z, rate)  # and it is a fixed point
    for a, b in zip(fz, part.z):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_a_plain_function_is_refused_with_what_to_do():
    solver = DiscreteDEQSolver("anderson", per_sample_exit=True)
    with pytest.raises(TypeError, match="PerSampleMap"):
        solver(lambda z: 0.5 * z, torch.zeros(2, 2))
    assert isinstance(PerSampleMap(lambda z: z), SubBatchMap)


def test_a_refusing_map_fails_before_any_evaluation():
    evaluated = []

    class Coupled:
        def __call__(self, z):
            evaluated.append(1)
            return 0.5 * z

        def restrict(self, index):
            raise ValueError("couples samples")

    with pytest.raises(ValueError, match="couples samples"):
        DiscreteDEQSolver("anderson", per_sample_exit=True)(Coupled(), torch.zeros(2, 2))
    assert not evaluated


def test_an_algorithm_without_select_is_refused_at_construction():
    class Custom(FixedPointAlgorithm):
        name = "custom"

        def step(self, state, z, fz, g, F):
            return fz, F(fz), state

    with pytest.raises(ValueError, match="select"):
        DiscreteDEQSolver(Custom(), per_sample_exit=True)
    DiscreteDEQSolver(Custom())  # fine without the exit
    assert FixedPointIteration.supports_select


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan")])
def test_compact_below_is_checked(bad):
    with pytest.raises(ValueError, match="compact_below"):
        DiscreteDEQSolver(per_sample_exit=True, compact_below=bad)
