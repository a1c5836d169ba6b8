"""Issue 8: the status a solver reports is true, in every mode, algorithm and precision.

Each test here failed on the code before the fix (the old outcome is noted in the comment).
"""

import math

import pytest
import torch

from deqlab_solvers_helpers import ADAPTIVE, CONTINUOUS, DISCRETE, FIXED_DT

from deqlab.solvers import (
    GMRES,
    TERMINATION_MODES,
    Anderson,
    ContinuousDEQSolver,
    DiscreteDEQSolver,
    SolverError,
    SolverStatus,
    available_solvers,
    get_solver,
    gmres,
)
from deqlab.solvers.algorithms import Broyden, FixedPointIteration, LimitedMemoryBroyden, NewtonKrylov

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
HALF = [BF16, F16]
FAILED = (SolverStatus.DIVERGED, SolverStatus.NONFINITE)


def _true_residual(f, z):
    """``||f(z) - z||`` per sample, recomputed in float64 from the returned iterate."""
    z = z.double()
    return torch.linalg.vector_norm(f(z) - z, dim=1)


# --------------------------------------------------------------------------- growth and overflow


@pytest.mark.parametrize("mode", TERMINATION_MODES)
def test_fixed_point_on_2z_plus_1_float32_diverges_in_every_mode(mode):
    # Old: rel_norm / rel_deq_default / rel_deq_best reported `converged` with residual 1.6e19 (||f(z)||
    # overflowed, so the relative residual became 0) and throw=True did not raise.
    f = lambda z: 2 * z + 1  # noqa: E731
    res = DiscreteDEQSolver("fixed_point", mode=mode, max_steps=200)(f, torch.zeros(2, 3))
    assert res.status in FAILED and not res.converged.any()
    assert torch.isfinite(res.z).all() and torch.isfinite(res.abs_residual).all()
    with pytest.raises(SolverError):
        DiscreteDEQSolver("fixed_point", mode=mode, max_steps=200, throw=True)(f, torch.zeros(2, 3))


def test_default_solver_mode_on_2z_plus_1_float32_reports_diverged():
    res = DiscreteDEQSolver("fixed_point")(lambda z: 2 * z + 1, torch.zeros(2, 3))
    assert res.status is SolverStatus.DIVERGED
    assert res.abs_residual.max() < 1e6  # stopped early by the protective break, not at overflow
    with pytest.raises(SolverError, match="diverged"):
        DiscreteDEQSolver("fixed_point", throw=True)(lambda z: 2 * z + 1, torch.zeros(2, 3))


@pytest.mark.parametrize("algorithm", DISCRETE)
@pytest.mark.parametrize("mode", ["rel_deq_default", "rel_norm", "abs_norm", "rel_deq_best"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_overflowing_map_is_never_converged(algorithm, mode, dtype):
    # f jumps to 1e30 (no fixed point; ||f||^2 overflows float32, so its relative residual was 0/inf).
    # In float64 nothing overflows and f(z) = z + 1e30 just grows: not converged either way.
    f = lambda z: torch.full_like(z, 1e30) + z.abs()  # noqa: E731
    res = DiscreteDEQSolver(algorithm, mode=mode, max_steps=30)(f, torch.zeros(2, 4, dtype=dtype))
    assert res.status in (FAILED if dtype == F32 else (*FAILED, SolverStatus.MAX_STEPS)), res.status
    assert not res.converged.any()
    with pytest.raises(SolverError):
        DiscreteDEQSolver(algorithm, mode=mode, max_steps=30, throw=True)(f, torch.zeros(2, 4, dtype=dtype))


@pytest.mark.parametrize("mode", ["rel_deq_default", "rel_norm", "rel", "rel_deq_best", "abs_norm"])
@pytest.mark.parametrize("algorithm", ["fixed_point", "anderson", "broyden", "lbroyden"])
def test_exponential_growth_without_fixed_point_diverges(algorithm, mode):
    # f(z) = 2|z| + 1 has no fixed point; its iterates grow like 2^k. Relative objectives stay bounded,
    # so only a guard on the absolute residual (or on ||f(z)||) can see it.
    f = lambda z: 2 * z.abs() + 1  # noqa: E731
    res = DiscreteDEQSolver(algorithm, mode=mode, max_steps=400)(f, torch.zeros(2, 3, dtype=F32))
    assert not res.converged.any()
    assert res.status in (*FAILED, SolverStatus.MAX_STEPS)
    if algorithm == "fixed_point":
        assert res.status is SolverStatus.DIVERGED and res.steps < 400


# --------------------------------------------------------------------------- z -> z + 1 (no fixed point)


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("mode", ["abs_norm", "abs", "rel_deq_default", "rel_norm"])
def test_continuous_runaway_flow_is_diverged_with_an_honest_residual(method, dtype, mode):
    # Old (abs_norm): `converged`, residual 0 at z = 9.8e15 -- the step grew until (z + 1) - z == 0.
    # Old (relative modes): `converged` at z ~ 1e3 because ||du|| / ||f(z)|| = 1/z.
    f = lambda z: z + 1  # noqa: E731
    res = ContinuousDEQSolver(method, mode=mode, max_steps=300)(f, torch.zeros(2, 3, dtype=dtype))
    assert res.status is SolverStatus.DIVERGED and res.steps < 300
    assert not res.converged.any()
    # The reported residual is the true f(z) - z at the returned z (sqrt(3)), not lost to cancellation.
    torch.testing.assert_close(res.abs_residual.double(), torch.full((2,), math.sqrt(3), dtype=F64), rtol=1e-6, atol=0)
    torch.testing.assert_close(res.abs_residual.double(), _true_residual(f, res.z), rtol=1e-6, atol=0)
    with pytest.raises(SolverError):
        ContinuousDEQSolver(method, mode=mode, max_steps=300, throw=True)(f, torch.zeros(2, 3, dtype=dtype))


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("dtype", [F64, F32, BF16])
@pytest.mark.parametrize("rate", [2.0, 1.2])
def test_continuous_exponential_runaway_is_diverged_in_every_dtype(method, dtype, rate):
    # f(z) = a z + x with a > 1: the flow du/dt = (a - 1) u + x runs away exponentially. Old (float32 and
    # bfloat16): `max_steps` after the whole budget, while float64 said `diverged`: every growth halves
    # the step, the growth per step soon fell below the dtype's resolution, the norms repeated and the
    # growth count was reset, so the divergence patience was never reached.
    # VCAB3 does not count residual growth (it does not halve its step on growth, see continuous.py): its
    # runaway meets the protective break at 1e3 N times the first residual, t ~ 45 at rate 0.2.
    n = 300 if method == "vcab3" else 100
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0), dtype=F64).to(dtype)
    res = ContinuousDEQSolver(method, max_steps=n)(lambda z: rate * z + x, torch.zeros(4, 8, dtype=dtype))
    assert res.status is SolverStatus.DIVERGED, (res.status, res.steps)
    assert res.steps < n and not res.converged.any()
    with pytest.raises(SolverError, match="diverged"):
        ContinuousDEQSolver(method, max_steps=n, throw=True)(lambda z: rate * z + x, torch.zeros(4, 8, dtype=dtype))


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_continuous_stable_flows_in_low_precision_are_not_called_diverged(method, dtype):
    # The other side of the runaway test: stable flows (a contraction, and -1.5 z + b whose fixed-point
    # iteration diverges but whose flow is stable) with tolerances at or below the bfloat16 noise floor
    # may end max_steps, never `diverged` (a residual jittering at the rounding level is no runaway).
    tol = 1e-4 if dtype == F32 else 3e-2
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(8, 8, generator=g, dtype=F64)
        W = (0.9 * W / torch.linalg.matrix_norm(W, ord=2)).to(dtype)
        b = (3 * torch.randn(4, 8, generator=g, dtype=F64)).to(dtype)
        for f in (lambda z, W=W, b=b: torch.tanh(z @ W.T + b), lambda z, b=b: -1.5 * z + b):
            for mode in ("abs_norm", "rel_deq_default"):
                res = ContinuousDEQSolver(
                    method,
                    mode=mode,
                    abstol_termination=tol,
                    reltol_termination=tol,
                    ode_abstol=tol / 10,
                    ode_reltol=tol / 10,
                    max_steps=300,
                )(f, torch.zeros(4, 8, dtype=dtype))
                assert res.status in (SolverStatus.CONVERGED, SolverStatus.MAX_STEPS), (seed, mode, res.status)


@pytest.mark.parametrize("mode", ["rel_deq_default", "rel_deq_best", "rel_norm", "rel"])
@pytest.mark.parametrize("name", [*DISCRETE, "continuous_euler", "continuous_rk4"])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_relative_modes_do_not_accept_z_plus_1(name, mode, dtype):
    # Old: fixed_point / Broyden / Euler / RK4 "converged" at step 333 through the patience rule (the
    # relative objective 1/z decays slowly, so it looks stalled below 3 tol), the plain relative modes at
    # step 1000, Newton-Krylov after one huge step (z = 9e3 in float32, 2e8 in float64).
    kw = {"dt": FIXED_DT[name.split("_")[1]]} if name.startswith("continuous") else {}
    solver = get_solver(name, mode=mode, max_steps=60 if name == "newton_krylov" else 1100, **kw)
    res = solver(lambda z: z + 1, torch.zeros(2, 3, dtype=dtype))
    assert not res.converged.any(), (res.status, res.steps)
    assert res.status is not SolverStatus.CONVERGED


def test_relative_mode_still_accepts_a_state_that_grew_while_the_residual_fell():
    # The guard must not block honest relative convergence: f(z) = 0.5 z + 100 from 0 grows ||f(z)||
    # 2x while the residual falls from 100 to ~0.
    res = DiscreteDEQSolver("fixed_point", mode="rel_norm", reltol_termination=1e-6, max_steps=100)(
        lambda z: 0.5 * z + 100, torch.zeros(2, 3, dtype=F64)
    )
    assert res.status is SolverStatus.CONVERGED
    torch.testing.assert_close(res.z, torch.full((2, 3), 200.0, dtype=F64), rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- Anderson in float32


@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64])
@pytest.mark.parametrize("mode", ["rel_deq_default", "abs_norm"])
def test_anderson_collinear_residuals_converge(dtype, mode):
    # Old: `nonfinite` in float32 (every residual is a multiple of the ones vector, so the Gram matrix
    # is rank one and the 1e-8 relative regularisation is below float32 precision); lu_cpu
    # NotImplementedError in half precision.
    tol = {F64: 1e-6, F32: 1e-4, BF16: 2e-2, F16: 4e-3}[dtype]
    res = DiscreteDEQSolver("anderson", mode=mode, abstol_termination=tol, max_steps=50)(
        lambda z: 0.5 * z + 1, torch.zeros(2, 3, dtype=dtype)
    )
    assert res.status is SolverStatus.CONVERGED, res.status
    assert res.z.dtype == dtype
    torch.testing.assert_close(res.z.double(), torch.full((2, 3), 2.0, dtype=F64), rtol=0, atol=4 * tol)


# --------------------------------------------------------------------------- half precision


def _tanh_map(dtype, B=3, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g, dtype=F64)
    W = 0.5 * W / torch.linalg.matrix_norm(W, ord=2)
    x = torch.randn(B, D, generator=g, dtype=F64)
    W_d, x_d = W.to(dtype), x.to(dtype)
    return (lambda z: torch.tanh(z @ W_d.T + x_d)), (lambda z: torch.tanh(z @ W.T + x))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", [*DISCRETE, *(f"continuous_{m}" for m in CONTINUOUS)])
def test_every_solver_works_on_half_precision_states(name, dtype):
    # Old: anderson and newton_krylov raised NotImplementedError ("lu_cpu" / "triangular_solve_cpu"
    # not implemented for 'BFloat16'/'Half').
    f, f64 = _tanh_map(dtype)
    kw = {"dt": FIXED_DT[name.split("_")[1]]} if name.split("_")[-1] in FIXED_DT else {}
    tol = 3e-2
    res = get_solver(name, mode="abs_norm", abstol_termination=tol, max_steps=100, **kw)(
        f, torch.zeros(3, 6, dtype=dtype)
    )
    assert res.z.dtype == dtype
    assert res.status is SolverStatus.CONVERGED, res.status
    # The answer is the float64 fixed point up to half-precision rounding of the map.
    ref = DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-12, max_steps=100)(
        f64, torch.zeros(3, 6, dtype=F64)
    ).z
    assert (res.z.double() - ref).abs().max() < 0.1
    assert res.abs_residual.dtype == torch.float32  # norms of half states are float32


@pytest.mark.parametrize("dtype", HALF)
def test_gmres_on_half_precision_right_hand_sides(dtype):
    # Old: NotImplementedError "triangular_solve_cpu" not implemented for 'BFloat16'.
    g = torch.Generator().manual_seed(1)
    M = 2 * torch.eye(5, dtype=F64) + 0.3 * torch.randn(2, 5, 5, generator=g, dtype=F64)
    b = torch.randn(2, 5, generator=g, dtype=F64)
    exact = torch.linalg.solve(M, b)
    seen = []

    def mv(v):
        seen.append(v.dtype)
        return torch.bmm(M.to(dtype), v.unsqueeze(2)).squeeze(2)

    x, info = gmres(mv, b.to(dtype), tol=1e-3)
    assert x.dtype == dtype and set(seen) == {dtype}
    assert ((x.double() - exact).norm(dim=1) / exact.norm(dim=1)).max() < 0.05
    out = GMRES(tol=1e-3, max_steps=10).solve(mv, b.to(dtype))
    assert out.x.dtype == dtype
    assert ((out.x.double() - exact).norm(dim=1) / exact.norm(dim=1)).max() < 0.05


# --------------------------------------------------------------------------- bad options

BAD_OPTIONS = [
    (lambda: ContinuousDEQSolver(safety=0.0), "safety"),
    (lambda: ContinuousDEQSolver(safety=-1.0), "safety"),
    (lambda: ContinuousDEQSolver(safety=float("nan")), "safety"),
    (lambda: ContinuousDEQSolver(max_factor=0.0), "max_factor"),
    (lambda: ContinuousDEQSolver(max_factor=-2.0), "max_factor"),
    (lambda: ContinuousDEQSolver(max_factor=0.5), "max_factor"),
    (lambda: ContinuousDEQSolver(min_factor=0.0), "min_factor"),
    (lambda: ContinuousDEQSolver(min_factor=1.5), "min_factor"),
    (lambda: ContinuousDEQSolver(divergence_patience=0), "divergence_patience"),
    (lambda: ContinuousDEQSolver(max_nonfinite_retries=2.5), "max_nonfinite_retries"),
    (lambda: ContinuousDEQSolver(t_max="1"), "t_max"),
    (lambda: Anderson(regularization=float("nan")), "regularization"),
    (lambda: Anderson(regularization=-1e-3), "regularization"),
    (lambda: Anderson(memory=0), "memory"),
    (lambda: Anderson(memory=2.5), "memory"),
    (lambda: Anderson(mixing=0.0), "mixing"),
    (lambda: DiscreteDEQSolver("anderson", regularization=float("inf")), "regularization"),
    (lambda: FixedPointIteration(damping=float("nan")), "damping"),
    (lambda: FixedPointIteration(damping=1.5), "damping"),
    (lambda: Broyden(memory=0), "memory"),
    (lambda: LimitedMemoryBroyden(max_line_search=-1), "max_line_search"),
    (lambda: NewtonKrylov(krylov_dim=0), "krylov_dim"),
    (lambda: NewtonKrylov(max_restarts=0), "max_restarts"),
    (lambda: NewtonKrylov(eta_max=0.0), "eta_max"),
    (lambda: NewtonKrylov(inner_tol=float("nan")), "inner_tol"),
    (lambda: NewtonKrylov(inner_tol="tight"), "inner_tol"),
    (lambda: GMRES(tol=-1e-3), "tol"),
    (lambda: GMRES(tol=float("nan")), "tol"),
    (lambda: GMRES(atol=-1.0), "atol"),
    (lambda: GMRES(max_steps=0), "max_steps"),
    (lambda: gmres(lambda v: v, torch.ones(1, 2), tol=-1.0), "tol"),
    (lambda: gmres(lambda v: v, torch.ones(1, 2), atol=float("nan")), "atol"),
    (lambda: gmres(lambda v: v, torch.ones(1, 2), restart=0), "restart"),
    (lambda: gmres(lambda v: v, torch.ones(1, 2), max_restarts=1.5), "max_restarts"),
]


@pytest.mark.parametrize("build,option", BAD_OPTIONS, ids=[f"{i}-{o}" for i, (_, o) in enumerate(BAD_OPTIONS)])
def test_bad_options_raise_value_error_naming_the_option(build, option):
    with pytest.raises(ValueError, match=option):
        build()


# --------------------------------------------------------------------------- degenerate calls


@pytest.mark.parametrize("name", available_solvers())
@pytest.mark.parametrize("as_list", [False, True])
def test_empty_batch_returns_an_empty_result(name, as_list):
    # Old: RuntimeError "cannot reshape tensor of 0 elements into shape [0, -1]".
    calls = []

    def f(z):
        calls.append(1)
        return z

    z0 = [torch.zeros(0, 3), torch.zeros(0, 2, 2)] if as_list else torch.zeros(0, 2, 2)
    res = get_solver(name)(f, z0)
    assert res.status is SolverStatus.CONVERGED and res.nfe == 0 and not calls
    assert res.abs_residual.shape == res.converged.shape == res.sample_steps.shape == (0,)
    if as_list:
        assert [t.shape for t in res.z] == [t.shape for t in z0]
    else:
        assert res.z.shape == z0.shape
    assert res.stats()["converged_fraction"] == 1.0


@pytest.mark.parametrize("name", available_solvers())
@pytest.mark.parametrize(
    "bad", [lambda z: (z, 0), lambda z: 0, lambda z: [z], lambda z: {"z": z}], ids=["tuple", "int", "list", "dict"]
)
def test_map_returning_a_non_state_gets_the_clear_error(name, bad):
    with pytest.raises(TypeError, match="the map must return a state shaped like z"):
        get_solver(name)(bad, torch.zeros(2, 3))


@pytest.mark.parametrize("name", ["anderson", "continuous"])
def test_map_returning_a_non_state_for_a_list_state(name):
    with pytest.raises(TypeError, match="the map must return a state shaped like z"):
        get_solver(name)(lambda zs: (zs[0], 0), [torch.zeros(2, 3), torch.zeros(2, 1)])
    with pytest.raises(ValueError, match="the map must return a state shaped like z"):
        get_solver(name)(lambda zs: [zs[0], zs[0]], [torch.zeros(2, 3), torch.zeros(2, 1)])


def test_anderson_memory_larger_than_state_converges_in_float32():
    """Anderson with memory 5 on a 2-D linear contraction: the stored residuals are linearly dependent after
    three steps, so the Gram matrix is singular; the solve must still converge (it went NaN for 10 of 64
    samples with the earlier 1e-8 relative regularization)."""
    W = torch.tensor([[0.2795, 0.4243], [-0.4794, -0.3079]])
    x = torch.rand(64, 2, generator=torch.Generator().manual_seed(0))
    solver = DiscreteDEQSolver("anderson", abstol_termination=1e-4, reltol_termination=1e-4, max_steps=30)
    res = solver(lambda z: z @ W.T + x, torch.zeros(64, 2))
    z_exact = torch.linalg.solve(torch.eye(2) - W, x.T).T
    assert res.status == "converged" and bool(res.converged.all())
    assert float((res.z - z_exact).abs().max()) < 1e-3


# --------------------------------------------------------------------------- patience stops are `stalled`


def test_patience_stop_near_the_tolerance_is_stalled_not_converged():
    # Old: status `converged`, converged [True], with the relative residual at 3.0e-3 for a tolerance of
    # 1e-3 and the iterate 37 % away from z* = 200 (z <- 0.995 z + 1 contracts too slowly for 1e-3).
    f = lambda z: 0.995 * z + 1  # noqa: E731
    solver = DiscreteDEQSolver("fixed_point", mode="rel_deq_default", reltol_termination=1e-3, max_steps=1000)
    res = solver(f, torch.zeros(1, 4, dtype=F64))
    assert res.status is SolverStatus.STALLED and res.steps < 1000  # stopping early is still right
    assert not res.converged.any() and res.stalled.tolist() == [True]
    assert 1e-3 < float(res.rel_residual[0]) <= 3e-3
    assert res.stats()["converged_fraction"] == 0.0 and res.stats()["stalled_fraction"] == 1.0
    with pytest.raises(SolverError, match="stalled within 3x the tolerance"):
        DiscreteDEQSolver("fixed_point", mode="rel_deq_default", reltol_termination=1e-3, max_steps=1000, throw=True)(
            f, torch.zeros(1, 4, dtype=F64)
        )


@pytest.mark.parametrize("name", ["fixed_point", "continuous_euler", "continuous_rk4"])
def test_a_sample_within_tolerance_is_converged_and_a_stalled_one_is_not(name):
    # Two independent samples: z <- 0.5 z + 1 (converges) and z <- 0.995 z + 1 (stalls near tol). Each keeps
    # its own verdict; the status is the worst, `stalled` (the mildest failure).
    a = torch.tensor([[0.5], [0.995]], dtype=F64)
    kw = {"dt": 1.0} if name.startswith("continuous") else {}
    solver = get_solver(name, mode="rel_deq_default", reltol_termination=1e-3, max_steps=1000, **kw)
    res = solver(lambda z: a * z + 1, torch.zeros(2, 3, dtype=F64))
    assert res.converged.tolist() == [True, False] and res.stalled.tolist() == [False, True]
    assert res.status is SolverStatus.STALLED
    assert float(res.rel_residual[0]) <= 1e-3 < float(res.rel_residual[1]) <= 3e-3


def test_status_order_puts_stalled_below_every_other_failure():
    # nonfinite > diverged > max_steps > stalled > converged: one stalled sample next to a sample that
    # fails otherwise reports the other failure.
    stall = lambda z: 0.995 * z[:1] + 1  # noqa: E731
    cases = {
        SolverStatus.MAX_STEPS: lambda z: torch.cat([stall(z), z[1:] + 1]),  # no fixed point, budget
        SolverStatus.DIVERGED: lambda z: torch.cat([stall(z), 2 * z[1:] + 1]),  # runs away
        SolverStatus.NONFINITE: lambda z: torch.cat([stall(z), z[1:] + float("nan")]),  # NaN
    }
    for expected, f in cases.items():
        res = DiscreteDEQSolver("fixed_point", mode="abs_deq_default", abstol_termination=0.05, max_steps=400)(
            f, torch.zeros(2, 1, dtype=F64)
        )
        assert res.stalled.tolist() == [True, False] and not res.converged.any(), expected
        assert res.status is expected, (expected, res.status)


# --------------------------------------------------------------------------- maps that break the contract


@pytest.mark.parametrize("name", available_solvers())
def test_a_map_that_modifies_z_in_place_is_refused_with_the_fix(name):
    # Old: the iterate was corrupted in place and the solve ended max_steps (or "converged" on a wrong z).
    with pytest.raises(ValueError, match=r"modified its input z in place.*out-of-place.*clone"):
        get_solver(name)(lambda z: z.add_(1).mul(0.5), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="modified its input z in place"):
        get_solver(name)(lambda zs: [zs[0].mul_(0.5), zs[1]], [torch.zeros(2, 3), torch.zeros(2, 1)])


@pytest.mark.parametrize("name", available_solvers())
def test_a_map_returning_another_device_is_named(name):
    # Old: torch's internal "Tensor on device cpu is not on the expected device meta!".
    with pytest.raises(ValueError, match="expected device cpu, got meta"):
        get_solver(name)(lambda z: z.to("meta"), torch.zeros(2, 3))
