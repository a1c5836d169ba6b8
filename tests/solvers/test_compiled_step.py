"""``DiscreteDEQSolver(compile=...)``: the compiled solver step loses nothing against the eager one.

Why these tests: the compiled step is a second spelling of the algorithm's step (`pure_step`) and of the
tracker's update (`device_update`); these tests hold the two spellings together (same NFE, per-sample
steps, statuses, iterates within rounding) and check the compile contract: few compilations across batch
sizes, and a warned eager fallback when the map cannot be traced. Most tests use the ``"eager"``/
``"aot_eager"`` backends (tracing only, fast); one test runs inductor (with ``DEQLAB_INDUCTOR_TESTS=1``, as tests/nn/test_nn_compile.py).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from deqlab.solvers import DiscreteDEQSolver
from deqlab.solvers.compiled import CompileFallbackWarning, compile_available

pytestmark = [
    pytest.mark.skipif(not compile_available(), reason="torch.compile is not available"),
    pytest.mark.usefixtures("fresh_dynamo"),
]

D = 16


def _problem(batch: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(D, D, generator=gen, dtype=dtype) * 0.6 / D**0.5
    x = torch.randn(batch, D, generator=gen, dtype=dtype) * torch.linspace(0.1, 2.0, batch, dtype=dtype)[:, None]
    return (lambda z: torch.tanh(z @ W + x)), torch.zeros(batch, D, dtype=dtype)


def _assert_same(eager, compiled, dtype):
    assert compiled.nfe == eager.nfe and compiled.steps == eager.steps
    assert compiled.status == eager.status
    assert torch.equal(compiled.sample_steps, eager.sample_steps)
    assert torch.equal(compiled.converged, eager.converged)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(compiled.z, eager.z, rtol=tol, atol=tol)
    torch.testing.assert_close(compiled.trace, eager.trace, rtol=1e-3, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "algorithm,options",
    [("fixed_point", {}), ("anderson", {"memory": 3}), ("broyden", {}), ("lbroyden", {"memory": 4})],
)
def test_compiled_step_equals_eager(algorithm, options, dtype):
    # memory below the step count: Anderson's and lbroyden's ring buffers wrap around in the solve
    f, z0 = _problem(6, dtype)
    kw = dict(mode="rel_norm", reltol_termination=1e-6, max_steps=40, **options)
    eager = DiscreteDEQSolver(algorithm, **kw)(f, z0)
    compiled = DiscreteDEQSolver(algorithm, compile="eager", **kw)(f, z0)
    assert len(set(eager.sample_steps.tolist())) > 1  # samples stop at different steps
    _assert_same(eager, compiled, dtype)


@pytest.mark.parametrize("mode,check_every", [("rel_deq_default", 3), ("abs_deq_best", 1), ("norm", 2)])
def test_compiled_step_equals_eager_in_other_modes(mode, check_every):
    # the patience rule, the best-iterate bookkeeping and a check every k steps, with a budget that stops
    # some samples at max_steps
    f, z0 = _problem(5, torch.float64)
    kw = dict(mode=mode, abstol_termination=1e-9, reltol_termination=1e-9, max_steps=12, check_every=check_every)
    eager = DiscreteDEQSolver("anderson", **kw)(f, z0)
    compiled = DiscreteDEQSolver("anderson", compile="eager", **kw)(f, z0)
    _assert_same(eager, compiled, torch.float64)


def test_a_last_batch_of_another_size_does_not_recompile_every_call():
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    solver = DiscreteDEQSolver("anderson", mode="rel_norm", reltol_termination=1e-5, max_steps=30, compile=counter)
    for batch in (8, 8, 5, 8, 3, 5):  # epochs whose last batch is smaller
        f, z0 = _problem(batch, torch.float32)
        assert solver(f, z0).status.value == "converged"
    # the first size compiles a static graph, the second a dynamic-batch one that serves every later size
    assert counter.frame_count == 2


def test_an_untraceable_map_falls_back_to_eager_with_one_warning():
    f, z0 = _problem(4, torch.float64)

    def host_map(z):  # a Python branch on a tensor's value needs the host: fullgraph tracing refuses it
        if bool(z.abs().max() > 1e6):
            raise RuntimeError("runaway")
        return f(z)

    solver = DiscreteDEQSolver("anderson", mode="rel_norm", reltol_termination=1e-8, compile="eager")
    eager = DiscreteDEQSolver("anderson", mode="rel_norm", reltol_termination=1e-8)(host_map, z0)
    with pytest.warns(CompileFallbackWarning, match="could not be compiled"):
        first = solver(host_map, z0)
    _assert_same(eager, first, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)  # once per solver
        _assert_same(eager, solver(host_map, z0), torch.float64)


def test_an_algorithm_without_a_pure_step_runs_eager_with_a_warning():
    f, z0 = _problem(4, torch.float64)
    solver = DiscreteDEQSolver("broyden", line_search=True, mode="rel_norm", reltol_termination=1e-8, compile=True)
    with pytest.warns(CompileFallbackWarning, match="no pure step"):
        res = solver(f, z0)
    assert res.status.value == "converged"
    assert "compile=True" in repr(solver)


def test_compile_option_is_checked():
    with pytest.raises(TypeError, match="compile must be"):
        DiscreteDEQSolver("anderson", compile=3)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("DEQLAB_INDUCTOR_TESTS"),
    reason="inductor compiles C++ kernels (~1 min on 2 loaded cores); set DEQLAB_INDUCTOR_TESTS=1",
)
def test_inductor_step_equals_eager():
    f, z0 = _problem(6, torch.float32)
    kw = dict(mode="rel_norm", reltol_termination=1e-5, max_steps=40, memory=4)
    eager = DiscreteDEQSolver("anderson", **kw)(f, z0)
    try:
        compiled = DiscreteDEQSolver("anderson", compile=True, **kw)(f, z0)
    except Exception as error:  # pragma: no cover - an environment without a C++ toolchain
        pytest.skip(f"inductor unavailable: {error}")
    _assert_same(eager, compiled, torch.float32)


def test_recorded_iterates_equal_eager():
    # record_iterates (the layers' sample_states) asks the tracker for the iterate of given steps: the
    # compiled loop must record them too, or every sampled state would silently be z*
    from deqlab.solvers import record_iterates

    f, z0 = _problem(5, torch.float64)
    kw = dict(mode="rel_norm", reltol_termination=1e-8, max_steps=30, check_every=2)
    out = []
    for compile_ in (False, "eager"):
        with record_iterates([0, 2, 3, 7]):
            out.append(DiscreteDEQSolver("anderson", compile=compile_, **kw)(f, z0))
    eager, compiled = out
    _assert_same(eager, compiled, torch.float64)
    assert not torch.allclose(eager.iterates[2], eager.z)
    for a, b in zip(eager.iterates, compiled.iterates):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
