"""Blocks of compiled steps, the split step around an eager map, and CUDA graphs of a block.

Why these tests: ``check_every = k`` with ``compile`` runs ``k`` steps as one graph (count-free: Broyden
multiplies by every zero-filled pair), ``compile_map=False`` compiles the algebra around an eager ``f``
(the adjoint's VJPs), and ``cuda_graphs`` replays a captured block. Each is a different spelling of the
same iteration, so each is held to the eager solve: NFE, per-sample steps, statuses, iterates within
rounding -- and the linear solves to a dense oracle. The backends are ``"eager"``/``"aot_eager"``
(tracing, in-place writes functionalised); the CUDA tests run where a GPU is present.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from deqlab.solvers import Anderson, Broyden, DiscreteDEQSolver, FixedPointLinearSolver, LimitedMemoryBroyden
from deqlab.solvers.compiled import CompileFallbackWarning, compile_available

pytestmark = [
    pytest.mark.skipif(not compile_available(), reason="torch.compile is not available"),
    pytest.mark.usefixtures("fresh_dynamo"),
]

D = 12
ALGORITHMS = [("fixed_point", {}), ("anderson", {"memory": 3}), ("broyden", {}), ("lbroyden", {"memory": 4})]


def _problem(batch: int, dtype: torch.dtype, device: str = "cpu"):
    gen = torch.Generator().manual_seed(3)
    W = (torch.randn(D, D, generator=gen, dtype=dtype) * 0.6 / D**0.5).to(device)
    scale = torch.linspace(0.1, 2.0, batch, dtype=dtype)[:, None]
    x = (torch.randn(batch, D, generator=gen, dtype=dtype) * scale).to(device)
    return (lambda z: torch.tanh(z @ W + x)), torch.zeros(batch, D, dtype=dtype, device=device)


def _assert_same(eager, other, dtype):
    assert (other.nfe, other.steps, other.status) == (eager.nfe, eager.steps, eager.status)
    assert torch.equal(other.sample_steps, eager.sample_steps)
    assert torch.equal(other.converged, eager.converged)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(other.z, eager.z, rtol=tol, atol=tol)
    torch.testing.assert_close(other.trace, eager.trace, rtol=1e-3, atol=tol)


class CallCounter:
    """A ``torch.compile`` backend that runs the traced graph eagerly and counts compilations and calls."""

    def __init__(self):
        self.frames = 0
        self.calls = 0

    def __call__(self, gm, example_inputs):
        self.frames += 1

        def run(*args):
            self.calls += 1
            return gm.forward(*args)

        return run


def failing_on_the_second_graph(failed: list):
    """A ``torch.compile`` backend that runs its first graph eagerly and fails to compile the second,
    appending to ``failed`` when it does (a solve then falls back half-way through its compiled loop)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        if len(graphs) == 2:
            failed.append(True)
            raise RuntimeError("no compiler for this one")
        return gm.forward

    return backend


def _warns_once_then_equals(solver, f, z0, eager, dtype, match):
    """The first solve warns (``match``) and equals ``eager``; the next one equals it without a warning."""
    with pytest.warns(CompileFallbackWarning, match=match):
        first = solver(f, z0)
    _assert_same(eager, first, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)  # once per solver
        _assert_same(eager, solver(f, z0), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("algorithm,options", ALGORITHMS)
def test_a_block_of_k_compiled_steps_equals_the_eager_solve(algorithm, options, dtype):
    # 4 steps a call; max_steps = 14 leaves a tail of single steps for the samples that run to the cap,
    # and the memories (3, 4) wrap around inside blocks
    f, z0 = _problem(6, dtype)
    kw = dict(mode="rel_norm", reltol_termination=1e-7, max_steps=14, check_every=4, **options)
    eager = DiscreteDEQSolver(algorithm, **kw)(f, z0)
    counter = CallCounter()
    blocked = DiscreteDEQSolver(algorithm, compile=counter, **kw)(f, z0)
    assert len(set(eager.sample_steps.tolist())) > 1
    _assert_same(eager, blocked, dtype)
    blocks, tail = divmod(blocked.steps, 4)
    assert counter.calls == blocks + tail  # one call per block of 4 steps, not one per step


@pytest.mark.parametrize("algorithm", [Broyden(), LimitedMemoryBroyden(memory=3), Anderson(memory=3)])
def test_the_count_free_step_equals_the_count_shaped_one(algorithm):
    # count=None (a CUDA graph replayed for every block) multiplies by every zero-filled pair and takes the
    # wrap-around on the device; it must propose the iterates of the count-shaped step, memory wrapping
    f, z0 = _problem(5, torch.float64)
    g = f(z0) - z0
    runs = []
    for counted in (True, False):
        state = algorithm.pure_init(z0, f(z0), 12)
        z, fz, gz, zs = z0, f(z0), g, []
        for count in range(12):
            z_new = algorithm.pure_propose(state, z, fz, gz, count if counted else None)
            fz_new = f(z_new)
            state = algorithm.pure_absorb(state, z, fz, gz, z_new, fz_new, count if counted else None)
            z, fz, gz = z_new, fz_new, fz_new - z_new
            zs.append(z)
        runs.append(torch.stack(zs))
    assert runs[0][-1].sub(f(runs[0][-1])).abs().max() < 1e-4  # it converges: the steps are not trivial
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-12, atol=1e-12)


def test_broyden_compiles_a_bounded_number_of_graphs_across_solves_and_batch_sizes():
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    solver = DiscreteDEQSolver("lbroyden", memory=3, mode="rel_norm", reltol_termination=1e-6, compile=counter)
    for batch in (8, 8, 5, 8, 3, 5, 8):
        f, z0 = _problem(batch, torch.float32)
        assert solver(f, z0).status.value == "converged"
    # count 0 and 1, a symbolic count below the memory, a full memory: 4 graphs; a second batch size at
    # most as many again, with a dynamic batch that serves every later size
    assert counter.frame_count <= 8
    frames = counter.frame_count
    for batch in (8, 3, 5, 7):
        f, z0 = _problem(batch, torch.float32)
        solver(f, z0)
    assert counter.frame_count == frames


@pytest.mark.parametrize("algorithm,options", ALGORITHMS)
def test_the_split_step_around_an_eager_map_equals_the_eager_solve(algorithm, options):
    f, z0 = _problem(6, torch.float64)
    calls = []

    def host_map(z):  # host code in f: fullgraph tracing would refuse it, the split step never traces it
        calls.append(bool(z.abs().max() > 1e6))
        return f(z)

    kw = dict(mode="rel_norm", reltol_termination=1e-8, max_steps=30, **options)
    eager = DiscreteDEQSolver(algorithm, **kw)(f, z0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)  # compiles: no fallback
        split = DiscreteDEQSolver(algorithm, compile="aot_eager", compile_map=False, **kw)(host_map, z0)
    _assert_same(eager, split, torch.float64)
    assert len(calls) == split.nfe


def test_an_error_of_the_eager_map_is_raised_as_it_is():
    f, z0 = _problem(3, torch.float64)
    seen = []

    def failing(z):
        seen.append(1)
        if len(seen) == 2:  # the first compiled step's evaluation
            raise KeyError("the map's own error")
        return f(z)

    solver = DiscreteDEQSolver("anderson", compile="eager", compile_map=False, mode="rel_norm")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)  # not taken for a failed compilation
        with pytest.raises(KeyError, match="the map's own error"):
            solver(failing, z0)


def test_compile_map_false_needs_a_split_step():
    from deqlab.solvers import FixedPointAlgorithm

    class Fused(FixedPointAlgorithm):  # a user's algorithm with a fused pure step only
        def init(self, z, fz, max_steps):
            return None

        def step(self, state, z, fz, g, F):
            return fz, F(fz), state

        def pure_init(self, z, fz, max_steps):
            return {}

        def pure_step(self, state, z, fz, g, F):
            return fz, F(fz), state

    assert Fused().supports_compile and not Fused().supports_split
    f, z0 = _problem(3, torch.float64)
    fused = DiscreteDEQSolver(Fused(), compile="eager", mode="rel_norm")(f, z0)
    assert fused.status.value == "converged"
    with pytest.warns(CompileFallbackWarning, match="no split pure step"):
        res = DiscreteDEQSolver(Fused(), compile="eager", compile_map=False, mode="rel_norm")(f, z0)
    assert res.nfe == fused.nfe


@pytest.mark.parametrize("algorithm", ["fixed_point", "anderson", "lbroyden"])
def test_a_compiled_fixed_point_linear_solver_matches_dense_linear_algebra(algorithm):
    # x = M x + b with a contraction M per sample: the adjoint system's shape, solved with the algebra
    # compiled and the matvec (here host-side Python with a counter, like a VJP) eager
    gen = torch.Generator().manual_seed(7)
    B, N = 4, 9
    M = torch.randn(B, N, N, generator=gen, dtype=torch.float64) * 0.5 / N**0.5
    b = torch.randn(B, N, generator=gen, dtype=torch.float64)
    oracle = torch.linalg.solve(torch.eye(N, dtype=torch.float64) - M, b.unsqueeze(-1)).squeeze(-1)
    products = []

    def matvec(v):
        products.append(1)
        return v - torch.bmm(M, v.unsqueeze(-1)).squeeze(-1)

    inner = DiscreteDEQSolver(algorithm, mode="rel_norm", reltol_termination=1e-11, max_steps=80, compile="eager")
    lin = FixedPointLinearSolver(inner)
    assert lin.solver.compile_map is False and inner.compile_map is True  # a copy; the user's is untouched
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        out = lin.solve(matvec, b)
    eager = FixedPointLinearSolver(
        DiscreteDEQSolver(algorithm, mode="rel_norm", reltol_termination=1e-11, max_steps=80)
    ).solve(matvec, b)
    assert out.matvecs == eager.matvecs == len(products) // 2 and out.iterations == eager.iterations
    assert torch.equal(out.converged, eager.converged)
    torch.testing.assert_close(out.x, eager.x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.x, oracle, rtol=1e-9, atol=1e-9)


def test_a_compiled_fixed_point_linear_solver_keeps_its_budget():
    # the budget's signal is raised by the eager matvec inside the first compiled step
    M = torch.full((1, 3, 3), 0.2, dtype=torch.float64)
    b = torch.ones(1, 3, dtype=torch.float64)
    inner = DiscreteDEQSolver("anderson", mode="rel_norm", reltol_termination=1e-12, max_steps=50, compile="eager")
    for budget in (2, 3, 6):
        out = FixedPointLinearSolver(inner, max_steps=budget).solve(
            lambda v: v - torch.bmm(M, v.unsqueeze(-1)).squeeze(-1), b
        )
        assert out.matvecs == budget and not out.all_converged


def test_compiled_anderson_adjoint_gives_the_eager_gradients():
    from torch import nn

    from deqlab.nn import DEQ, ImplicitBackward

    torch.manual_seed(0)

    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, D, dtype=torch.float64)
            with torch.no_grad():
                self.lin.weight.mul_(0.4)

        def forward(self, z, x):
            return torch.tanh(self.lin(z) + x)

    cell = Cell()
    x = torch.randn(5, D, dtype=torch.float64)
    solver = DiscreteDEQSolver("anderson", mode="rel_norm", reltol_termination=1e-10, max_steps=60)
    grads = []
    for compile in (False, "aot_eager"):
        backward = ImplicitBackward("anderson", tol=1e-11, max_steps=60, compile=compile)
        cell.zero_grad()
        z, sol = DEQ(cell, solver, backward=backward)(x)
        z.square().sum().backward()
        assert sol.backward_converged
        grads.append(cell.lin.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("method", ["tsit5", "vcab3"])
@pytest.mark.parametrize("per_sample_steps", [True, False])
def test_a_block_of_k_compiled_stepper_calls_equals_the_eager_solve(method, per_sample_steps):
    from deqlab.solvers import ContinuousDEQSolver

    f, z0 = _problem(5, torch.float64)
    kw = dict(mode="rel_norm", reltol_termination=1e-6, ode_abstol=1e-7, ode_reltol=1e-7, max_steps=200)
    kw.update(check_every=3, per_sample_steps=per_sample_steps)
    eager = ContinuousDEQSolver(method, **kw)(f, z0)
    counter = CallCounter()
    blocked = ContinuousDEQSolver(method, compile=counter, **kw)(f, z0)
    assert (blocked.nfe, blocked.steps, blocked.status) == (eager.nfe, eager.steps, eager.status)
    assert torch.equal(blocked.sample_steps, eager.sample_steps)
    assert torch.equal(blocked.accepted_steps, eager.accepted_steps)
    torch.testing.assert_close(blocked.z, eager.z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(blocked.t, eager.t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(blocked.trace, eager.trace, rtol=1e-9, atol=1e-12, equal_nan=True)
    # VCAB3's two start-up calls run eager; every other call is in a block of 3 (the first ones single
    # until the step count is a multiple of 3)
    eager_calls = 2 if method == "vcab3" else 0
    compiled_calls = blocked.steps - eager_calls
    assert counter.calls < compiled_calls and counter.calls <= compiled_calls // 3 + 3


def test_a_block_of_stepper_calls_stops_at_max_steps_and_t_max():
    from deqlab.solvers import ContinuousDEQSolver

    f, z0 = _problem(4, torch.float64)
    for extra in (dict(max_steps=8), dict(max_steps=200, t_max=0.7)):
        kw = dict(mode="rel_norm", reltol_termination=1e-12, check_every=3, **extra)
        eager = ContinuousDEQSolver("tsit5", **kw)(f, z0)
        blocked = ContinuousDEQSolver("tsit5", compile="eager", **kw)(f, z0)
        assert (blocked.nfe, blocked.steps, blocked.status) == (eager.nfe, eager.steps, eager.status)
        torch.testing.assert_close(blocked.z, eager.z, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(blocked.t, eager.t, rtol=1e-12, atol=1e-12)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@cuda
@pytest.mark.parametrize("compile", [False, "inductor"])
@pytest.mark.parametrize("algorithm,options", ALGORITHMS)
def test_a_cuda_graph_of_a_block_equals_the_eager_solve(algorithm, options, compile):
    from deqlab.solvers.cuda_graphs import CapturedBlock

    f, z0 = _problem(6, torch.float32, "cuda")
    kw = dict(mode="rel_norm", reltol_termination=1e-5, max_steps=30, check_every=3, **options)
    eager = DiscreteDEQSolver(algorithm, **kw)(f, z0)
    captured = []
    original = CapturedBlock.__call__

    def spy(self, *args):
        captured.append(self)
        return original(self, *args)

    solver = DiscreteDEQSolver(algorithm, compile=compile, cuda_graphs=True, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        CapturedBlock.__call__ = spy
        try:
            for _ in range(2):  # a graph per solve: the second solve captures its own
                graphed = solver(f, z0)
                _assert_same(eager, graphed, torch.float32)
        finally:
            CapturedBlock.__call__ = original
    assert any(block.replays > 0 for block in captured)  # later blocks were replays of the graph


@cuda
@pytest.mark.parametrize("method", ["tsit5", "vcab3"])
def test_a_cuda_graph_of_stepper_calls_equals_the_eager_solve(method):
    from deqlab.solvers import ContinuousDEQSolver

    f, z0 = _problem(6, torch.float32, "cuda")
    kw = dict(mode="rel_norm", reltol_termination=1e-4, ode_abstol=1e-5, ode_reltol=1e-5, max_steps=200, check_every=4)
    eager = ContinuousDEQSolver(method, **kw)(f, z0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        graphed = ContinuousDEQSolver(method, compile="inductor", cuda_graphs=True, **kw)(f, z0)
    assert (graphed.nfe, graphed.status) == (eager.nfe, eager.status)
    assert torch.equal(graphed.sample_steps, eager.sample_steps)
    torch.testing.assert_close(graphed.z, eager.z, rtol=1e-4, atol=1e-5)


@cuda
def test_a_map_that_cannot_be_captured_runs_uncaptured_with_one_warning():
    f, z0 = _problem(4, torch.float32, "cuda")

    def syncing(z):
        if bool(z.isnan().any()):  # a host sync: not allowed while a stream is captured
            raise RuntimeError("nan")
        return f(z)

    kw = dict(mode="rel_norm", reltol_termination=1e-5, max_steps=30, check_every=3)
    eager = DiscreteDEQSolver("anderson", **kw)(f, z0)
    solver = DiscreteDEQSolver("anderson", cuda_graphs=True, **kw)
    _warns_once_then_equals(solver, syncing, z0, eager, torch.float32, match="cuda_graphs")


def test_a_compilation_that_fails_mid_solve_finishes_the_solve_with_the_uncompiled_pure_step():
    # Broyden's count-shaped step compiles again at count 1; a backend that fails then leaves the solve
    # half-way through the compiled loop: it must finish on the same state, equal to eager, warning once
    from deqlab.solvers.compiled import reset_cache

    reset_cache()
    failed: list = []
    f, z0 = _problem(5, torch.float64)
    kw = dict(mode="rel_norm", reltol_termination=1e-10, max_steps=30)
    eager = DiscreteDEQSolver("broyden", **kw)(f, z0)
    solver = DiscreteDEQSolver("broyden", compile=failing_on_the_second_graph(failed), **kw)
    # later solves run eager, without a second warning
    _warns_once_then_equals(solver, f, z0, eager, torch.float64, match="could not be compiled")
    assert failed  # the second graph did fail: the fallback really ran mid-solve


def test_many_step_shapes_stay_within_the_raised_recompile_limit():
    # buffer sizes (max_steps), batch sizes and dtypes multiply a count-shaped step's graphs past dynamo's
    # default 8 per function; the step's own limit keeps them compiled (no warning, no crash)
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        for max_steps in (6, 10, 14):
            for dtype in (torch.float32, torch.float64):
                for batch in (4, 3):
                    f, z0 = _problem(batch, dtype)
                    solver = DiscreteDEQSolver("lbroyden", memory=27, max_steps=max_steps, compile=counter)
                    assert solver(f, z0).steps > 2
    assert counter.frame_count > 8  # the default limit would have been hit
    assert torch._dynamo.config.recompile_limit == 8  # and the global setting is left alone


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_an_error_of_the_map_after_a_mid_solve_fallback_is_raised_not_retried(kind):
    # after the fallback the uncompiled step calls f itself; an error there is f's own: raised once, never
    # taken for another failed compilation (which would retry the same call forever)
    from deqlab.solvers import ContinuousDEQSolver
    from deqlab.solvers.compiled import reset_cache

    reset_cache()
    failed: list = []
    compile_ = failing_on_the_second_graph(failed)
    f, z0 = _problem(3, torch.float64)

    def f_breaks_with_the_backend(z):
        if failed:  # from the fallback on, f raises
            raise ValueError("f broke")
        return f(z)

    if kind == "discrete":  # Broyden's count 1 is a second graph
        solver = DiscreteDEQSolver("broyden", mode="rel_norm", reltol_termination=1e-12, compile=compile_)
    else:  # after VCAB3's two eager start-up calls: two single calls (graph 1), then a block of 4 (graph 2)
        solver = ContinuousDEQSolver(
            "vcab3", mode="rel_norm", reltol_termination=1e-12, check_every=4, compile=compile_
        )
    with pytest.warns(CompileFallbackWarning):
        with pytest.raises(ValueError, match="f broke"):
            solver(f_breaks_with_the_backend, z0)
