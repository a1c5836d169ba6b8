"""Per-sample bookkeeping: each sample stops on its own, and a stopped sample is never disturbed."""

import math

import pytest
import torch

from deqlab_solvers_helpers import CONTINUOUS, DISCRETE, FIXED_DT, ode_tol

from deqlab.solvers import ContinuousDEQSolver, DiscreteDEQSolver, SolverStatus

# f(z) = (z + c) / 2 per sample: fixed point c, and from z0 the residual of fixed-point iteration is
# ||du_k|| = ||z0 - c|| / 2^(k+1) exactly (powers of two: no rounding).
C = torch.tensor([[1.0, 2.0, 3.0, -4.0], [-1.0, 0.5, 2.0, 8.0], [0.25, -0.75, 6.0, 1.0]], dtype=torch.float64)


def half_map(z):
    return 0.5 * (z - C) + C


def _start():
    # sample 0 exactly at its fixed point, sample 1 far away, sample 2 moderately far
    return torch.stack([C[0], C[1] + 100.0, C[2] - 1.0])


def _picard_steps(dist: float, tol: float) -> int:
    """Steps of plain fixed-point iteration until ||du|| = dist / 2^(k+1) <= tol (hand-computed)."""
    k = 0
    while dist / 2 ** (k + 1) > tol:
        k += 1
    return k


def test_fixed_point_iteration_per_sample_steps_are_exact():
    tol = 1e-8
    z0 = _start()
    res = DiscreteDEQSolver("fixed_point", mode="abs_norm", abstol_termination=tol, max_steps=100)(half_map, z0)
    d = torch.linalg.vector_norm(z0 - C, dim=1).tolist()
    expected = [0, _picard_steps(d[1], tol), _picard_steps(d[2], tol)]
    assert res.sample_steps.tolist() == expected
    assert res.steps == max(expected) and res.nfe == max(expected) + 1
    assert res.converged.tolist() == [True, True, True] and res.status is SolverStatus.CONVERGED
    assert torch.equal(res.z[0], C[0])
    # Sample 2 stopped before the loop ended: it returns the iterate at *its* stopping step, not a later one.
    k2 = expected[2]
    assert k2 < expected[1]
    torch.testing.assert_close(res.z[2], C[2] - 2.0**-k2, rtol=0, atol=0)
    # The trace holds the per-step objective; after a sample stops it repeats its final value.
    assert res.trace.shape == (res.steps + 1, 3)
    torch.testing.assert_close(res.trace[0], torch.tensor(d, dtype=torch.float64) / 2)
    assert (res.trace[:, 0] == 0).all()
    assert (res.trace[k2:, 2] == res.trace[k2, 2]).all()


@pytest.mark.parametrize("name", DISCRETE)
def test_discrete_sample_at_fixed_point_is_untouched(name):
    z0 = _start()
    res = DiscreteDEQSolver(name, mode="abs_norm", abstol_termination=1e-9, max_steps=200)(half_map, z0)
    assert res.status is SolverStatus.CONVERGED
    assert res.converged.all()
    assert torch.equal(res.z[0], C[0])  # bit-for-bit its start
    assert res.sample_steps[0] == 0 and (res.sample_steps[1:] > 0).all()
    assert res.abs_residual[0] == 0
    torch.testing.assert_close(res.z[1:], C[1:], rtol=0, atol=1e-8)
    assert int(res.sample_steps.max()) == res.steps


@pytest.mark.parametrize("method", CONTINUOUS)
def test_continuous_sample_at_fixed_point_is_untouched(method):
    z0 = _start()
    tol = ode_tol(method, 1e-9, 1e-7)
    res = ContinuousDEQSolver(
        method,
        mode="abs_norm",
        ode_abstol=tol,
        ode_reltol=tol,
        abstol_termination=1e-7,
        max_steps=2000,
        dt=FIXED_DT.get(method),
    )(half_map, z0)
    assert res.status is SolverStatus.CONVERGED
    assert torch.equal(res.z[0], C[0])
    assert res.sample_steps[0] == 0 and (res.sample_steps[1:] > 0).all()
    assert res.t[0] == 0 and (res.t[1:] > 0).all()
    torch.testing.assert_close(res.z[1:], C[1:], rtol=0, atol=1e-6)


def test_max_steps_leaves_the_unconverged_sample_flagged():
    # One sample converges at once, the other has no fixed point: status max_steps, masks per sample.
    def f(z):
        return torch.stack([0.5 * z[0], z[1] + 1.0])

    z0 = torch.stack([torch.zeros(3), torch.zeros(3)]).double()
    res = DiscreteDEQSolver("fixed_point", mode="abs_norm", abstol_termination=1e-6, max_steps=9)(f, z0)
    assert res.status is SolverStatus.MAX_STEPS and not res.all_converged
    assert res.converged.tolist() == [True, False]
    assert res.sample_steps.tolist() == [0, 9]
    torch.testing.assert_close(res.z[1], torch.full((3,), 9.0, dtype=torch.float64))
    torch.testing.assert_close(res.abs_residual, torch.tensor([0.0, math.sqrt(3)], dtype=torch.float64))
    stats = res.stats()
    assert stats["converged_fraction"] == 0.5 and stats["nfe"] == 10.0 and stats["steps"] == 9.0


def test_status_priority_nonfinite_over_diverged_over_max_steps():
    # sample 0: NaN after it moves, sample 1: diverges (2z + 1), sample 2: no fixed point (z + 1e-3).
    def f(z):
        return torch.stack([torch.where(z[0] > 0.5, torch.nan, z[0] + 1.0), 2 * z[1] + 1, z[2] + 1e-3])

    z0 = torch.zeros(3, 2, dtype=torch.float64)
    res = DiscreteDEQSolver("fixed_point", mode="abs_norm", abstol_termination=1e-9, max_steps=40)(f, z0)
    assert res.status is SolverStatus.NONFINITE
    assert res.converged.tolist() == [False, False, False]
    assert torch.isfinite(res.z).all()
    assert res.sample_steps[2] == 40

    # Without the NaN sample the worst outcome is divergence.
    def g(z):
        return torch.stack([0.5 * z[0], 2 * z[1] + 1, z[2] + 1e-3])

    res2 = DiscreteDEQSolver("fixed_point", mode="abs_norm", abstol_termination=1e-9, max_steps=40)(g, z0)
    assert res2.status is SolverStatus.DIVERGED
    assert res2.converged.tolist() == [True, False, False]
