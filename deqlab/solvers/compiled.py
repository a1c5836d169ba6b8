"""The compiled solver step: one iteration (algorithm update + termination bookkeeping) as one graph.

Why: on a CPU with a small map, a discrete solver's step is dozens of small kernels, each paying Python and
dispatcher overhead that rivals its arithmetic. ``torch.compile`` fuses the step -- the map ``f``
included -- into a few kernels. The loop around it stays eager and asks the device whether every sample
has stopped every ``check_every`` steps, exactly as the eager loop does.

What makes a step compilable: the algorithm's `pure_propose` / `pure_absorb` (or a user's fused
`pure_step`) and the tracker's `device_update` are pure functions of tensors (no host sync, no Python
branch on a tensor's value), and ``f`` is traceable. When ``f`` is not (an ``.item()`` in ``f``), pass
``compile_map=False``: the algebra is compiled around an eager ``f``. When nothing can be compiled (no C++
compiler for inductor), the solver warns once and runs eager.

Compilations: one per (algorithm configuration, termination condition, map, shape, dtype, device).
``dynamic=None`` (torch's automatic dynamic shapes): the first batch size compiles a static graph; a
second size compiles one graph with a symbolic batch dimension that then serves every size, so a last
batch of another size costs one recompilation per solver, not one per call.
"""

from __future__ import annotations

import types
import warnings
from typing import Any, Callable, Dict, Hashable, Tuple, Union, cast

import torch
from torch import Tensor

from deqlab.solvers.termination import TerminationCondition, device_update

#: what ``compile=`` accepts: ``False`` (eager), ``True`` (inductor), or a ``torch.compile`` backend
CompileOption = Union[bool, str, Callable[..., Any]]

_CACHE: Dict[Hashable, Callable[..., Any]] = {}


class MapRaised(Exception):
    """The eager map of a split compiled step (``compile_map=False``) raised ``error``: the solver re-raises
    it as it is, instead of taking it for a compilation that failed."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class CompileFallbackWarning(UserWarning):
    """A compiled solver step could not be built, so the solver runs eager; issued once per solver.

    Why a warning and not an error: ``compile=True`` is an optimisation, and a map that cannot be traced
    (it calls ``.item()``, branches on a tensor's value) or a machine without a C++ compiler still solves
    correctly, only without the fusion. Filter it with ``warnings.simplefilter("error",
    CompileFallbackWarning)`` to insist on the compiled step.

    Example:
        >>> import warnings
        >>> import torch
        >>> from deqlab.solvers import CompileFallbackWarning, DiscreteDEQSolver
        >>> solver = DiscreteDEQSolver("newton_krylov", compile=True)   # no pure step: eager
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     res = solver(lambda z: 0.5 * z + 1, torch.zeros(2, 3))
        >>> caught[0].category is CompileFallbackWarning, res.status.value
        (True, 'converged')
    """


def check_compile_option(owner: str, value: object) -> CompileOption:
    """``compile=`` validated: a bool, a backend name or a backend callable."""
    if isinstance(value, bool) or isinstance(value, str) or callable(value):
        if isinstance(value, str) and not value:
            raise ValueError(f"{owner}: compile must be True/False or a torch.compile backend, got ''")
        return value
    raise TypeError(
        f"{owner}: compile must be True/False or a torch.compile backend (name or callable), got {type(value).__name__}"
    )


def compile_available() -> bool:
    """True when this torch has ``torch.compile`` (dynamo) at all."""
    return hasattr(torch, "compile") and hasattr(torch, "_dynamo")


def _fresh_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of ``fn`` with its own code object, hence its own dynamo cache.

    Why: dynamo keeps compiled graphs per code object, with a limit (``recompile_limit``, 8) on their
    number. One shared step function would let every solver configuration in a process (forward and
    backward solvers, several layers) compete for those 8 entries and fall back to eager silently; a code
    object per configuration keeps them apart.
    """
    code = fn.__code__.replace()  # a distinct object, equal in everything else
    new = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    if new.__code__ is fn.__code__:  # pragma: no cover - CPython always copies in replace()
        raise RuntimeError("could not copy the step function's code object")
    return new


def cached_compile(key: Hashable, fn: Callable[..., Any], backend: CompileOption) -> Callable[..., Any]:
    """``torch.compile(fn, fullgraph=True)`` for ``key`` (built once, then shared by every solver whose
    configuration gives the same key), on a code object of its own (see `_fresh_function`)."""
    backend_name = "inductor" if backend is True else cast(Union[str, Callable[..., Any]], backend)
    full = (key, backend_name)
    step = _CACHE.get(full)
    if step is None:
        step = _with_recompile_limit(
            torch.compile(_fresh_function(fn), backend=backend_name, fullgraph=True, dynamic=None)
        )
        _CACHE[full] = step
    return step


#: the graphs one step function may keep (dynamo's default, 8, is global): a step shaped by the host's step
#: count (Broyden's) has four per (buffer size, batch regime, dtype), and a solver meets several of each
RECOMPILE_LIMIT = 64


def _with_recompile_limit(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """``compiled``, retried with dynamo's per-function recompile limit raised to `RECOMPILE_LIMIT` when a
    call hits the global limit (the user's compiled code keeps the global setting). Why: past the limit a
    ``fullgraph=True`` function fails hard, mid-solve; the solver would then finish eagerly, slowly. The
    failed call ran nothing (the limit is checked before compiling), so the retry is the call; the other
    calls pay nothing for it."""
    config = torch._dynamo.config
    limit_hit = torch._dynamo.exc.FailOnRecompileLimitHit

    def call(*args: Any) -> Any:
        try:
            return compiled(*args)
        except limit_hit:
            old = config.recompile_limit
            if old >= RECOMPILE_LIMIT:
                raise
            config.recompile_limit = RECOMPILE_LIMIT
            try:
                return compiled(*args)
            finally:
                config.recompile_limit = old

    return call


def compiled_discrete_step(
    algorithm,
    condition: TerminationCondition,
    backend: CompileOption,
    *,
    map_in_graph: bool = True,
    steps_per_call: int = 1,
) -> Callable[..., Tuple[Tensor, Tensor, Tensor, dict, dict, Tensor]]:
    """The compiled ``step(F, astate, tstate, z, fz, g, count) -> (z, fz, g, astate, tstate, objective)``.

    ``steps_per_call=k > 1`` (``map_in_graph`` only): ``k`` steps unrolled into one graph, returning the
    ``(k, B)`` objectives of its steps -- the block of iterations between two host checks
    (``check_every``), one call instead of ``k``, and what a CUDA graph captures
    (`deqlab.solvers.cuda_graphs`). Pass ``count=None`` for a block that must not depend on the step
    number (a CUDA graph replayed for every block). ``backend=False`` returns the block uncompiled (a
    CUDA graph of the eager step).

    ``map_in_graph=True`` fuses ``F`` into the step's one graph. ``False`` (an algorithm with a split step,
    `FixedPointAlgorithm.supports_split`) compiles the algorithm's two halves around an eager ``F``:
    `pure_propose`, then ``F``, then `pure_absorb` with the termination update -- for maps that cannot be
    traced (the autograd VJPs of an adjoint solve, a map with host code), at two compiled calls per step.
    ``count`` is the host's number of steps taken before this one.

    Cached per (algorithm type and options, termination condition, backend, map in the graph or not), so
    every solver with the same configuration shares its graphs; dynamo's guards then key them by shape,
    dtype and device.
    """
    # compile=False solves eagerly and never asks for a compiled step
    key = (type(algorithm), repr(algorithm), condition)
    split = algorithm.supports_split

    def absorb(astate, tstate, z, fz, g, z_new, fz_new, count):
        astate = algorithm.pure_absorb(astate, z, fz, g, z_new, fz_new, count)
        g_new = fz_new - z_new
        tstate, obj = device_update(condition, tstate, z_new, g_new, fz_new)
        return g_new, astate, tstate, obj

    if map_in_graph:

        def one(F, astate, tstate, z, fz, g, count):
            if split:
                z_new = algorithm.pure_propose(astate, z, fz, g, count)
                fz_new = F(z_new)
                g_new, astate, tstate, obj = absorb(astate, tstate, z, fz, g, z_new, fz_new, count)
                return z_new, fz_new, g_new, astate, tstate, obj
            z, fz, astate = algorithm.pure_step(astate, z, fz, g, F)
            g = fz - z
            tstate, obj = device_update(condition, tstate, z, g, fz)
            return z, fz, g, astate, tstate, obj

        if steps_per_call == 1:
            return one if backend is False else cached_compile((key, "fused"), one, backend)

        def block(F, astate, tstate, z, fz, g, count):
            objs = []
            for i in range(steps_per_call):  # unrolled when traced: one graph for the block
                z, fz, g, astate, tstate, obj = one(F, astate, tstate, z, fz, g, None if count is None else count + i)
                objs.append(obj)
            return z, fz, g, astate, tstate, torch.stack(objs)

        return block if backend is False else cached_compile((key, "block", steps_per_call), block, backend)

    if not split:
        raise ValueError(
            f"{type(algorithm).__name__} has no split step (pure_propose/pure_absorb), so its map cannot stay "
            f"outside the compiled graph; pass compile_map=True or compile=False"
        )

    def propose_only(astate, z, fz, g, count):
        return algorithm.pure_propose(astate, z, fz, g, count)

    eager = backend is False  # the pure step run as it is (a fallback after a failed compilation)
    propose = propose_only if eager else cached_compile((key, "propose"), propose_only, backend)
    absorb_compiled = absorb if eager else cached_compile((key, "absorb"), absorb, backend)

    def step(F, astate, tstate, z, fz, g, count):
        z_new = propose(astate, z, fz, g, count)
        try:
            fz_new = F(z_new)
        except Exception as error:  # the map's own error (or a budget's signal), not a failed compilation
            raise MapRaised(error) from error
        g_new, astate, tstate, obj = absorb_compiled(astate, tstate, z, fz, g, z_new, fz_new, count)
        return z_new, fz_new, g_new, astate, tstate, obj

    return step


def unsupported(owner: str, missing: str, stacklevel: int) -> None:
    """Warn (once per solver: the caller remembers) that ``compile=`` cannot be honoured: this torch has no
    ``torch.compile``, or ``missing`` (what the solver's configuration lacks) says why not."""
    why = "this torch has no torch.compile" if not compile_available() else missing
    warnings.warn(f"{owner}(compile=True): {why}; running eager", CompileFallbackWarning, stacklevel=stacklevel + 1)


def fallback_warning(owner: str, error: BaseException) -> None:
    """Warn (once per solver: the caller remembers) that the compiled step failed and eager runs instead."""
    text = str(error).strip().splitlines()
    first = text[0] if text else type(error).__name__
    warnings.warn(
        f"{owner}(compile=True): the solver step could not be compiled ({type(error).__name__}: "
        f"{first[:300]}); running eager. Common causes: the map calls .item()/.tolist() or other "
        f"host code on tensor values, or no C++ compiler is available for inductor (pass "
        f"compile='aot_eager' to fuse nothing but keep tracing, or compile=False).",
        CompileFallbackWarning,
        stacklevel=4,
    )


def reset_cache() -> None:
    """Forget every compiled step (and dynamo's graphs): the next compiled solve compiles again."""
    _CACHE.clear()
    if compile_available():
        torch._dynamo.reset()


__all__ = [
    "CompileFallbackWarning",
    "CompileOption",
    "cached_compile",
    "check_compile_option",
    "compile_available",
    "compiled_discrete_step",
    "fallback_warning",
    "reset_cache",
    "unsupported",
]
