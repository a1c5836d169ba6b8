"""ReversibleSolver: the coupled reversible iteration of McCallum et al. (arXiv 2509.12917), honest status."""

import pytest
import torch

from deqlab.solvers import ReversibleSolver, ReversibleState, SolverError, SolverStatus, TerminationCondition


def _affine(z):
    return 0.5 * z + 1.0


def _manual(f, z0, beta, n):
    y = z = z0
    for _ in range(n):
        y = (1 - beta) * y + beta * f(z)
        z = (1 - beta) * z + beta * f(y)
    return y, z


def test_converges_to_the_fixed_point_and_counts_two_evaluations_per_step():
    res = ReversibleSolver(beta=0.8, mode="abs_norm", abstol_termination=1e-10, max_steps=100)(
        _affine, torch.zeros(3, 4, dtype=torch.float64)
    )
    assert res.status is SolverStatus.CONVERGED and bool(res.converged.all())
    assert torch.allclose(res.z, torch.full((3, 4), 2.0, dtype=torch.float64), atol=1e-9)
    assert res.nfe == 1 + 2 * res.steps
    assert bool((res.abs_residual <= 1e-10).all())
    assert isinstance(res.reversible, ReversibleState) and res.reversible.beta == 0.8
    assert res.reversible.steps.tolist() == res.sample_steps.tolist() == [res.steps] * 3


@pytest.mark.parametrize("beta", [0.3, 0.8, 1.4])
def test_the_iterates_are_the_papers_coupled_iteration(beta):
    torch.manual_seed(0)
    A = 0.3 * torch.randn(5, 5, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ A.T + 0.1)  # noqa: E731
    z0 = torch.randn(2, 5, dtype=torch.float64)
    res = ReversibleSolver(beta=beta, mode="abs_norm", abstol_termination=0.0, max_steps=4)(f, z0)
    y, z = _manual(f, z0, beta, 4)
    assert res.steps == 4 and res.status is SolverStatus.MAX_STEPS
    assert torch.allclose(res.z, z, atol=1e-14) and torch.allclose(res.reversible.y, y, atol=1e-14)
    assert torch.equal(res.reversible.z0, z0)
    assert torch.allclose(res.abs_residual, (f(z) - z).norm(dim=1), atol=1e-14)


def test_each_sample_stops_on_its_own_and_is_frozen_at_its_own_step():
    z0 = torch.tensor([[0.0], [1.99]], dtype=torch.float64)
    res = ReversibleSolver(mode="abs_norm", abstol_termination=1e-6, max_steps=100)(_affine, z0)
    steps = res.reversible.steps.tolist()
    assert steps[0] > steps[1] > 0 and res.status is SolverStatus.CONVERGED
    for i, n in enumerate(steps):
        y, z = _manual(_affine, z0[i : i + 1], 0.8, n)
        assert torch.equal(res.z[i : i + 1], z) and torch.equal(res.reversible.y[i : i + 1], y)


def test_batch_wide_runs_every_sample_the_same_number_of_steps():
    z0 = torch.tensor([[0.0], [1.99]], dtype=torch.float64)
    res = ReversibleSolver(mode="abs_norm", abstol_termination=1e-6, batch_wide=True)(_affine, z0)
    assert res.reversible.steps.tolist() == [res.steps, res.steps]


def test_honest_status_on_a_map_without_a_contraction():
    res = ReversibleSolver(mode="abs_norm", abstol_termination=1e-6, max_steps=30)(
        lambda z: 2 * z + 1, torch.zeros(2, 3, dtype=torch.float64)
    )
    assert res.status is not SolverStatus.CONVERGED and not bool(res.converged.any())
    assert torch.isfinite(res.z).all() and torch.isfinite(res.reversible.y).all()
    with pytest.raises(SolverError, match="ReversibleSolver ended with status"):
        ReversibleSolver(mode="abs_norm", max_steps=30, throw=True)(lambda z: 2 * z + 1, torch.zeros(2, 3))
    # z = z + 1 has no fixed point: the residual never falls, the budget ends the solve
    res = ReversibleSolver(mode="abs_norm", abstol_termination=1e-8, max_steps=20)(
        lambda z: z + 1, torch.ones(1, 2, dtype=torch.float64)
    )
    assert res.status is not SolverStatus.CONVERGED and res.converged.tolist() == [False]
    assert float(res.abs_residual[0]) > 1.0


def test_a_nonfinite_step_keeps_the_last_finite_pair():
    def f(z):
        return torch.where(z.abs() > 5, torch.full_like(z, float("nan")), 3 * z + 1)

    res = ReversibleSolver(mode="abs_norm", max_steps=20)(f, torch.zeros(1, 2, dtype=torch.float64))
    assert res.status is SolverStatus.NONFINITE
    assert torch.isfinite(res.z).all() and torch.isfinite(res.reversible.y).all()
    y, z = _manual(f, torch.zeros(1, 2, dtype=torch.float64), 0.8, int(res.reversible.steps[0]))
    assert torch.equal(res.z, z)


def test_options_are_validated():
    for bad in (0.0, 1.0, 2.0, -0.5, float("nan"), True):
        with pytest.raises(ValueError, match="beta"):
            ReversibleSolver(beta=bad)
    with pytest.raises(ValueError, match="best"):
        ReversibleSolver(mode="rel_deq_best")
    with pytest.raises(ValueError, match="either termination"):
        ReversibleSolver(termination=TerminationCondition("abs_norm"), mode="abs_norm")
    with pytest.raises(ValueError, match="max_steps"):
        ReversibleSolver(max_steps=-1)
    s = ReversibleSolver(termination=TerminationCondition("abs_norm", abstol=1e-5))
    assert s.termination.tol == 1e-5 and "beta=0.8" in repr(s)


def test_empty_batch_and_list_states():
    res = ReversibleSolver()(_affine, torch.zeros(0, 3))
    assert res.nfe == 0 and res.reversible.steps.numel() == 0
    f = lambda zs: [0.5 * zs[0] + 1, 0.25 * zs[1] + zs[0].sum(1, keepdim=True)]  # noqa: E731
    res = ReversibleSolver(mode="abs_norm", abstol_termination=1e-9, max_steps=200)(
        f, [torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64)]
    )
    assert res.status is SolverStatus.CONVERGED and isinstance(res.z, list)
    assert torch.allclose(res.z[1], torch.full((2, 1), 8.0, dtype=torch.float64), atol=1e-7)
