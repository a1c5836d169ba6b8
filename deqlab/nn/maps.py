"""The DEQ map as the solver sees it: ``z -> f(z, x)`` with a one-time check of what ``f`` returns.

Why a shared helper: every layer (discrete DEQs, their multiscale versions and the multiscale neural ODE)
hands the solver a closure over the injection ``x``. A model that returns the wrong shape, dtype or type
must fail on the first evaluation with a message that names what was expected, not deep inside a solver
with a reshape error; after that first evaluation the check costs nothing.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from deqlab.state import State, as_parts

__all__ = ["CheckedMap", "describe_state", "format_shape"]


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

    The first call raises :class:`ValueError` when ``fn`` fails on the state (naming both shapes and dtypes,
    the usual cause being an ``x`` the model does not expect or a missing ``z_shape``/``init``), returns
    something that is not a state shaped like ``z`` ("the DEQ map must return a state shaped like z"), or
    returns another dtype. ``checked`` is ``True`` once a call passed.
    """

    def __init__(self, fn: Callable[[State, Tensor], State], x: Tensor, *, name: str = "DEQ"):
        self.fn = fn
        self.x = x
        self.name = name
        self.checked = False

    def __call__(self, z: State) -> State:
        if self.checked:
            return self.fn(z, self.x)
        zp = as_parts(z)
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
                f"when the state differs from x in shape. Original error: {err}") from err
        op = list(out) if isinstance(out, (list, tuple)) else [out]
        ok = isinstance(out, Tensor) if isinstance(z, Tensor) else isinstance(out, (list, tuple))
        ok = ok and len(op) == len(zp) and all(isinstance(o, Tensor) for o in op) and \
            all(a.shape == b.shape for a, b in zip(zp, op))
        if not ok:
            raise ValueError(f"{self.name}: the DEQ map must return a state shaped like z: expected "
                             f"{describe_state(z)}, got {describe_state(out)}")
        if any(a.dtype != b.dtype for a, b in zip(zp, op)):
            raise ValueError(f"{self.name}: the DEQ map returned dtype {op[0].dtype} for a state of dtype "
                             f"{zp[0].dtype}; cast x (dtype {self.x.dtype}) or the model to one dtype")
        self.checked = True
        return out if isinstance(out, Tensor) else list(out)
