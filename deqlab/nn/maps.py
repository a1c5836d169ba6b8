"""The DEQ map as the solver sees it: ``z -> f(z, x)`` with a one-time check of what ``f`` returns.

Why a shared helper: every layer (discrete DEQs, their multiscale versions and the multiscale neural ODE)
hands the solver a closure over the injection ``x``. A model that returns the wrong shape, dtype or type
must fail on the first evaluation with a message that names what was expected, not deep inside a solver
with a reshape error; after that first evaluation the check costs nothing.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from deqlab.nn.layers import stateful_modules
from deqlab.state import IN_PLACE_HINT, State, as_parts, version_of

__all__ = ["CheckedMap", "batch_coupling", "describe_state", "format_shape"]


def format_shape(shape: Sequence[int]) -> str:
    """A shape with the batch dimension written as ``B``: ``(B, 4, 8)``."""
    shape = tuple(shape)
    return "(B, " + ", ".join(str(d) for d in shape[1:]) + ")" if len(shape) > 1 else str(shape)


def describe_state(obj: Any) -> str:
    """What ``obj`` is, for error messages: shapes for tensors and lists of tensors, the type otherwise.

    Never raises (it runs on the error path, where ``obj`` may be anything).
    """
    if isinstance(obj, Tensor):
        return format_shape(obj.shape)
    if isinstance(obj, (list, tuple)):
        inner = ", ".join(describe_state(o) if isinstance(o, Tensor) else type(o).__name__ for o in obj)
        return f"[{inner}]" if isinstance(obj, list) else f"({inner})"
    return type(obj).__name__


class CheckedMap:
    """``z -> fn(z, x)`` for a solver; the first call validates the output (no per-step cost after it).

    Args:
        fn: the map ``f(z, x)`` (a state and the injection, returning a state shaped like ``z``).
        x: the injection, fixed for the solve.
        name: the layer's name, to start error messages with.

    The first call raises `ValueError` when ``fn`` fails on the state (naming both shapes and dtypes,
    the usual cause being an ``x`` the model does not expect or a missing ``z_shape``/``init``), returns
    something that is not a state shaped like ``z`` ("the DEQ map must return a state shaped like z"),
    returns another dtype or a state on another device ("expected device X, got Y"), or modifies ``z`` in
    place (``nn.ReLU(inplace=True)`` on ``z`` itself: the solver's iterate would be corrupted, and the
    backward would fail later with an autograd error). ``checked`` is ``True`` once a call passed.
    """

    def __init__(
        self,
        fn: Callable[[State, Tensor], State],
        x: Tensor,
        *,
        name: str = "DEQ",
        modules: Optional[Callable[[], Sequence[nn.Module]]] = None,
    ):
        self.fn = fn
        self.x = x
        self.name = name
        self.checked = False
        self._modules = modules  # the modules of the map, for restrict(); None: not restrictable
        self._restrict_to: Optional[List[Any]] = None  # the stateful modules a sub-batch must tell its rows

    def __call__(self, z: State) -> State:
        if self.checked:
            return self.fn(z, self.x)
        zp = as_parts(z)
        versions = [version_of(t) for t in zp]
        try:
            out = self.fn(z, self.x)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError) as err:
            shapes = describe_state(z)
            raise ValueError(
                f"{self.name}: the DEQ map failed on a state z of shape {shapes} ({zp[0].dtype}) and an "
                f"injection x of shape {format_shape(self.x.shape)} ({self.x.dtype}). Check that x has the "
                f"shape and dtype the model expects, and pass z_shape=... (or init=ZeroGuess(shape=...)) "
                f"when the state differs from x in shape. Original error: {err}"
            ) from err
        op = list(out) if isinstance(out, (list, tuple)) else [out]
        ok = isinstance(out, Tensor) if isinstance(z, Tensor) else isinstance(out, (list, tuple))
        ok = (
            ok
            and len(op) == len(zp)
            and all(isinstance(o, Tensor) for o in op)
            and all(a.shape == b.shape for a, b in zip(zp, op))
        )
        if not ok:
            raise ValueError(
                f"{self.name}: the DEQ map must return a state shaped like z: expected "
                f"{describe_state(z)}, got {describe_state(out)}"
            )
        if any(v is not None and version_of(t) != v for t, v in zip(zp, versions)):
            raise ValueError(f"{self.name}: the DEQ map modified its input z in place ({IN_PLACE_HINT})")
        if any(a.dtype != b.dtype for a, b in zip(zp, op)):
            raise ValueError(
                f"{self.name}: the DEQ map returned dtype {op[0].dtype} for a state of dtype "
                f"{zp[0].dtype}; cast x (dtype {self.x.dtype}) or the model to one dtype"
            )
        wrong = next(((a, b) for a, b in zip(zp, op) if a.device != b.device), None)
        if wrong is not None:
            raise ValueError(
                f"{self.name}: the DEQ map must return a state on the device of z: expected device "
                f"{wrong[0].device}, got {wrong[1].device}; move the model to the device of x "
                f"(x is on {self.x.device})"
            )
        self.checked = True
        return out if isinstance(out, Tensor) else list(out)

    def restrict(self, index: Tensor) -> "_SubBatchMap":
        """The map of the samples ``index`` of this batch (per-sample early exit; see
        [`deqlab.solvers.SubBatchMap`][deqlab.solvers.SubBatchMap]): ``fn(z, x[index])``, with every per-sample state of the map's
        modules (e.g. [`VariationalHiddenDropout`][deqlab.nn.VariationalHiddenDropout]'s mask) indexed the same way.

        Raises:
            TypeError: the map was built without its modules (``modules=None``), so whether its samples
                are independent is unknown.
            ValueError: a module of the map couples the samples of a batch (BatchNorm normalising with
                batch statistics): on a sub-batch ``f`` would change, so the exit is refused.
        """
        if self._restrict_to is None:
            if self._modules is None:
                raise TypeError(
                    f"{self.name}: this map cannot be evaluated on a sub-batch (built without its "
                    f"modules); pass per_sample_exit=False to the solver"
                )
            modules = list(self._modules())
            reason = batch_coupling(modules)
            if reason is not None:
                raise ValueError(
                    f"{self.name}: per_sample_exit=True evaluates the DEQ map on the samples still iterating, "
                    f"but {reason}, so f of one sample depends on the others and a sub-batch would change it. "
                    f"Use a per-sample normalisation in the map (GroupNorm, LayerNorm), or turn per_sample_exit "
                    f"off while training (in eval mode BatchNorm uses its running statistics and the exit is "
                    f"allowed)."
                )
            self._restrict_to = stateful_modules(modules)
        return _SubBatchMap(self, index, self._restrict_to)


class _SubBatchMap:
    """``z -> fn(z, x[index])`` for a sub-batch, telling per-sample stateful modules which rows they see."""

    __slots__ = ("parent", "index", "x", "stateful")

    def __init__(self, parent: CheckedMap, index: Tensor, stateful: Sequence[Any]):
        self.parent = parent
        self.index = index
        self.x = parent.x.index_select(0, index)
        self.stateful = stateful

    def __call__(self, z: State) -> State:
        if not self.parent.checked:  # the first evaluation of a solve is the full batch's, which checks
            raise RuntimeError(f"{self.parent.name}: a sub-batch map was evaluated before the full map")
        for m in self.stateful:
            m.deq_select(self.index)
        try:
            return self.parent.fn(z, self.x)
        finally:
            for m in self.stateful:
                m.deq_select(None)


def batch_coupling(modules: Sequence[nn.Module]) -> Optional[str]:
    """Why the samples of a batch are not independent under ``modules``, or ``None`` when they are.

    Today's reason is BatchNorm normalising with batch statistics: in training mode, or with
    ``track_running_stats=False`` (then in eval mode too). Modules that mix samples in other ways
    (attention over the batch, custom layers) cannot be detected; a map with them must not be used with
    per-sample early exit.

    Args:
        modules: the modules of the map (searched recursively).

    Returns:
        A phrase naming the first coupling module, or ``None``.

    Example:
        >>> from torch import nn
        >>> from deqlab.nn.maps import batch_coupling
        >>> block = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        >>> batch_coupling([block])
        "BatchNorm1d '1' normalises with batch statistics"
        >>> batch_coupling([block.eval()]) is None
        True
    """
    for root in modules:
        for name, m in root.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats):
                return f"{type(m).__name__} {name or type(root).__name__!r} normalises with batch statistics"
    return None
