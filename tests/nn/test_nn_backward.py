"""Backward modes take solver objects (the LinearSolver contract); the solution record is the one place
that says what the backward cost and whether its solve converged."""

import warnings

import pytest
import torch

from deqlab_nn_helpers import DenseMap, make_solver
from test_nn_gradients import closed_form_grads

from deqlab.nn import (
    DEQ,
    BackwardMode,
    BackwardResult,
    CallableSolver,
    EquilibriumProblem,
    ImplicitBackward,
    JacobianFreeBackward,
    MultiScaleNeuralODE,
    PhantomGradient,
    ZeroGuess,
)
from deqlab.solvers import GMRES, ContinuousDEQSolver, DiscreteDEQSolver, FixedPointLinearSolver, LinearSolver


def _grads(backward, seed=0, tol=1e-13):
    torch.manual_seed(seed)
    model = DenseMap(5, 3).double()
    deq = DEQ(model, make_solver("anderson", tol=tol, max_steps=500), backward=backward, init=ZeroGuess(shape=(5,)))
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    z, sol = deq(x)
    target = torch.randn(4, 5, dtype=torch.float64)
    ((z - target) ** 2).sum().backward()
    gx, gps = closed_form_grads(model, z.detach(), x.detach(), 2 * (z.detach() - target))
    return x.grad, gx, [p.grad for p in model.parameters()], gps, sol


@pytest.mark.parametrize(
    "backward",
    [
        ImplicitBackward(solver=GMRES(tol=1e-13, max_steps=20)),
        ImplicitBackward(
            solver=DiscreteDEQSolver(
                "anderson", mode="rel_norm", abstol_termination=1e-13, reltol_termination=1e-13, max_steps=200
            )
        ),
        ImplicitBackward(
            solver=FixedPointLinearSolver(
                DiscreteDEQSolver("fixed_point", mode="abs_norm", abstol_termination=1e-14, max_steps=500)
            )
        ),
        ImplicitBackward("gmres", tol=1e-13, max_steps=20),
        ImplicitBackward("broyden", tol=1e-13, max_steps=200),
    ],
    ids=["GMRES", "anderson-object", "fixed-point-linear", "gmres-str", "broyden-str"],
)
def test_backward_solver_objects_match_closed_form(backward):
    got_x, want_x, got_p, want_p, sol = _grads(backward)
    torch.testing.assert_close(got_x, want_x, rtol=1e-8, atol=1e-10)
    for a, b in zip(got_p, want_p):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert sol.backward_converged is True and sol.backward_nfe >= 2
    assert sol.backward_residual.shape == (4,) and float(sol.backward_residual.max()) <= 1e-12


def test_string_shorthand_builds_the_documented_objects():
    lin = ImplicitBackward("gmres", tol=1e-4, max_steps=7, restart=3).linear_solver()
    assert isinstance(lin, GMRES) and (lin.tol, lin.max_steps, lin.restart) == (1e-4, 7, 3)
    lin = ImplicitBackward("anderson", tol=1e-5, max_steps=9).linear_solver()
    assert isinstance(lin, FixedPointLinearSolver) and isinstance(lin, LinearSolver)
    assert lin.solver.termination.mode == "rel_norm" and lin.solver.termination.tol == 1e-5
    assert lin.solver.max_steps == 9
    g = GMRES(tol=1e-3, max_steps=4)
    assert ImplicitBackward(solver=g).linear_solver() is g


def test_solver_object_with_budget_keywords_raises():
    with pytest.raises(ValueError, match="tol, max_steps given together with a solver object"):
        ImplicitBackward(solver=GMRES(), tol=1e-3, max_steps=5)
    with pytest.raises(ValueError, match="restart"):
        ImplicitBackward(GMRES(), restart=4)
    with pytest.raises(ValueError, match="restart"):
        ImplicitBackward("anderson", restart=4)
    with pytest.raises(ValueError, match="unknown solver 'nope'"):
        ImplicitBackward("nope")
    with pytest.raises(TypeError, match="LinearSolver"):
        ImplicitBackward(solver=lambda f, z0: None)


def test_default_adjoint_budget_is_gmres_at_forward_tolerance_15_vjps():
    """The paper's protocol, for a hand-built layer as for the zoo: GMRES, tol = forward tol, <= 15 VJPs."""
    mode = ImplicitBackward()
    assert mode.solver == "gmres" and mode.tol is None and mode.max_steps == 15
    lin = mode.linear_solver(forward_tol=2.5e-3)
    assert isinstance(lin, GMRES) and lin.tol == 2.5e-3 and lin.max_steps == 15
    solver = DiscreteDEQSolver(
        "anderson", mode="rel_norm", abstol_termination=1e-3, reltol_termination=1e-3, max_steps=100
    )
    torch.manual_seed(0)
    easy = DEQ(DenseMap(40, 40, scale=0.5), solver)
    z, sol = easy(torch.randn(3, 40))
    z.sum().backward()
    assert 2 <= sol.backward_nfe < 15 + 1
    assert sol.backward_converged is True and float(sol.backward_residual.max()) <= 1e-3
    hard = DEQ(DenseMap(40, 40, scale=0.95), solver)
    z, sol = hard(torch.randn(3, 40))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z.sum().backward()
    assert sol.backward_nfe == 15 + 1  # capped: 15 adjoint VJPs plus the final one
    assert sol.backward_converged is False and float(sol.backward_residual.max()) > 1e-3  # and says so


def test_record_is_filled_by_the_backward_only():
    torch.manual_seed(1)
    deq = DEQ(DenseMap(4), make_solver("anderson", tol=1e-8))
    x = torch.randn(2, 4, requires_grad=True)
    z, sol = deq(x)
    assert (sol.backward_nfe, sol.backward_residual, sol.backward_converged) == (0, None, None)
    z.sum().backward(retain_graph=True)
    first = sol.backward_nfe
    assert first >= 2 and sol.backward_converged is True and sol.backward_residual is not None
    z.sum().backward()
    assert sol.backward_nfe == 2 * first  # every backward through this solve is counted
    for attr in ("last_backward_nfe", "_backward_nfe"):
        assert not hasattr(deq, attr) and not hasattr(sol, attr)
    assert not hasattr(deq.backward, "last_converged")  # no state on the (shared) backward mode


@pytest.mark.parametrize("mode, nfe", [(JacobianFreeBackward(), 1), (PhantomGradient(steps=4), 4)])
def test_modes_without_a_solve_record_cost_and_no_convergence(mode, nfe):
    deq = DEQ(DenseMap(4), make_solver("anderson", tol=1e-8), backward=mode)
    z, sol = deq(torch.randn(2, 4, requires_grad=True))
    z.sum().backward()
    assert sol.backward_nfe == nfe and sol.backward_converged is None


def test_custom_backward_mode_uses_the_public_problem():
    class Scaled(BackwardMode):
        """JFB scaled by 2: written against the public EquilibriumProblem / Linearization only."""

        def gradients(self, problem: EquilibriumProblem, v):
            lin = problem.linearize()
            return BackwardResult(grads=lin.vjp_inputs(2 * v), nfe=lin.nvjp, converged=True)

    torch.manual_seed(2)
    model = DenseMap(4).double()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    z, sol = DEQ(model, make_solver("anderson", tol=1e-12), backward=Scaled())(x)
    z.sum().backward()
    xx = x.detach().requires_grad_()
    (want,) = torch.autograd.grad(model(z.detach(), xx), xx, 2 * torch.ones_like(z))
    torch.testing.assert_close(x.grad, want)
    assert sol.backward_nfe == 1 and sol.backward_converged is True


def test_plain_callable_solver_is_wrapped():
    inner = make_solver("anderson", tol=1e-8)
    deq = DEQ(DenseMap(4), lambda f, z0: inner(f, z0))
    assert isinstance(deq.solver, CallableSolver) and deq.solver.termination.norm == "l2"
    z, sol = deq(torch.randn(2, 4, requires_grad=True))
    z.sum().backward()
    assert sol.status == "converged" and sol.backward_converged is True
    with pytest.raises(TypeError, match="solver must be"):
        DEQ(DenseMap(4), 3)


def test_fixed_depth_residual_uses_the_solvers_norm():
    torch.manual_seed(3)
    solver = DiscreteDEQSolver("anderson", norm="rms", max_steps=5)
    deq = DEQ(DenseMap(9), solver)
    x = torch.randn(2, 9)
    with deq.fixed_depth_mode(2):
        z, sol = deq(x)
    with torch.no_grad():
        want = (deq.model(z, x) - z).norm(dim=1) / 3.0
    torch.testing.assert_close(sol.abs_residual, want)


def _node(sensitivity, **kw):
    from test_nn_multiscale import SCALES, pieces

    torch.manual_seed(4)
    main, mapping, post = pieces()
    return MultiScaleNeuralODE(main, mapping, post, "tsit5", SCALES, sensitivity=sensitivity, **kw).double()


def test_neural_ode_fills_the_record_when_the_backward_runs():
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    node = _node("autograd", ode_abstol=1e-4, ode_reltol=1e-4)
    u, sol = node(x)
    assert sol.backward_converged is None and sol.backward_nfe == 0
    sum(t.sum() for t in u).backward()
    # backprop of the recorded steps: one VJP per forward evaluation the gradient flows through
    assert 0 < sol.backward_nfe <= sol.nfe and sol.backward_converged is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adj = _node("adjoint", ode_abstol=1e-4, ode_reltol=1e-4)
        u, sol = adj(x)
        forward_nfe = sol.nfe
        sum(t.sum() for t in u).backward()
    assert sol.nfe == forward_nfe and sol.backward_nfe > 0 and sol.backward_converged is True


def test_neural_ode_tolerance_names():
    node = _node("autograd", ode_abstol=1e-5, ode_reltol=1e-6)
    assert (node.ode_abstol, node.ode_reltol) == (1e-5, 1e-6)
    old = _node("autograd", abstol=1e-5, reltol=1e-6)  # old names keep working
    assert (old.ode_abstol, old.ode_reltol, old.abstol) == (1e-5, 1e-6, 1e-5)
    with pytest.raises(ValueError, match="abstol= is the old name of ode_abstol="):
        _node("autograd", ode_abstol=1e-5, abstol=1e-5)
    from test_nn_multiscale import SCALES, pieces

    solver = ContinuousDEQSolver("dopri5", ode_abstol=1e-7, ode_reltol=1e-8)
    node = MultiScaleNeuralODE(*pieces(), solver, SCALES)
    assert (node.method, node.ode_abstol, node.ode_reltol) == ("dopri5", 1e-7, 1e-8)
    with pytest.raises(TypeError, match="ContinuousDEQSolver"):
        MultiScaleNeuralODE(*pieces(), DiscreteDEQSolver("anderson"), SCALES)


def test_reported_budget_is_the_one_that_governs():
    mode = ImplicitBackward(solver=GMRES(tol=1e-9, max_steps=12, restart=4))
    assert (mode.tol, mode.max_steps, mode.restart) == (1e-9, 12, 4)
    assert "max_steps=12" in repr(mode) and "max_steps=15" not in repr(mode)
    anderson = DiscreteDEQSolver(
        "anderson", mode="rel_norm", abstol_termination=1e-6, reltol_termination=1e-6, max_steps=30
    )
    mode = ImplicitBackward(solver=anderson)
    assert mode.max_steps == mode.linear_solver().max_steps == 32
    # the shorthand's max_steps caps the VJPs of a fixed-point adjoint too (plus the final VJP)
    torch.manual_seed(0)
    hard = DEQ(
        DenseMap(40, 40, scale=0.95),
        make_solver("anderson", tol=1e-3, max_steps=100),
        backward=ImplicitBackward("fixed_point", tol=1e-12, max_steps=9),
        on_unconverged="ignore",
    )
    z, sol = hard(torch.randn(3, 40))
    z.sum().backward()
    assert sol.backward_nfe == 9 + 1 and sol.backward_converged is False


def test_per_sample_exit_adjoint_is_refused_at_construction():
    with pytest.raises(ValueError, match="per-sample exit is not supported"):
        ImplicitBackward(solver=DiscreteDEQSolver("anderson", per_sample_exit=True))


class _Richardson:
    """A user-written LinearSolver (no deqlab base class): Richardson iteration x <- x + (b - A x)."""

    def __init__(self, tol: float = 1e-13, max_steps: int = 400):
        self.tol, self.max_steps = tol, max_steps

    def solve(self, matvec, b, *, x0=None):
        from deqlab.solvers import LinearSolveResult

        x, n = (torch.zeros_like(b) if x0 is None else x0), 0
        r = b - matvec(x)
        n += 1
        while n < self.max_steps and float((r.norm(dim=1) / b.norm(dim=1)).max()) > self.tol:
            x = x + r
            r = b - matvec(x)
            n += 1
        rel = r.norm(dim=1) / b.norm(dim=1)
        return LinearSolveResult(x=x, matvecs=n, iterations=n, residual=rel, converged=rel <= self.tol)


def test_user_written_linear_solver_matches_the_dense_oracle():
    """Gradients through a researcher's own LinearSolver equal dL/dx, dL/dθ from explicit Jacobians:
    g = (I - J)^-T dL/dz* per sample by torch.linalg.solve, then g^T ∂f/∂x and g^T ∂f/∂θ."""
    assert isinstance(_Richardson(), LinearSolver)
    torch.manual_seed(5)
    model = DenseMap(5, 3).double()
    deq = DEQ(
        model,
        make_solver("anderson", tol=1e-13, max_steps=500),
        backward=ImplicitBackward(_Richardson()),
        init=ZeroGuess(shape=(5,)),
    )
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    z, sol = deq(x)
    c = torch.randn(4, 5, dtype=torch.float64)
    (c * z).sum().backward()
    assert sol.backward_converged is True and sol.backward_nfe > 2
    zs, xs = z.detach(), x.detach()
    gx_want = torch.zeros_like(xs)
    gp_want = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(4):
        J = torch.autograd.functional.jacobian(lambda zi, i=i: model(zi[None], xs[i : i + 1])[0], zs[i])
        g = torch.linalg.solve((torch.eye(5, dtype=torch.float64) - J).T, c[i])
        zi, xi = zs[i : i + 1], xs[i : i + 1].clone().requires_grad_()
        out = model(zi, xi)
        grads = torch.autograd.grad(out, [xi, *model.parameters()], g[None])
        gx_want[i] = grads[0][0]
        for acc, gp in zip(gp_want, grads[1:]):
            acc += gp
    torch.testing.assert_close(x.grad, gx_want, rtol=1e-9, atol=1e-11)
    for p, want in zip(model.parameters(), gp_want):
        torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-11)
