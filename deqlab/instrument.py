"""Where a solve's time goes: named regions that deqlab's solvers, DEQ layers and backward modes report to
while a recording runs.

Why a public hook: the benchmark tables that split a solve into map evaluations, termination tests, the
algorithm's own work and the adjoint solve used to monkeypatch deqlab's private methods by dotted names,
so a rename broke them only when someone ran them. Here the library itself says where its regions start
and end, under names that are part of the API ([`REGIONS`][deqlab.instrument.REGIONS]), and anyone can
open a recording around their own code:

```python
from deqlab import instrument

with instrument.record() as rec:
    z, solution = deq(x)
    loss.backward()
print(rec.summary())               # calls, inclusive and exclusive seconds per region
rec.exclusive()["f"]               # seconds in map evaluations, nested regions subtracted
```

Design:

* **Zero cost when off.** No recording in any thread means an empty-dict test per region site, once per
  solver call: the solvers pick their callables once per call (`wrap` returns the function itself when
  nothing records), so the discrete loop calls exactly what it called before this module existed, and
  the continuous loops test one local variable against ``None`` twice per step. No context manager is
  built and no clock is read per iteration.
* **Exclusive and inclusive.** Every region's time is stored per *nesting path* (``("solver", "f")``)
  with the nested regions' time subtracted (exclusive), so the exclusive times of all regions add up to the
  time spent inside any region, without double counting. Inclusive times and "inside A but not inside B"
  (e.g. the adjoint solver's own work without its VJPs) are sums over those paths (`Recording.seconds`).
* **Per thread.** A recording sees the thread that opened it, nothing else: a DataLoader worker or another
  thread solving meanwhile is not counted. One exception is made on purpose: a DEQ layer's backward runs
  in autograd's device thread on CUDA, so the backward reports to the recording of the thread that ran
  the forward when that thread is still recording and its own thread records nothing.
* **Device synchronisation only when asked.** ``record(sync=True)`` synchronises CUDA at every region
  boundary so a region's time is its kernels' time; without it (the default) regions measure host time
  and the device runs asynchronously, as it does unrecorded. Off, nothing ever synchronises.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, ContextManager, Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar, Union

import torch

__all__ = ["REGIONS", "Recording", "current", "record", "region", "wrap"]

REGIONS: Dict[str, str] = {
    "deq.forward": "a DEQ layer's forward: initial guess, solve, attaching the gradient, the record",
    "deq.init": "the layer's initial guess u0 (a Skip DEQ's shortcut, a Skip Reg. DEQ's f(0, x))",
    "deq.spectral_radius": "the opt-in estimate of rho(df/dz) at z* (a graph of f and its VJPs; "
    "DeepEquilibriumNetwork(spectral_radius=...))",
    "deq.backward": "a DEQ layer's backward: its backward mode turning dL/dz* into dL/dx and dL/dθ",
    "solver": "one solver call; exclusive: the loop itself, f(z) - z, per-sample-exit compaction",
    "solver.setup": "checking and flattening z0, building the counted map and the termination tracker",
    "solver.result": "building the SolverResult (returned iterate, residuals, status)",
    "f": "one evaluation of the map inside a solver (Newton-Krylov's JVPs included; in a fixed-point "
    "adjoint solve, one step of the adjoint map)",
    "termination": "TerminationTracker.update: the per-sample stop test and best-iterate bookkeeping",
    "algorithm.init": "a discrete algorithm's init (its memory buffers)",
    "algorithm.step": "a discrete algorithm's step (Anderson's least squares, Broyden's update, ...)",
    "stepper.init": "a continuous solver's initial step size (the Hairer-Wanner estimate)",
    "stepper.step": "one call of a continuous solver's stepper (Tsit5, Dopri5, VCAB3, Euler, RK4) with its "
    "error control and guards",
    "adjoint.linearize": "the implicit backward's graph of f at z* (one evaluation of f with grad)",
    "adjoint.solve": "the implicit backward's linear solve of (I - J^T) g = dL/dz* (GMRES or a fixed-point "
    "solver; NeumannPhantomGradient's truncated series)",
    "adjoint.vjp": "one VJP v^T df/dz through that graph (the adjoint solve's matrix-vector product)",
    "adjoint.vjp_inputs": "the final VJP g^T df/d(x, parameters)",
}
"""The regions deqlab reports, ``{name: what it times}``. A region's *exclusive* time leaves out the regions
nested in it (e.g. ``"algorithm.step"`` without the ``"f"`` evaluations it makes)."""

_F = TypeVar("_F", bound=Callable)

# thread ident -> the Recording of that thread's innermost record() block. Empty when nothing records, so
# the one test the library makes per call when off is the truth value of this dict.
_ACTIVE: Dict[int, "Recording"] = {}
_NULL = contextlib.nullcontext()

_Sync = Union[bool, str, torch.device]


def _sync_function(sync: _Sync) -> Optional[Callable[[], None]]:
    if sync is False or sync is None:
        return None
    if sync is True:

        def sync_all() -> None:
            if torch.cuda.is_initialized():  # never initialise CUDA for a CPU run
                torch.cuda.synchronize()

        return sync_all
    if isinstance(sync, (str, torch.device)):
        device = torch.device(sync)
        if device.type == "cuda":
            return lambda: torch.cuda.synchronize(device)
        if device.type == "mps":  # pragma: no cover - not on CI
            return torch.mps.synchronize
        if device.type == "cpu":
            return None
        raise ValueError(
            f"record(sync={sync!r}): cannot synchronise a {device.type!r} device; pass sync=False "
            f"(host time) or a CUDA/MPS device"
        )
    raise TypeError(f"record(sync=...) takes True, False or a device (e.g. 'cuda:0'), got {sync!r}")


class Recording:
    """The times and call counts of the regions entered while a [`record`][deqlab.instrument.record]
    block runs.

    Every region is stored under its *nesting path* (``("deq.forward", "solver", "f")``) with the time of
    the regions nested in it subtracted, so each second spent inside regions is stored exactly once. The
    views below sum those paths: by region name, inclusive or exclusive, or restricted to a part of the tree.

    Args:
        sync: ``False`` (default): host time, the device runs asynchronously as it does unrecorded.
            ``True``: synchronise CUDA (when initialised) at every region boundary, so a region's time is
            its kernels' time; a device (``"cuda:1"``): synchronise that device.

    Raises:
        TypeError: ``sync`` is neither a bool nor a device.
        ValueError: ``sync`` names a device that cannot be synchronised.

    Attributes:
        paths: exclusive seconds per nesting path.
        counts: calls per nesting path.

    Example:
        Usually built by ``record()``; a recording can also be driven by hand:

        >>> from deqlab.instrument import Recording
        >>> rec = Recording()
        >>> with rec.region("outer"):
        ...     with rec.region("inner"):
        ...         pass
        >>> sorted(rec.counts.items())
        [(('outer',), 1), (('outer', 'inner'), 1)]
        >>> abs(rec.seconds("outer") - rec.total) < 1e-12   # everything happened inside "outer"
        True
    """

    def __init__(self, sync: _Sync = False) -> None:
        self._sync = _sync_function(sync)
        self.paths: Dict[Tuple[str, ...], float] = {}
        self.counts: Dict[Tuple[str, ...], int] = {}
        self._stack: List[list] = []  # open regions: [path, start time, seconds of nested regions]

    # ------------------------------------------------------------------------------------ recording
    def begin(self, name: str) -> int:
        """Open region ``name`` inside the innermost open one; returns the token `end` takes.

        For a loop body that is not a function call (prefer `region` or `wrap` elsewhere). A region left
        open by an exception is closed by the `end` of an enclosing region, or when the recording ends.

        Args:
            name: the region's name.

        Returns:
            The token to pass to `end`.

        Example:
            >>> from deqlab.instrument import Recording
            >>> rec = Recording()
            >>> token = rec.begin("step")
            >>> rec.end(token)
            >>> rec.calls()
            {'step': 1}
        """
        if self._sync is not None:
            self._sync()
        stack = self._stack
        path = stack[-1][0] + (name,) if stack else (name,)
        stack.append([path, time.perf_counter(), 0.0])
        return len(stack) - 1

    def end(self, token: int) -> None:
        """Close the region `begin` returned ``token`` for (and any region an exception left open in it).

        Args:
            token: what `begin` returned.

        Example:
            >>> from deqlab.instrument import Recording
            >>> rec = Recording()
            >>> outer = rec.begin("outer")
            >>> _ = rec.begin("inner")       # left open, e.g. by an exception
            >>> rec.end(outer)               # closes both
            >>> sorted(rec.calls().items())
            [('inner', 1), ('outer', 1)]
        """
        if self._sync is not None:
            self._sync()
        now = time.perf_counter()
        stack, paths, counts = self._stack, self.paths, self.counts
        while len(stack) > token:
            path, start, nested = stack.pop()
            elapsed = now - start
            paths[path] = paths.get(path, 0.0) + elapsed - nested
            counts[path] = counts.get(path, 0) + 1
            if stack:
                stack[-1][2] += elapsed

    def region(self, name: str) -> ContextManager[None]:
        """Time the ``with`` block as region ``name`` of this recording.

        Args:
            name: the region's name.

        Returns:
            A context manager; the block's time is recorded when it ends (also when it raises).

        Example:
            >>> from deqlab.instrument import Recording
            >>> rec = Recording()
            >>> with rec.region("load"):
            ...     pass
            >>> rec.calls()
            {'load': 1}
        """
        return _Region(self, name)

    def wrap(self, name: str, fn: _F) -> _F:
        """``fn`` with every call timed as region ``name`` of this recording.

        Args:
            name: the region's name.
            fn: any callable.

        Returns:
            A function that calls ``fn`` with the same arguments and returns its result.

        Example:
            >>> from deqlab.instrument import Recording
            >>> rec = Recording()
            >>> double = rec.wrap("double", lambda v: 2 * v)
            >>> double(3), double(4), rec.calls()
            (6, 8, {'double': 2})
        """
        begin, end = self.begin, self.end

        def timed(*args, **kwargs):
            token = begin(name)
            try:
                return fn(*args, **kwargs)
            finally:
                end(token)

        return timed  # type: ignore[return-value]

    def reset(self) -> None:
        """Forget what was recorded so far (regions still open go on and are recorded when they end).

        Example:
            >>> from deqlab.instrument import Recording
            >>> rec = Recording()
            >>> with rec.region("a"):
            ...     pass
            >>> rec.reset(); rec.calls()
            {}
        """
        self.paths, self.counts = {}, {}

    def _close(self) -> None:
        if self._stack:
            self.end(0)

    # ---------------------------------------------------------------------------------------- views
    @property
    def total(self) -> float:
        """Seconds spent inside any region (each second counted once)."""
        return sum(self.paths.values())

    def exclusive(self) -> Dict[str, float]:
        """Seconds per region with the regions nested in it subtracted; they add up to `total`.

        Returns:
            ``{region: seconds}`` over every region entered.

        Example:
            >>> from deqlab.instrument import Recording
            >>> rec = Recording()
            >>> with rec.region("solve"):
            ...     with rec.region("f"):
            ...         pass
            >>> ex = rec.exclusive()
            >>> sorted(ex), abs(sum(ex.values()) - rec.total) < 1e-12
            (['f', 'solve'], True)
        """
        out: Dict[str, float] = {}
        for path, seconds in self.paths.items():
            out[path[-1]] = out.get(path[-1], 0.0) + seconds
        return out

    def inclusive(self) -> Dict[str, float]:
        """Seconds per region including the regions nested in it (a region nested in itself counts once).

        Returns:
            ``{region: seconds}`` over every region entered.

        Example:
            >>> from deqlab.instrument import Recording
            >>> rec = Recording()
            >>> with rec.region("solve"):
            ...     with rec.region("f"):
            ...         pass
            >>> inc = rec.inclusive()
            >>> inc["solve"] >= inc["f"], abs(inc["solve"] - rec.total) < 1e-12
            (True, True)
        """
        names = {name for path in self.paths for name in path}
        return {name: self.seconds(name) for name in names}

    def calls(self) -> Dict[str, int]:
        """How many times each region was entered.

        Returns:
            ``{region: calls}`` over every region entered.

        Example:
            >>> from deqlab.instrument import Recording
            >>> rec = Recording()
            >>> for _ in range(3):
            ...     with rec.region("f"):
            ...         pass
            >>> rec.calls()
            {'f': 3}
        """
        out: Dict[str, int] = {}
        for path, n in self.counts.items():
            out[path[-1]] = out.get(path[-1], 0) + n
        return out

    def seconds(self, name: str, *, within: Optional[str] = None, excluding: Iterable[str] = ()) -> float:
        """Seconds inside region ``name`` (inclusive), optionally only where it runs inside ``within`` and
        without the time spent in the regions ``excluding`` nested in it.

        Args:
            name: the region.
            within: count ``name`` only where it is nested in this region (e.g. ``"f"`` within
                ``"deq.forward"``: the forward's evaluations, not those of a fixed-point adjoint solve).
                Default ``None``: everywhere.
            excluding: regions whose time, where nested in ``name``, is left out (e.g. the adjoint solve
                without its VJPs: ``seconds("adjoint.solve", excluding=["adjoint.vjp"])``). Default: none.

        Returns:
            Seconds; ``0.0`` for a region never entered.

        Example:
            >>> from deqlab.instrument import Recording
            >>> rec = Recording()
            >>> with rec.region("solve"):
            ...     with rec.region("vjp"):
            ...         pass
            >>> parts = rec.seconds("solve", excluding=["vjp"]) + rec.seconds("vjp", within="solve")
            >>> abs(parts - rec.seconds("solve")) < 1e-12, rec.seconds("never")
            (True, 0.0)
        """
        skip = tuple(excluding)
        total = 0.0
        for path, secs in self.paths.items():
            if name not in path:
                continue
            i = path.index(name)
            if within is not None and within not in path[:i]:
                continue
            if skip and any(e in path[i + 1 :] for e in skip):
                continue
            total += secs
        return total

    def summary(self) -> str:
        """A plain-text table: region, calls, inclusive and exclusive milliseconds, largest first.

        Returns:
            The table, one line per region.

        Example:
            >>> from deqlab.instrument import Recording
            >>> rec = Recording()
            >>> with rec.region("solve"):
            ...     pass
            >>> print(rec.summary().splitlines()[0])
            region                 calls  inclusive ms  exclusive ms
        """
        inc, exc, calls = self.inclusive(), self.exclusive(), self.calls()
        lines = [f"{'region':<22} {'calls':>6} {'inclusive ms':>13} {'exclusive ms':>13}"]
        for name in sorted(inc, key=lambda n: -inc[n]):
            lines.append(f"{name:<22} {calls[name]:>6} {1e3 * inc[name]:>13.3f} {1e3 * exc[name]:>13.3f}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Recording({len(self.calls())} regions, {self.total:.6f} s)"


class _Region:
    """``Recording.region``'s context manager (a class: about 3x cheaper than a generator-based one)."""

    __slots__ = ("rec", "name", "token")

    def __init__(self, rec: Recording, name: str) -> None:
        self.rec, self.name = rec, name

    def __enter__(self) -> None:
        self.token = self.rec.begin(self.name)

    def __exit__(self, *exc: object) -> None:
        self.rec.end(self.token)


def current() -> Optional[Recording]:
    """The recording of this thread's innermost [`record`][deqlab.instrument.record] block, or ``None``.

    Returns:
        The active [`Recording`][deqlab.instrument.Recording], or ``None`` when this thread records nothing.

    Example:
        >>> from deqlab import instrument
        >>> instrument.current() is None
        True
        >>> with instrument.record() as rec:
        ...     instrument.current() is rec
        True
    """
    return _ACTIVE.get(threading.get_ident()) if _ACTIVE else None


@contextlib.contextmanager
def record(*, sync: _Sync = False) -> Iterator[Recording]:
    """Record the regions that deqlab (and ``region``/``wrap`` in your code) enter in this thread.

    Nested ``record`` blocks: the inner one records alone until it ends, then the outer one resumes.

    Args:
        sync: ``False`` (default): host time, the device runs asynchronously as it does unrecorded.
            ``True``: synchronise CUDA (when initialised) at every region boundary, so each region's time
            is its kernels' time (the boundaries then cost a sync each, and the total grows); a device
            (``"cuda:1"``): synchronise that device.

    Yields:
        The [`Recording`][deqlab.instrument.Recording], filled while the block runs.

    Example:
        >>> import torch
        >>> from deqlab import instrument
        >>> from deqlab.solvers import DiscreteDEQSolver
        >>> solver = DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-10, max_steps=50)
        >>> with instrument.record() as rec:
        ...     res = solver(lambda z: 0.5 * z + 1, torch.zeros(2, 3, dtype=torch.float64))
        >>> calls = rec.calls()
        >>> calls["f"] == res.nfe, calls["algorithm.step"] == res.steps, calls["solver"]
        (True, True, 1)
        >>> sorted(calls)
        ['algorithm.init', 'algorithm.step', 'f', 'solver', 'solver.result', 'solver.setup', 'termination']
        >>> rec.seconds("solver") >= rec.seconds("f", within="solver") > 0
        True
    """
    rec = Recording(sync)
    ident = threading.get_ident()
    previous = _ACTIVE.get(ident)
    _ACTIVE[ident] = rec
    try:
        yield rec
    finally:
        rec._close()
        if previous is None:
            _ACTIVE.pop(ident, None)
        else:
            _ACTIVE[ident] = previous


def region(name: str) -> ContextManager[None]:
    """Time the ``with`` block as region ``name`` when this thread records; a no-op context otherwise.

    Args:
        name: the region's name (your own, or one of [`REGIONS`][deqlab.instrument.REGIONS]).

    Returns:
        A context manager (a shared no-op one when nothing records).

    Raises:
        TypeError: ``name`` is not a non-empty string.

    Example:
        >>> from deqlab import instrument
        >>> with instrument.record() as rec:
        ...     with instrument.region("data"):
        ...         batch = list(range(10))
        >>> rec.calls()
        {'data': 1}
        >>> with instrument.region("data"):   # nothing records: no cost beyond the call
        ...     pass
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"region(name): name must be a non-empty string, got {name!r}")
    rec = _ACTIVE.get(threading.get_ident()) if _ACTIVE else None
    return _NULL if rec is None else rec.region(name)


def wrap(name: str, fn: _F) -> _F:
    """``fn`` timed as region ``name`` when this thread records now; ``fn`` itself otherwise.

    Why: call it once before a loop and call what it returns inside the loop; when nothing records the
    loop runs ``fn`` unchanged, at no cost at all.

    Args:
        name: the region's name.
        fn: any callable.

    Returns:
        ``fn``, or a function timing each call of it.

    Example:
        >>> from deqlab import instrument
        >>> step = lambda v: v + 1
        >>> instrument.wrap("step", step) is step          # nothing records
        True
        >>> with instrument.record() as rec:
        ...     timed = instrument.wrap("step", step)
        ...     _ = [timed(i) for i in range(4)]
        >>> rec.calls()
        {'step': 4}
    """
    rec = _ACTIVE.get(threading.get_ident()) if _ACTIVE else None
    return fn if rec is None else rec.wrap(name, fn)


@contextlib.contextmanager
def _adopted(thread: int, name: str) -> Iterator[None]:
    """Region ``name``, recorded by this thread's recording or, when it has none, by the one thread
    ``thread`` (the DEQ forward's) is recording now: autograd runs a CUDA backward in its device thread."""
    if not _ACTIVE:
        yield
        return
    ident = threading.get_ident()
    rec = _ACTIVE.get(ident)
    adopted = rec is None
    if rec is None:
        rec = _ACTIVE.get(thread)
        if rec is None:
            yield
            return
        _ACTIVE[ident] = rec
    try:
        with rec.region(name):
            yield
    finally:
        if adopted:
            _ACTIVE.pop(ident, None)
