"""``ContinuousDEQSolver(compile=...)``: the compiled Tsit5/Dopri5 stepper call loses nothing against eager.

The compiled call is a second spelling of `_loop_rk` + `_advance` (the guards are shared, the tracker's
update is `device_update` with the step's mask): these tests hold the two together on every path the
stepper has (per-sample and shared steps, batch-wide termination, a finite horizon between host checks,
runaway and non-finite flows, recorded iterates) and check the compile contract. They trace with the
``"eager"`` backend (no code generation: fast); inductor runs with ``DEQLAB_INDUCTOR_TESTS=1``.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

from deqlab.solvers import ContinuousDEQSolver, record_iterates
from deqlab.solvers.compiled import CompileFallbackWarning, compile_available

pytestmark = [
    pytest.mark.skipif(not compile_available(), reason="torch.compile is not available"),
    pytest.mark.usefixtures("fresh_dynamo"),
]

D = 16


def _problem(batch: int, dtype: torch.dtype, scale: float = 0.6):
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(D, D, generator=gen, dtype=dtype) * scale / D**0.5
    x = torch.randn(batch, D, generator=gen, dtype=dtype) * torch.linspace(0.1, 2.0, batch, dtype=dtype)[:, None]
    return (lambda z: torch.tanh(z @ W + x)), torch.zeros(batch, D, dtype=dtype)


def _assert_same(eager, compiled, dtype, t_rtol=None, trace_rtol=1e-3):
    assert compiled.nfe == eager.nfe and compiled.steps == eager.steps
    assert compiled.reference_nfe == eager.reference_nfe
    assert compiled.status == eager.status
    assert torch.equal(compiled.sample_steps, eager.sample_steps)
    assert torch.equal(compiled.converged, eager.converged)
    assert torch.equal(compiled.accepted_steps, eager.accepted_steps)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(compiled.z, eager.z, rtol=tol, atol=tol)
    torch.testing.assert_close(compiled.t, eager.t, rtol=t_rtol or tol, atol=tol)
    torch.testing.assert_close(compiled.trace, eager.trace, rtol=trace_rtol, atol=tol, equal_nan=True)


def _both(f, z0, **kw):
    eager = ContinuousDEQSolver(**kw)(f, z0)
    compiled = ContinuousDEQSolver(compile="eager", **kw)(f, z0)
    return eager, compiled


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ode_solver", ["tsit5", "dopri5"])
def test_compiled_stepper_equals_eager(ode_solver, dtype):
    f, z0 = _problem(6, dtype)
    eager, compiled = _both(
        f, z0, ode_solver=ode_solver, mode="rel_norm", reltol_termination=1e-5, ode_abstol=1e-6, ode_reltol=1e-6,
        max_steps=80, dt=30.0,
    )  # fmt: skip
    assert len(set(eager.sample_steps.tolist())) > 1  # samples stop at different steps
    assert (eager.accepted_steps < eager.sample_steps).all()  # the too large first step was rejected
    _assert_same(eager, compiled, dtype)


@pytest.mark.parametrize(
    "options",
    [
        dict(mode="rel_deq_default", check_every=3),  # the patience rule, host checks every third call
        dict(mode="abs_deq_best", check_every=1),  # the best-iterate bookkeeping
        dict(mode="rel_norm", batch_wide=True, check_every=2),  # one verdict for the batch
        dict(mode="abs_norm", per_sample_steps=False),  # one step size for the batch
        dict(mode="abs_norm", t_max=3.0, check_every=4),  # a horizon reached between two host checks
        dict(mode="abs_norm", t_max=3.0, check_every=1),
    ],
)
def test_compiled_stepper_equals_eager_on_every_path(options):
    f, z0 = _problem(5, torch.float64)
    kw = dict(abstol_termination=1e-9, reltol_termination=1e-9, ode_abstol=1e-5, ode_reltol=1e-5, max_steps=60)
    eager, compiled = _both(f, z0, **{**kw, **options})
    _assert_same(eager, compiled, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "options",
    [
        dict(mode="rel_norm", check_every=2),
        dict(mode="rel_deq_default", check_every=3, per_sample_steps=False),
        dict(mode="abs_norm", batch_wide=True, check_every=2),
        dict(mode="abs_norm", t_max=4.0, check_every=5),
    ],
)
def test_compiled_vcab3_equals_eager_after_its_start_up(options, dtype):
    # the start-up (two Bogacki–Shampine steps, decided on the host) runs eager, the rest compiled; with
    # check_every > 1 the eager loop evaluates f in every call too, so everything is equal
    f, z0 = _problem(6, dtype, scale=0.9)
    kw = dict(ode_solver="vcab3", abstol_termination=1e-6, reltol_termination=1e-6, ode_abstol=1e-4,
              ode_reltol=1e-4, max_steps=300)  # fmt: skip
    eager, compiled = _both(f, z0, **{**kw, **options})
    assert int(eager.accepted_steps.max()) > 5
    _assert_same(eager, compiled, dtype)


def test_compiled_vcab3_with_a_check_every_call_evaluates_where_eager_skips():
    # check_every=1: the eager loop knows on the host when every step of a call was rejected and skips f;
    # the compiled call evaluates f at the unchanged point (same values), so only the count can differ
    f, z0 = _problem(6, torch.float64, scale=0.9)
    kw = dict(ode_solver="vcab3", mode="abs_norm", abstol_termination=1e-8, ode_abstol=1e-3, ode_reltol=1e-3,
              max_steps=400, dt=5.0)  # fmt: skip
    eager, compiled = _both(f, z0, **kw)
    assert compiled.status == eager.status and compiled.steps == eager.steps
    assert torch.equal(compiled.sample_steps, eager.sample_steps)
    torch.testing.assert_close(compiled.z, eager.z, rtol=1e-12, atol=1e-12)
    assert eager.nfe <= compiled.nfe <= eager.nfe + (eager.steps - int(eager.accepted_steps.min()))


def test_runaway_and_non_finite_flows_end_with_the_same_statuses():
    # 2z + x runs away (diverged); the other flow moves at speed 1 into a region where f is NaN
    x = torch.linspace(-1.0, 1.0, 4, dtype=torch.float64)[:, None].expand(4, 3).contiguous()
    for f, status in ((lambda z: 2 * z + x, "diverged"), (lambda z: torch.where(z < 2, z + 1, torch.nan), "nonfinite")):
        eager, compiled = _both(f, torch.zeros(4, 3, dtype=torch.float64), mode="abs_norm", max_steps=400)
        assert eager.status.value == status
        _assert_same(eager, compiled, torch.float64)


def test_recorded_iterates_equal_eager():
    f, z0 = _problem(5, torch.float64)
    kw = dict(mode="rel_norm", reltol_termination=1e-8, max_steps=60, check_every=2)
    out = []
    for compile_ in (False, "eager"):
        with record_iterates([0, 2, 5]):
            out.append(ContinuousDEQSolver("tsit5", compile=compile_, **kw)(f, z0))
    eager, compiled = out
    assert not torch.allclose(eager.iterates[1], eager.z)
    for a, b in zip(eager.iterates, compiled.iterates):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_a_last_batch_of_another_size_does_not_recompile_every_call():
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    solver = ContinuousDEQSolver("tsit5", mode="rel_norm", reltol_termination=1e-3, max_steps=200, compile=counter)
    for batch in (8, 8, 5, 8, 3, 5):
        f, z0 = _problem(batch, torch.float32)
        assert solver(f, z0).status.value == "converged"
    assert counter.frame_count == 2  # a static graph for the first size, a dynamic-batch one for the rest


def test_fixed_step_methods_and_untraceable_maps_run_eager_with_one_warning():
    f, z0 = _problem(4, torch.float64)
    for method in ("euler", "rk4"):
        solver = ContinuousDEQSolver(method, mode="abs_norm", max_steps=300, compile=True)
        with pytest.warns(CompileFallbackWarning, match="tsit5, dopri5 and vcab3 have one"):
            res = solver(f, z0)
        assert res.nfe == ContinuousDEQSolver(method, mode="abs_norm", max_steps=300)(f, z0).nfe
        with warnings.catch_warnings():
            warnings.simplefilter("error", CompileFallbackWarning)
            solver(f, z0)  # once per solver

    def host_map(z):
        if bool(z.abs().max() > 1e6):  # a branch on a value: fullgraph tracing refuses it
            raise RuntimeError("runaway")
        return f(z)

    solver = ContinuousDEQSolver("tsit5", mode="abs_norm", compile="eager")
    with pytest.warns(CompileFallbackWarning, match="could not be compiled"):
        first = solver(host_map, z0)
    _assert_same(ContinuousDEQSolver("tsit5", mode="abs_norm")(host_map, z0), first, torch.float64)
    assert "compile='eager'" in repr(solver)
    with pytest.raises(TypeError, match="compile must be"):
        ContinuousDEQSolver("tsit5", compile=3)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("DEQLAB_INDUCTOR_TESTS"),
    reason="inductor compiles C++ kernels (~1 min on 2 loaded cores); set DEQLAB_INDUCTOR_TESTS=1",
)
def test_inductor_stepper_equals_eager():
    f, z0 = _problem(6, torch.float32)
    kw = dict(mode="rel_norm", reltol_termination=1e-4, max_steps=60)
    eager = ContinuousDEQSolver("tsit5", **kw)(f, z0)
    try:
        compiled = ContinuousDEQSolver("tsit5", compile=True, **kw)(f, z0)
    except Exception as error:  # pragma: no cover - an environment without a C++ toolchain
        pytest.skip(f"inductor unavailable: {error}")
    # inductor fuses and reorders float32 arithmetic: the error estimate (a difference of nearly equal
    # stage sums) then differs in its last digits, the step sizes by ~1e-4 relative, and so the time
    # reached and the residuals along the path (measured: up to 2.6 % on one entry of the trace); the
    # steps, NFE, statuses and returned iterates agree
    _assert_same(eager, compiled, torch.float32, t_rtol=1e-3, trace_rtol=5e-2)
    assert not math.isnan(float(compiled.z.sum()))
