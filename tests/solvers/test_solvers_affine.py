"""Affine contraction ``z = A z + b`` against ``torch.linalg.solve``: every algorithm, every stepper."""

import pytest
import torch

from deqlab_solvers_helpers import ADAPTIVE, CONTINUOUS, DISCRETE, FIXED_DT, AffineMap, ode_tol, rel_err

from deqlab.solvers import ContinuousDEQSolver, DiscreteDEQSolver, SolverStatus, get_solver

B, D = 3, 8


@pytest.fixture
def affine():
    g = torch.Generator().manual_seed(1234)
    f = AffineMap(B, D, norm=0.9, generator=g)
    return f, f.solution()


def test_oracle_is_a_fixed_point(affine):
    # Guards the oracle itself: (I - A) z* = b, and the per-sample A are contractions of norm 0.9.
    f, zs = affine
    assert torch.allclose(f(zs), zs, atol=1e-12, rtol=0)
    assert torch.allclose(torch.linalg.matrix_norm(f.A, ord=2), torch.full((B,), 0.9, dtype=torch.float64))


@pytest.mark.parametrize("via", ["class", "registry"])
@pytest.mark.parametrize("name", DISCRETE)
def test_discrete_matches_linear_solve(affine, name, via):
    f, zs = affine
    opts = dict(mode="abs_norm", abstol_termination=1e-11, max_steps=400)
    solver = DiscreteDEQSolver(name, **opts) if via == "class" else get_solver(name, **opts)
    assert isinstance(solver, DiscreteDEQSolver)
    z0 = torch.zeros(B, D, dtype=torch.float64)
    res = solver(f, z0)
    assert res.status is SolverStatus.CONVERGED, res
    assert res.converged.all()
    assert rel_err(res.z, zs).max() <= 1e-8
    # The reported residual is the true one at the returned iterate.
    true_res = torch.linalg.vector_norm(f(res.z) - res.z, dim=1)
    torch.testing.assert_close(res.abs_residual, true_res, rtol=1e-6, atol=1e-15)
    assert (res.abs_residual <= 1e-11).all()


@pytest.mark.parametrize("via", ["class", "registry"])
@pytest.mark.parametrize("method", CONTINUOUS)
def test_continuous_matches_linear_solve(affine, method, via):
    f, zs = affine
    # Adaptive steppers stagnate with a residual near the ODE tolerance, so the ODE tolerance is set
    # well below the termination tolerance (see docs/solvers.md).
    tol = ode_tol(method, 1e-9, 1e-7)
    opts = dict(mode="abs_norm", abstol=tol, reltol=tol, abstol_termination=1e-7, max_steps=3000)
    if method in FIXED_DT:
        opts["dt"] = FIXED_DT[method]
    solver = ContinuousDEQSolver(method, **opts) if via == "class" else get_solver(f"continuous_{method}", **opts)
    assert isinstance(solver, ContinuousDEQSolver) and solver.ode_solver == method
    res = solver(f, torch.zeros(B, D, dtype=torch.float64))
    assert res.status is SolverStatus.CONVERGED, res
    assert rel_err(res.z, zs).max() <= 1e-6
    assert res.t is not None and (res.t > 0).all()


def test_continuous_default_name_is_tsit5(affine):
    solver = get_solver(
        "continuous", mode="abs_norm", abstol=1e-9, reltol=1e-9, abstol_termination=1e-7, max_steps=3000
    )
    assert solver.ode_solver == "tsit5"
    f, zs = affine
    res = solver(f, torch.zeros(B, D, dtype=torch.float64))
    assert res.all_converged and rel_err(res.z, zs).max() <= 1e-6


@pytest.mark.parametrize("method", ADAPTIVE)
def test_continuous_follows_the_flow_until_t_max(method):
    # du/dt = f(u) - u = -(u - c)/2 has u(t) = c + exp(-t/2) (u0 - c): the returned state at t_max is on it.
    c = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]], dtype=torch.float64)
    f = lambda z: 0.5 * (z - c) + c  # noqa: E731
    u0 = torch.zeros_like(c)
    t_max = 2.0
    tol = 1e-9 if method == "vcab3" else 1e-10  # order 3: 1e-10 would take ~2000 steps
    res = ContinuousDEQSolver(
        method, mode="abs_norm", ode_abstol=tol, ode_reltol=tol, abstol_termination=1e-12, t_max=t_max, max_steps=1000
    )(f, u0)
    assert res.status is SolverStatus.MAX_STEPS  # t_max reached before convergence
    torch.testing.assert_close(res.t, torch.full((2,), t_max, dtype=torch.float64))
    exact = c + torch.exp(torch.tensor(-t_max / 2, dtype=torch.float64)) * (u0 - c)
    torch.testing.assert_close(res.z, exact, rtol=0, atol=1e-8)


def test_fixed_step_euler_is_damped_picard():
    # Euler with step h on du/dt = f(u) - u is u <- (1 - h) u + h f(u): the same iterates as damped Picard.
    g = torch.Generator().manual_seed(7)
    f = AffineMap(2, 5, norm=0.8, generator=g)
    z0 = torch.zeros(2, 5, dtype=torch.float64)
    cont = ContinuousDEQSolver("euler", dt=0.5, mode="abs_norm", abstol_termination=1e-30, max_steps=17)(f, z0)
    z = z0.clone()
    for _ in range(17):
        z = 0.5 * z + 0.5 * f(z)
    torch.testing.assert_close(cont.z, z, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(cont.t, torch.full((2,), 17 * 0.5, dtype=torch.float64))
    disc = DiscreteDEQSolver("fixed_point", damping=0.5, mode="abs_norm", abstol_termination=1e-30, max_steps=17)(f, z0)
    torch.testing.assert_close(disc.z, z, rtol=1e-13, atol=1e-13)
