"""``ContinuousDEQSolver("vcab3")``: adaptive Adams–Bashforth 3 (`deqlab.solvers.adams`).

Oracles independent of the solver: ``torch.linalg.matrix_exp`` (the exact linear flow), ``torch.linalg.solve``
(the steady state), counting wrappers around ``f``, the dense Jacobian (the implicit gradient), and runs
of the same solver on sub-batches.
"""

import math

import pytest
import torch
from torch import nn

from deqlab_solvers_helpers import ADAPTIVE, Counted, spectral_scale

from deqlab.nn import DeepEquilibriumNetwork, ImplicitBackward
from deqlab.solvers import ContinuousDEQSolver, SolverError, SolverStatus, get_solver
from deqlab.solvers.adams import fixed_step_solve

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16


def vcab3(**kw) -> ContinuousDEQSolver:
    tol = kw.pop("tol", 1e-6)
    kw.setdefault("ode_abstol", tol)
    kw.setdefault("ode_reltol", tol)
    kw.setdefault("mode", "abs_norm")
    kw.setdefault("abstol_termination", tol)
    kw.setdefault("reltol_termination", tol)
    kw.setdefault("max_steps", 2000)
    return ContinuousDEQSolver("vcab3", **kw)


def linear_problem(B=3, D=6, rho=0.9, seed=0, symmetric=False):
    """Per-sample ``f(z) = A z + b`` with spectral norm ``rho``; symmetric A has the eigenvalue ``-rho``,
    i.e. the fastest flow rate ``1 + rho`` (the hardest case for AB3's stability)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, D, D, generator=g, dtype=F64)
    if symmetric:
        A = A + A.transpose(1, 2)
    A = spectral_scale(A, rho)
    b = torch.randn(B, D, generator=g, dtype=F64)
    return A, b


def affine(A, b, kind="lin"):
    def f(z):
        y = torch.bmm(A.to(z.dtype), z.unsqueeze(2)).squeeze(2) + b.to(z.dtype)
        return {"lin": y, "relu": torch.relu(y), "tanh": torch.tanh(y)}[kind]

    return f


def exact_flow(A, b, u0, t):
    """``u(t)`` of ``du/dt = A u + b - u``: ``u* + expm(M t) (u0 - u*)`` with ``M = A - I``, ``u* = (I - A)^-1 b``."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype)
    ustar = torch.linalg.solve(eye - A, b)
    E = torch.linalg.matrix_exp((A - eye) * t)
    return ustar + torch.bmm(E, (u0 - ustar).unsqueeze(2)).squeeze(2)


def true_residual(f, z):
    return torch.linalg.vector_norm((f(z) - z).float() if z.dtype in (BF16, torch.float16) else f(z) - z, dim=1)


# --------------------------------------------------------------------------- the method itself


def test_the_adams_module_examples_run():
    import doctest

    import deqlab.solvers.adams as adams

    assert doctest.testmod(adams).failed == 0


def test_fixed_step_core_is_third_order():
    A, b = linear_problem(B=2, D=5, rho=0.9, seed=1)
    f = affine(A, b)
    u0 = torch.zeros(2, 5, dtype=F64)
    T = 4.0
    exact = exact_flow(A, b, u0, T)
    errors = []
    for n in (20, 40, 80, 160):
        u = fixed_step_solve(lambda v: f(v) - v, u0, T / n, n)
        errors.append(float((u - exact).norm()))
    ratios = [errors[i] / errors[i + 1] for i in range(len(errors) - 1)]
    assert all(6.0 < r < 10.0 for r in ratios), ratios


def test_nonlinear_fixed_step_core_is_third_order():
    A, b = linear_problem(B=2, D=5, rho=0.9, seed=2)
    vf = lambda v: torch.tanh(torch.bmm(A, v.unsqueeze(2)).squeeze(2) + b) - v  # noqa: E731
    u0 = torch.zeros(2, 5, dtype=F64)
    ref = fixed_step_solve(vf, u0, 3.0 / 2560, 2560)  # 3rd order: error ~ 1e-12 here
    errors = [float((fixed_step_solve(vf, u0, 3.0 / n, n) - ref).norm()) for n in (30, 60, 120)]
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(6.0 < r < 10.0 for r in ratios), ratios


def test_linear_flow_to_a_finite_horizon_converges_with_the_ode_tolerance():
    A, b = linear_problem(B=3, D=6, rho=0.9, seed=3)
    f = affine(A, b)
    u0 = torch.zeros(3, 6, dtype=F64)
    t_max = 3.0
    exact = exact_flow(A, b, u0, t_max)
    errors = []
    for tol in (1e-4, 1e-6, 1e-8):
        res = vcab3(tol=tol, abstol_termination=0.0, t_max=t_max)(f, u0)
        assert res.status is SolverStatus.MAX_STEPS  # the horizon, not convergence
        torch.testing.assert_close(res.t, torch.full((3,), t_max, dtype=F64), rtol=0, atol=0)  # hit exactly
        errors.append(float((res.z - exact).abs().max()))
    assert errors[0] > 10 * errors[1] > 100 * errors[2], errors
    assert errors[2] < 1e-7


@pytest.mark.parametrize("per_sample_steps", [True, False])
def test_steady_state_matches_a_dense_solve(per_sample_steps):
    A, b = linear_problem(B=4, D=8, rho=0.9, seed=4)
    f = affine(A, b)
    res = vcab3(tol=1e-8, per_sample_steps=per_sample_steps)(f, torch.zeros(4, 8, dtype=F64))
    assert res.status is SolverStatus.CONVERGED
    zs = torch.linalg.solve(torch.eye(8, dtype=F64) - A, b)
    # ||z - z*|| <= ||f(z) - z|| / (1 - 0.9)
    assert float((res.z - zs).norm(dim=1).max()) <= 1e-8 / 0.1
    torch.testing.assert_close(res.abs_residual, true_residual(f, res.z), rtol=1e-9, atol=0)


@pytest.mark.parametrize("kind", ["lin", "relu", "tanh"])
@pytest.mark.parametrize("rho", [0.5, 0.95])
@pytest.mark.parametrize("symmetric", [False, True])
def test_contractive_maps_at_loose_and_tight_tolerances(kind, rho, symmetric):
    """Spectral radius up to 0.95 (a symmetric A puts an eigenvalue at -0.95: flow rate 1.95, AB3's stability
    edge at h = 0.28): the solve converges, or ends honestly; "converged" holds at the returned z."""
    A, b = linear_problem(B=6, D=12, rho=rho, seed=5, symmetric=symmetric)
    f = affine(A, b, kind)
    # (mode, termination, ODE tolerance): the paper's loose setting (ODE = termination tolerance), and a tight
    # termination with a loose ODE tolerance, where the error control alone would let the step run past AB3's
    # stability interval and only the stability cap keeps the residual falling.
    for mode, tol, ode, max_steps in (("rel_norm", 5e-2, 5e-2, 200), ("abs_norm", 1e-8, 1e-3, 2000)):
        res = vcab3(tol=ode, mode=mode, abstol_termination=tol, reltol_termination=tol, max_steps=max_steps)(
            f, torch.zeros(6, 12, dtype=F64)
        )
        res_true = true_residual(f, res.z)
        fz_norm = torch.linalg.vector_norm(f(res.z), dim=1)
        met = res_true <= (tol if mode == "abs_norm" else tol * fz_norm) * (1 + 1e-9)
        assert (met[res.converged]).all()
        assert res.status is SolverStatus.CONVERGED, (mode, res.status, float(res.abs_residual.max()))
        assert res.steps <= max_steps


def test_stalled_solve_ends_honestly():
    # A termination tolerance far below the ODE tolerance's reach in 40 steps: max_steps, never converged.
    A, b = linear_problem(B=3, D=6, rho=0.95, seed=6, symmetric=True)
    f = affine(A, b)
    res = vcab3(tol=1e-3, abstol_termination=1e-12, max_steps=40)(f, torch.zeros(3, 6, dtype=F64))
    assert res.status is SolverStatus.MAX_STEPS and not res.converged.any()
    assert res.steps == 40
    torch.testing.assert_close(res.abs_residual, true_residual(f, res.z), rtol=1e-9, atol=0)
    with pytest.raises(SolverError, match="max_steps"):
        vcab3(tol=1e-3, abstol_termination=1e-12, max_steps=40, throw=True)(f, torch.zeros(3, 6, dtype=F64))


# --------------------------------------------------------------------------- evaluations and steps


def test_startup_cost_and_one_evaluation_per_accepted_step():
    """Re-run with max_steps = 0, 1, 2, ...: each stepper call's cost is the difference of the counts.
    Start-up: f(u0) and the initial step size (2), then 3 per Bogacki–Shampine call; afterwards an accepted
    step costs exactly 1 evaluation and a rejected one 0."""
    # the field drops sharply as u crosses 1: the controller rejects a few steps there
    g = lambda z: 0.5 * z + 1 - 0.4 * torch.sigmoid(40 * (z - 1))  # noqa: E731
    prev_nfe, prev_acc, rejected_after_startup, accepted_after_startup = None, 0, 0, 0
    for k in range(41):
        f = Counted(g)
        res = vcab3(tol=1e-4, abstol_termination=1e-12, max_steps=k)(f, torch.zeros(1, 3, dtype=F64))
        assert res.nfe == f.calls and res.steps == k
        acc = int(res.accepted_steps[0])
        if k == 0:
            assert res.nfe == 2  # f(u0) and the initial-step-size probe
        else:
            d_nfe, d_acc = res.nfe - prev_nfe, acc - prev_acc
            if prev_acc < 2:
                assert d_nfe == 3  # a start-up call, accepted or rejected
            else:
                assert d_nfe == d_acc  # 1 when accepted, 0 when rejected
                rejected_after_startup += d_acc == 0
                accepted_after_startup += d_acc == 1
        prev_nfe, prev_acc = res.nfe, acc
    assert rejected_after_startup >= 1 and accepted_after_startup >= 20  # both cases were exercised


def test_a_given_dt_skips_the_initial_step_size_evaluation():
    f = Counted(lambda z: 0.5 * z + 1)
    res = vcab3(dt=0.1, max_steps=0)(f, torch.zeros(2, 3, dtype=F64))
    assert res.nfe == f.calls == 1


def test_rejections_in_start_up_are_paid_and_never_hang():
    # dt = 50 on a fast field: the Bogacki–Shampine start-up rejects several times (3 evaluations each)
    W = torch.tensor([[0.3, -0.8, 0.1], [0.7, 0.2, -0.4], [-0.2, 0.5, 0.3]], dtype=F64)
    f = Counted(lambda z: 4.0 * torch.tanh(z @ W.T + 1.0) - 3.0 * z)
    res = vcab3(tol=1e-8, abstol_termination=1e-6, dt=50.0)(f, torch.zeros(1, 3, dtype=F64))
    assert res.status is SolverStatus.CONVERGED and res.nfe == f.calls
    acc = int(res.accepted_steps[0])
    rejected = res.steps - acc
    assert rejected >= 2
    # nfe = f(u0) + 3 per start-up call + 1 per accepted AB3 step (calls with rejections in between are free)
    startup_calls = res.nfe - 1 - (acc - 2)
    assert startup_calls % 3 == 0 and startup_calls // 3 >= 2 + 2


@pytest.mark.parametrize("max_steps", [0, 1, 3, 25])
def test_max_steps_is_never_exceeded(max_steps):
    A, b = linear_problem(B=3, D=6, rho=0.95, seed=7, symmetric=True)
    f = Counted(affine(A, b))
    res = vcab3(tol=1e-10, max_steps=max_steps)(f, torch.zeros(3, 6, dtype=F64))
    assert res.steps <= max_steps and int(res.sample_steps.max()) <= max_steps
    assert int(res.accepted_steps.max()) <= max_steps
    assert res.nfe == f.calls <= 2 + 3 * max_steps
    assert res.status is SolverStatus.MAX_STEPS


# --------------------------------------------------------------------------- guards


def test_runaway_flows_are_diverged():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    for f in (lambda z: 2 * z + x, lambda z: z + 1):
        res = vcab3(tol=1e-3, max_steps=300)(f, torch.zeros(4, 8, dtype=F64))
        assert res.status is SolverStatus.DIVERGED and res.steps < 300, (res.status, res.steps)
        assert not res.converged.any() and torch.isfinite(res.z).all()


@pytest.mark.parametrize("k", [5.0, 20.0, 100.0])
def test_transient_growth_of_a_stable_flow_is_not_divergence(k):
    # f(z) = A z + c with A = [[0, k], [0, 0]] (nilpotent, ||A|| = k): the error decays like t k e^-t, so the
    # residual first grows for about one time unit, over dozens of small steps. (Tsit5/Dopri5, whose growth
    # rule halves the step and counts 20 growths, call k = 20 and 100 diverged; left as it is.)
    A = torch.tensor([[0.0, k], [0.0, 0.0]], dtype=F64)
    c = torch.tensor([[1.0, -1.0]], dtype=F64)
    res = vcab3(tol=1e-3, abstol_termination=1e-6, max_steps=500)(lambda z: z @ A.T + c, torch.zeros(1, 2, dtype=F64))
    assert res.status is SolverStatus.CONVERGED, res.status
    zs = torch.linalg.solve(torch.eye(2, dtype=F64) - A, c[0])
    assert float((res.z[0] - zs).norm()) <= 1e-6 * (1 + k)


@pytest.mark.parametrize("per_sample_steps", [True, False])
def test_non_finite_flow_ends_nonfinite_with_the_last_finite_state(per_sample_steps):
    # sample 0 heads for 2 but f is NaN beyond 1.2; sample 1 is a plain contraction
    def f(z):
        out = 0.5 * z + 1
        bad = (z[:1] > 1.2).any()
        return torch.cat([torch.where(bad, torch.full_like(out[:1], math.nan), out[:1]), out[1:]])

    res = vcab3(tol=1e-6, per_sample_steps=per_sample_steps, max_steps=500)(f, torch.zeros(2, 3, dtype=F64))
    assert res.status is SolverStatus.NONFINITE
    assert torch.isfinite(res.z).all() and bool((res.z[0] <= 1.2).all()) and float(res.z[0].max()) > 1.0
    assert res.converged.tolist() == [False, True]
    torch.testing.assert_close(res.z[1], torch.full((3,), 2.0, dtype=F64), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- batches


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("kind", ["tanh", "lin"])
def test_per_sample_and_batch_wide_steps_agree_exactly_at_batch_size_one(method, kind):
    A, b = linear_problem(B=1, D=7, rho=0.95, seed=8, symmetric=True)
    f = affine(A, b, kind)
    runs = [
        ContinuousDEQSolver(
            method,
            mode="rel_norm",
            ode_abstol=1e-3,
            ode_reltol=1e-3,
            reltol_termination=1e-3,
            max_steps=500,
            per_sample_steps=p,
        )(f, torch.zeros(1, 7, dtype=F64))
        for p in (True, False)
    ]
    a, c = runs
    assert a.status is SolverStatus.CONVERGED
    assert torch.equal(a.z, c.z) and torch.equal(a.t, c.t) and torch.equal(a.abs_residual, c.abs_residual)
    assert (a.nfe, a.steps) == (c.nfe, c.steps)
    assert torch.equal(a.accepted_steps, c.accepted_steps) and torch.equal(a.sample_steps, c.sample_steps)


def test_batch_wide_steps_move_every_sample_together():
    A, b = linear_problem(B=5, D=6, rho=0.9, seed=9)
    f = affine(A, b, "tanh")
    res = vcab3(tol=1e-6, mode="abs_norm", abstol_termination=1e-30, max_steps=40, per_sample_steps=False)(
        f, torch.zeros(5, 6, dtype=F64)
    )
    assert (res.t == res.t[0]).all() and (res.accepted_steps == res.accepted_steps[0]).all()
    per_sample = vcab3(tol=1e-6, mode="abs_norm", abstol_termination=1e-30, max_steps=40)(
        f, torch.zeros(5, 6, dtype=F64)
    )
    assert not (per_sample.t == per_sample.t[0]).all()  # each sample its own steps otherwise


def test_a_sample_does_not_depend_on_the_rest_of_its_batch():
    A, b = linear_problem(B=8, D=6, rho=0.95, seed=10)
    scales = torch.linspace(0.2, 3.0, 8, dtype=F64).unsqueeze(1)  # very different step histories
    f_all = affine(A, b * scales, "tanh")
    kw = dict(tol=1e-5, mode="abs_norm", abstol_termination=1e-6, max_steps=800)
    batch = vcab3(**kw)(f_all, torch.zeros(8, 6, dtype=F64))
    assert batch.status is SolverStatus.CONVERGED
    assert len(set(batch.sample_steps.tolist())) >= 3
    for i in range(8):
        one = vcab3(**kw)(affine(A[i : i + 1], (b * scales)[i : i + 1], "tanh"), torch.zeros(1, 6, dtype=F64))
        torch.testing.assert_close(one.z[0], batch.z[i], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(one.t[0], batch.t[i], rtol=1e-12, atol=0)
        assert int(one.sample_steps[0]) == int(batch.sample_steps[i])
        assert int(one.accepted_steps[0]) == int(batch.accepted_steps[i])


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("k", [2, 5])
def test_check_every_gives_the_k1_result(k):
    A, b = linear_problem(B=6, D=5, rho=0.9, seed=11)
    rates = torch.linspace(0.3, 3.0, 6, dtype=F64).unsqueeze(1)
    f = affine(A, b * rates, "tanh")
    kw = dict(tol=1e-6, abstol_termination=1e-5, max_steps=400)
    ref = vcab3(**kw)(f, torch.zeros(6, 5, dtype=F64))
    res = vcab3(check_every=k, **kw)(f, torch.zeros(6, 5, dtype=F64))
    for name in ("z", "residual", "rel_residual", "converged", "sample_steps", "t", "fz", "accepted_steps"):
        assert torch.equal(getattr(ref, name), getattr(res, name)), name
    assert ref.status is res.status is SolverStatus.CONVERGED
    assert 0 <= res.steps - ref.steps <= k - 1


def test_check_every_with_a_horizon():
    A, b = linear_problem(B=3, D=5, rho=0.9, seed=12)
    f = affine(A, b)
    kw = dict(tol=1e-8, abstol_termination=0.0, t_max=2.5)
    ref = vcab3(**kw)(f, torch.zeros(3, 5, dtype=F64))
    res = vcab3(check_every=4, **kw)(f, torch.zeros(3, 5, dtype=F64))
    assert torch.equal(ref.z, res.z) and torch.equal(ref.t, res.t)
    assert torch.equal(ref.sample_steps, res.sample_steps)
    torch.testing.assert_close(res.t, torch.full((3,), 2.5, dtype=F64), rtol=0, atol=0)


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-8), (F32, 1e-4), (BF16, 5e-2)])
def test_dtypes(dtype, tol):
    A, b = linear_problem(B=4, D=8, rho=0.7, seed=13)
    f = affine(A.to(dtype), b.to(dtype), "tanh")
    ode = {F64: 1e-4, F32: 1e-3, BF16: 1e-2}[dtype]
    res = vcab3(tol=ode, abstol_termination=tol)(f, torch.zeros(4, 8, dtype=dtype))
    assert res.status is SolverStatus.CONVERGED and res.z.dtype == dtype
    assert (true_residual(f, res.z) <= tol).all()
    # the float64 fixed point (tanh of a 0.7-contraction: ||z - z*|| <= residual / 0.3)
    z64 = vcab3(tol=1e-4, abstol_termination=1e-12)(affine(A, b, "tanh"), torch.zeros(4, 8, dtype=F64)).z
    assert float((res.z.double() - z64).norm(dim=1).max()) <= 4 * tol + (0.05 if dtype == BF16 else 0.0)


def test_registry_and_build_solver_names():
    s = get_solver("continuous_vcab3", mode="abs_norm", abstol_termination=1e-6)
    assert isinstance(s, ContinuousDEQSolver) and s.ode_solver == "vcab3"
    with pytest.raises(ValueError, match="per_sample_steps"):
        ContinuousDEQSolver("vcab3", per_sample_steps=1)
    from deqlab.models._build import build_solver

    assert build_solver("vcab3", reltol_termination=5e-2).ode_solver == "vcab3"
    from deqlab.nn import MultiScaleNeuralODE

    with pytest.raises(ValueError, match="steady-state solver"):  # a fixed interval needs torchdyn's methods
        MultiScaleNeuralODE([nn.Identity()], [[None]], None, ContinuousDEQSolver("vcab3"), [(3,)])


# --------------------------------------------------------------------------- a DEQ layer


class _Dense(nn.Module):
    def __init__(self, d=5, dx=3):
        super().__init__()
        self.wz = nn.Linear(d, d)
        self.wx = nn.Linear(dx, d, bias=False)
        with torch.no_grad():
            self.wz.weight.copy_(0.6 * torch.linalg.qr(torch.randn(d, d, dtype=F64))[0])

    def forward(self, z, x):
        return torch.tanh(self.wz(z) + self.wx(x))


def test_deq_layer_gradient_matches_the_dense_oracle():
    torch.manual_seed(0)
    model = _Dense().double()
    # a loose ODE tolerance: the stability cap keeps the residual falling to 1e-11 (Tsit5 stalls there)
    solver = vcab3(tol=1e-4, abstol_termination=1e-11)
    deq = DeepEquilibriumNetwork(model, solver, backward=ImplicitBackward(tol=1e-13, max_steps=100), z_shape=(5,))
    x = torch.randn(3, 3, dtype=F64, requires_grad=True)
    z, sol = deq(x)
    assert float(sol.abs_residual.max()) < 1e-9
    target = torch.randn(3, 5, dtype=F64)
    ((z - target) ** 2).sum().backward()
    # dense oracle: lambda = (I - J)^-T dL/dz*, grads = lambda^T df/d(x, theta)
    dl = 2 * (z.detach() - target)
    lams = []
    for i in range(3):
        J = torch.autograd.functional.jacobian(lambda zz, i=i: model(zz[None], x[i : i + 1].detach())[0], z.detach()[i])
        lams.append(torch.linalg.solve((torch.eye(5, dtype=F64) - J).T, dl[i]))
    xx = x.detach().requires_grad_()
    params = list(model.parameters())
    oracle = torch.autograd.grad(model(z.detach(), xx), [xx, *params], torch.stack(lams))
    got = [x.grad, *[p.grad for p in params]]
    for a, o in zip(got, oracle):
        assert float((a - o).norm() / o.norm()) <= 1e-7


@pytest.mark.parametrize("method", ADAPTIVE)
def test_accepted_steps_count_only_steps_that_moved(method):
    # f is NaN beyond 1.2 on the way to 2: the sample gives up after max_nonfinite_retries; its accepted
    # steps are those that moved it (t advanced by exactly their step sizes), not the give-up.
    f = lambda z: torch.where((z > 1.2).any(dim=1, keepdim=True), torch.full_like(z, math.nan), 0.5 * z + 1)  # noqa: E731
    res = ContinuousDEQSolver(method, mode="abs_norm", abstol_termination=1e-8, max_steps=300)(
        f, torch.zeros(1, 2, dtype=F64)
    )
    assert res.status is SolverStatus.NONFINITE
    acc = int(res.accepted_steps[0])
    assert 0 < acc < res.steps
    assert 0.0 < float(res.z.max()) <= 1.2  # the last finite state
    if method == "vcab3":
        # every call after the start-up evaluated f once: at the accepted points and at the 10 failed ones
        # (the last failure is the give-up, which moves nothing and is not an accepted step)
        assert res.steps == acc + 10
        assert res.nfe == 2 + 2 * 3 + (acc - 2) + 10
