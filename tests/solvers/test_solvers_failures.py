"""Failed solves (divergence, NaN, no fixed point, horizons) and bad input, for every solver."""

import math

import pytest
import torch

from deqlab_solvers_helpers import ADAPTIVE, CONTINUOUS, DISCRETE, FIXED_DT, Counted

from deqlab.solvers import (
    ContinuousDEQSolver,
    DiscreteDEQSolver,
    SolverError,
    SolverStatus,
    available_solvers,
    get_solver,
)

F64 = torch.float64


def _all_solvers(**kw):
    """One instance of every discrete algorithm and every continuous method."""
    out = {name: DiscreteDEQSolver(name, **kw) for name in DISCRETE}
    for m in CONTINUOUS:
        out[f"continuous_{m}"] = ContinuousDEQSolver(m, dt=FIXED_DT.get(m), **kw)
    return out


# --------------------------------------------------------------------------- divergence and NaN


def test_divergent_map_is_flagged_diverged():
    # f(z) = 2 z + 1 from 0: z_k = 2^k - 1, ||du_k|| = 2^k sqrt(N); the protective break fires at the
    # first k with 2^k >= 1e3 * N (N = 3: k = 12, z = 4095).
    f = Counted(lambda z: 2 * z + 1)
    res = DiscreteDEQSolver("fixed_point", mode="abs_norm", max_steps=100)(f, torch.zeros(2, 3, dtype=F64))
    assert res.status is SolverStatus.DIVERGED
    assert not res.converged.any()
    assert res.steps == 12 and res.nfe == 13 == f.calls
    assert torch.isfinite(res.z).all()
    torch.testing.assert_close(res.z, torch.full((2, 3), 4095.0, dtype=F64))
    with pytest.raises(SolverError) as err:
        DiscreteDEQSolver("fixed_point", mode="abs_norm", max_steps=100, throw=True)(f, torch.zeros(2, 3, dtype=F64))
    assert err.value.result.status is SolverStatus.DIVERGED
    assert "diverged" in str(err.value)
    torch.testing.assert_close(err.value.result.z, res.z)


@pytest.mark.parametrize("method", ADAPTIVE)
def test_divergent_map_continuous_does_not_converge(method):
    # du/dt = u + 1 blows up: the residual keeps growing although each growth halves the step, so the
    # solver reports divergence (well before max_steps) with a finite state, never convergence.
    res = ContinuousDEQSolver(method, mode="abs_norm", max_steps=200)(lambda z: 2 * z + 1, torch.zeros(2, 3, dtype=F64))
    assert res.status is SolverStatus.DIVERGED
    assert res.steps < 200
    assert not res.converged.any()
    assert torch.isfinite(res.z).all()
    with pytest.raises(SolverError):
        ContinuousDEQSolver(method, mode="abs_norm", max_steps=200, throw=True)(
            lambda z: 2 * z + 1, torch.zeros(2, 3, dtype=F64)
        )


class NaNAfter:
    """``f(z) = z / 2 + 1`` for the first ``k`` calls, NaN afterwards; remembers finite iterates."""

    def __init__(self, k):
        self.k, self.calls = k, 0

    def __call__(self, z):
        self.calls += 1
        out = 0.5 * z + 1.0
        return out if self.calls <= self.k else torch.full_like(out, math.nan)


@pytest.mark.parametrize("mode", ["abs_norm", "rel_deq_default", "abs_deq_best"])
def test_nan_after_k_calls_fixed_point(mode):
    # Iterates 0, 1, 1.5, 1.75, 1.875 (f finite at the first four). f(1.875) is NaN, so the last iterate
    # with a finite residual is 1.75, which also has the lowest residual.
    res = DiscreteDEQSolver("fixed_point", mode=mode, abstol_termination=1e-12, reltol_termination=1e-12)(
        NaNAfter(4), torch.zeros(2, 3, dtype=F64)
    )
    assert res.status is SolverStatus.NONFINITE
    assert not res.converged.any()
    torch.testing.assert_close(res.z, torch.full((2, 3), 1.75, dtype=F64))
    torch.testing.assert_close(res.fz, torch.full((2, 3), 1.875, dtype=F64))
    assert torch.isfinite(res.abs_residual).all()
    assert res.nfe == 5 and res.steps == 4


@pytest.mark.parametrize("name", [*DISCRETE, *(f"continuous_{m}" for m in CONTINUOUS)])
def test_nan_map_every_solver(name):
    # Adaptive steppers see a NaN stage as an infinite error estimate and reject the step (shrinking
    # it); after max_nonfinite_retries such rejections in a row they stop the sample as non-finite.
    # Every other solver stops the sample as non-finite at once.
    # f is fine near the start but returns NaN once any entry exceeds 1.2: the fixed point (2) is beyond.
    def f(z):
        out = 0.5 * z + 1.0
        return torch.where((z > 1.2).any(dim=1, keepdim=True), torch.full_like(out, math.nan), out)

    kw = dict(mode="abs_norm", max_steps=100)
    if name.startswith("continuous"):
        m = name.split("_", 1)[1]
        solver = ContinuousDEQSolver(m, dt=FIXED_DT.get(m), abstol_termination=1e-9, **kw)
        thrower = ContinuousDEQSolver(m, dt=FIXED_DT.get(m), abstol_termination=1e-9, throw=True, **kw)
    else:
        solver = DiscreteDEQSolver(name, abstol_termination=1e-9, **kw)
        thrower = DiscreteDEQSolver(name, abstol_termination=1e-9, throw=True, **kw)
    z0 = torch.zeros(2, 3, dtype=F64)
    res = solver(f, z0)
    expected = SolverStatus.NONFINITE
    assert res.status is expected and res.steps < 100
    assert not res.converged.any()
    assert torch.isfinite(res.z).all() and (res.z <= 1.2).all()
    assert torch.isfinite(res.abs_residual).all()
    with pytest.raises(SolverError) as err:
        thrower(f, z0)
    assert err.value.result.status is expected
    assert isinstance(err.value, RuntimeError)


def test_nan_in_one_sample_does_not_touch_the_others():
    def f(z):
        out = 0.5 * z + 1.0
        out[0] = torch.where(z[0] > 1.0, math.nan, out[0])
        return out

    res = DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-10, max_steps=100)(
        f, torch.zeros(3, 2, dtype=F64)
    )
    assert res.status is SolverStatus.NONFINITE
    assert res.converged.tolist() == [False, True, True]
    torch.testing.assert_close(res.z[1:], torch.full((2, 2), 2.0, dtype=F64), rtol=0, atol=1e-9)
    assert torch.isfinite(res.z[0]).all()


def test_throw_attaches_result_on_max_steps():
    solver = DiscreteDEQSolver("fixed_point", mode="abs_norm", max_steps=3, throw=True)
    with pytest.raises(SolverError) as err:
        solver(lambda z: z + 1, torch.zeros(1, 2, dtype=F64))
    r = err.value.result
    assert r.status is SolverStatus.MAX_STEPS and r.nfe == 4 and r.steps == 3
    assert "max_steps" in str(err.value)
    # A converged solve with throw=True just returns.
    ok = DiscreteDEQSolver("fixed_point", mode="abs_norm", throw=True)(lambda z: 0.5 * z, torch.ones(1, 2, dtype=F64))
    assert ok.all_converged


# --------------------------------------------------------------------------- guards: no hang


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", DISCRETE)
def test_no_fixed_point_ends_at_max_steps(name):
    f = Counted(lambda z: z + 1.0)
    res = DiscreteDEQSolver(name, mode="abs_norm", max_steps=25)(f, torch.zeros(2, 3, dtype=F64))
    assert res.status is SolverStatus.MAX_STEPS
    assert res.steps == 25 and res.nfe == f.calls
    assert not res.converged.any()
    assert res.sample_steps.tolist() == [25, 25]
    torch.testing.assert_close(res.abs_residual, torch.full((2,), math.sqrt(3), dtype=F64))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", CONTINUOUS)
def test_continuous_without_steady_state_ends_at_max_steps(method):
    # A rotation: du/dt = J u keeps |u| (nearly) constant and never settles.
    J = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=F64)
    f = Counted(lambda z: z + z @ J.T)
    res = ContinuousDEQSolver(method, mode="abs_norm", max_steps=150, dt=0.1 if method in FIXED_DT else None)(
        f, torch.tensor([[1.0, 0.0]], dtype=F64)
    )
    assert res.status is SolverStatus.MAX_STEPS
    assert res.steps == 150 and res.nfe == f.calls
    assert not res.converged.any()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", CONTINUOUS)
@pytest.mark.parametrize("t_max", [0.3, 5.0])
def test_continuous_t_max_is_a_hard_horizon(method, t_max):
    # du/dt = J u has u(t) = (cos t, sin t): t_max stops the solve on time, on the exact orbit.
    J = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=F64)
    tol = 1e-8 if method == "vcab3" else 1e-10  # order 3: 1e-10 takes 9000 steps to t = 5 (error 3e-8 at 1e-8)
    res = ContinuousDEQSolver(
        method,
        mode="abs_norm",
        ode_abstol=tol,
        ode_reltol=tol,
        t_max=t_max,
        max_steps=100_000,
        dt=0.1 if method in FIXED_DT else None,
    )(lambda z: z + z @ J.T, torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=F64))
    assert res.status is SolverStatus.MAX_STEPS
    assert (res.t <= t_max).all()
    torch.testing.assert_close(res.t, torch.full((2,), t_max, dtype=F64), rtol=1e-12, atol=0)
    exact = torch.tensor([math.cos(t_max), math.sin(t_max)], dtype=F64).expand(2, 2)
    if method == "euler":  # Euler's own iterates: u_n = (I + h J)^n u0
        n = round(t_max / 0.1)
        exact = (
            torch.linalg.matrix_power(torch.eye(2, dtype=F64) + 0.1 * J, n) @ torch.tensor([1.0, 0.0], dtype=F64)
        ).expand(2, 2)
    atol = {"rk4": 1e-5}.get(method, 1e-7)
    torch.testing.assert_close(res.z, exact, rtol=0, atol=atol)


@pytest.mark.timeout(60)
def test_continuous_t_max_with_a_far_away_steady_state():
    # Converges per sample if its steady state is reached before t_max, else stops at t_max.
    c = torch.tensor([[1.0], [1.0]], dtype=F64)
    f = lambda z: 0.5 * (z - c) + c  # noqa: E731  relaxation time 2
    z0 = torch.tensor([[1.0 + 1e-4], [1.0 + 1e3]], dtype=F64)
    res = ContinuousDEQSolver(
        "tsit5",
        mode="abs_norm",
        ode_abstol=1e-9,
        ode_reltol=1e-9,
        abstol_termination=1e-5,
        t_max=10.0,
        max_steps=10_000,
    )(f, z0)
    assert res.converged.tolist() == [True, False]
    assert res.status is SolverStatus.MAX_STEPS
    assert res.t[0] < 10.0 and res.t[1] == pytest.approx(10.0)
    # at t_max the far sample is on its exact path c + exp(-t/2) (z0 - c)
    assert float(res.z[1, 0]) == pytest.approx(1.0 + 1e3 * math.exp(-5.0), rel=1e-6)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["abs_deq_default", "rel_deq_best", "abs_norm"])
def test_sample_waiting_at_t_max_is_not_declared_converged(mode):
    # Sample 0 relaxes slowly with large steps and reaches t_max early; sample 1 rotates fast and needs
    # hundreds of small steps. While sample 0 waits at t_max its state does not change: those idle
    # iterations must not count as a stalled objective for the patience rule. At t_max sample 0's
    # residual (5e-4 from a closed form) lies between tol and 3 tol, so only that rule could stop it.
    J = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=F64)

    def f(z):
        return torch.stack([z[0] - 0.5 * (z[0] - 1.0), z[1] + 20.0 * (z[1] @ J.T)])

    z0 = torch.tensor([[1.0 + 1e-3 * math.exp(2.5), 1.0], [1.0, 0.0]], dtype=F64)
    tol = 3e-4
    res = ContinuousDEQSolver(
        "tsit5",
        mode=mode,
        ode_abstol=1e-6,
        ode_reltol=1e-6,
        abstol_termination=tol,
        reltol_termination=tol,
        t_max=5.0,
        max_steps=5000,
    )(f, z0)
    torch.testing.assert_close(res.t, torch.full((2,), 5.0, dtype=F64))
    du0 = 0.5 * 1e-3 * math.exp(2.5) * math.exp(-2.5)  # |du(t)| = |du(0)| exp(-t/2)
    assert float(res.abs_residual[0]) == pytest.approx(du0, rel=1e-3)
    assert res.steps > 100
    assert not res.converged.any()
    assert res.status is SolverStatus.MAX_STEPS


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", list(_all_solvers()))
def test_non_finite_initial_guess(name):
    solver = _all_solvers()[name]
    for bad in (math.nan, math.inf):
        z0 = torch.zeros(2, 3, dtype=F64)
        z0[1, 2] = bad
        with pytest.raises(ValueError, match="z0"):
            solver(lambda z: 0.5 * z, z0)
    with pytest.raises(ValueError, match="z0"):
        solver(lambda z: [0.5 * t for t in z], [torch.zeros(2, 2), torch.full((2, 1), math.nan)])


@pytest.mark.parametrize("name", list(_all_solvers()))
def test_f_returning_the_wrong_shape_or_dtype(name):
    solver = _all_solvers()[name]
    z0 = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="shape"):
        solver(lambda z: torch.zeros(2, 4, dtype=F64), z0)
    with pytest.raises(ValueError, match="shape"):
        solver(lambda z: z.reshape(2, 3, 1), z0)
    with pytest.raises(ValueError, match="dtype"):
        solver(lambda z: z.float(), z0)
    with pytest.raises(ValueError, match="shape"):
        solver(lambda z: [z[0], z[1][:, :1]], [torch.zeros(2, 2), torch.zeros(2, 3)])
    with pytest.raises(TypeError, match="list"):
        solver(lambda z: z[0], [torch.zeros(2, 2), torch.zeros(2, 3)])


def test_bad_initial_guess_types():
    solver = DiscreteDEQSolver("fixed_point")
    with pytest.raises(TypeError):
        solver(lambda z: z, "not a tensor")
    with pytest.raises(TypeError):
        solver(lambda z: z, [])
    with pytest.raises(TypeError):
        solver(lambda z: z, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch"):
        solver(lambda z: z, [torch.zeros(2, 3), torch.zeros(3, 3)])
    with pytest.raises(ValueError):
        solver(lambda z: z, torch.tensor(1.0))


@pytest.mark.parametrize("bad", [-1e-3, math.nan, math.inf, -math.inf])
def test_invalid_tolerances(bad):
    for kw in ("abstol_termination", "reltol_termination"):
        with pytest.raises(ValueError):
            DiscreteDEQSolver("anderson", **{kw: bad})
        with pytest.raises(ValueError):
            get_solver("broyden", **{kw: bad})
    for kw in ("abstol", "reltol", "abstol_termination", "reltol_termination"):
        with pytest.raises(ValueError):
            ContinuousDEQSolver("tsit5", **{kw: bad})
        with pytest.raises(ValueError):
            get_solver("continuous", **{kw: bad})


def test_invalid_numbers():
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="max_steps"):
            DiscreteDEQSolver("fixed_point", max_steps=bad)
        with pytest.raises(ValueError, match="max_steps"):
            ContinuousDEQSolver("tsit5", max_steps=bad)
    with pytest.raises(ValueError):
        ContinuousDEQSolver("tsit5", ode_abstol=0.0, ode_reltol=0.0)
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="t_max"):
            ContinuousDEQSolver("tsit5", t_max=bad)
    for bad in (0.0, -0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="dt"):
            ContinuousDEQSolver("euler", dt=bad)
    with pytest.raises(ValueError, match="damping"):
        DiscreteDEQSolver("fixed_point", damping=0.0)
    with pytest.raises(ValueError, match="memory"):
        DiscreteDEQSolver("anderson", memory=0)
    with pytest.raises(ValueError, match="jvp"):
        DiscreteDEQSolver("newton_krylov", jvp="reverse")


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError) as err:
        get_solver("andersen")
    for name in available_solvers():
        assert name in str(err.value)
    assert {
        "fixed_point",
        "anderson",
        "broyden",
        "lbroyden",
        "newton_krylov",
        "continuous",
        "continuous_tsit5",
        "continuous_dopri5",
        "continuous_euler",
        "continuous_rk4",
    } <= set(available_solvers())
    with pytest.raises(ValueError, match="anderson"):
        DiscreteDEQSolver("andersen")
    with pytest.raises(ValueError, match="tsit5"):
        ContinuousDEQSolver("rk45")


@pytest.mark.parametrize("name", ["anderson", "newton_krylov", "continuous", "continuous_euler"])
def test_unknown_keyword_is_a_type_error_listing_options(name):
    with pytest.raises(TypeError) as err:
        get_solver(name, max_iters=10)
    assert "max_iters" in str(err.value)
    assert "max_steps" in str(err.value)  # the valid options are listed
    with pytest.raises(TypeError):
        DiscreteDEQSolver("anderson", max_iters=10)
    with pytest.raises(TypeError):
        ContinuousDEQSolver("tsit5", max_iters=10)


def test_unknown_termination_mode():
    for make in (
        lambda: DiscreteDEQSolver("anderson", mode="relative"),
        lambda: ContinuousDEQSolver("tsit5", mode="relative"),
        lambda: get_solver("lbroyden", mode="relative"),
    ):
        with pytest.raises(ValueError) as err:
            make()
        assert "rel_deq_default" in str(err.value)
    with pytest.raises(ValueError, match="norm"):
        DiscreteDEQSolver("anderson", norm="max")
