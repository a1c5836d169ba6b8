"""The one state vocabulary of deqlab: a DEQ state is a tensor ``(B, ...)`` or a list of such tensors.

Why one module: solvers iterate on flat ``(B, N)`` vectors while layers and multiscale maps see
structured states (one tensor, or one tensor per resolution). Every conversion between the two, the
per-sample norms the termination tests and the layers share, and the type alias ``State`` live here
once, so a solver and a layer can never disagree on what "the residual of a sample" means. Pure torch.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "State",
    "StatePacker",
    "as_parts",
    "batch_dot",
    "batch_norm",
    "detach",
    "flatten",
    "from_parts",
    "make_flat_map",
    "per_sample_norm",
    "shapes_of",
    "unflatten",
]

_HALF = (torch.float16, torch.bfloat16)

#: A DEQ state: one batch-first tensor, or a list of batch-first tensors (multiscale models).
State = Union[Tensor, List[Tensor]]


def as_parts(state: State) -> List[Tensor]:
    """A state as a list of tensors (a single tensor becomes a one-element list)."""
    if isinstance(state, Tensor):
        return [state]
    return list(state)


def from_parts(parts: Sequence[Tensor], is_list: bool) -> State:
    """Inverse of :func:`as_parts`."""
    return list(parts) if is_list else parts[0]


def _sample_size(t: Tensor) -> int:
    return t[0].numel() if t.shape[0] else int(torch.Size(t.shape[1:]).numel())


def flatten(parts: Sequence[Tensor]) -> Tensor:
    """Concatenate per-sample flattened parts into one ``(B, N)`` tensor (a free view for one part)."""
    if len(parts) == 1:
        return parts[0].reshape(parts[0].shape[0], -1)
    return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> List[Tensor]:
    """Split a ``(B, N)`` tensor back into tensors shaped like ``like``."""
    if len(like) == 1:
        return [flat.reshape(like[0].shape)]
    chunks = torch.split(flat, [_sample_size(p) for p in like], dim=1)
    return [c.reshape(p.shape) for c, p in zip(chunks, like)]


def shapes_of(state: State) -> Union[Tuple[int, ...], List[Tuple[int, ...]]]:
    """Shape of a tensor state, or the list of shapes of a list state (for error messages)."""
    if isinstance(state, Tensor):
        return tuple(state.shape)
    return [tuple(s.shape) for s in state]


def detach(state: State) -> State:
    """The state without its autograd history, with the same structure."""
    if isinstance(state, Tensor):
        return state.detach()
    return [s.detach() for s in state]


def batch_norm(v: Tensor, kind: str = "l2") -> Tensor:
    """Per-sample norm of a ``(B, N)`` tensor: ``l2`` or dimension-independent ``rms`` (``l2 / sqrt(N)``).

    float16/bfloat16 inputs give a float32 norm; other dtypes keep theirs.
    """
    # Half-precision sums of squares overflow (float16 at entries of 256), so their norms are float32.
    n = torch.linalg.vector_norm(v, dim=1, dtype=torch.float32 if v.dtype in _HALF else None)
    if kind == "rms":
        n = n / (max(v.shape[1], 1) ** 0.5)
    return n


def per_sample_norm(parts: Sequence[Tensor], norm: str = "l2") -> Tensor:
    """Per-sample L2 (or RMS) norm of a state given as parts; shape ``(B,)``."""
    return batch_norm(flatten(parts), norm)


def batch_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product of two ``(B, N)`` tensors, shape ``(B,)``."""
    return (a * b).sum(dim=1)


class StatePacker:
    """Remembers the structure of ``z0`` so flat ``(B, N)`` vectors can be turned back into states.

    A single tensor is flattened with a view (free); a list is concatenated.
    """

    def __init__(self, z0: State):
        if isinstance(z0, Tensor):
            self.is_list = False
            tensors: Sequence[Tensor] = [z0]
        elif isinstance(z0, (list, tuple)) and len(z0) > 0 and all(isinstance(t, Tensor) for t in z0):
            self.is_list = True
            tensors = list(z0)
        else:
            raise TypeError(
                f"z0 must be a tensor of shape (B, ...) or a non-empty list of such tensors, got {type(z0).__name__}"
            )
        first = tensors[0]
        if first.dim() < 1:
            raise ValueError("z0 must be batch-first with at least one dimension (B, ...); got a scalar")
        self.batch = first.shape[0]
        self.dtype = first.dtype
        self.device = first.device
        for t in tensors:
            if t.shape[0] != self.batch:
                raise ValueError(
                    f"every state tensor must share the batch size {self.batch}; got shapes {[tuple(t.shape) for t in tensors]}"
                )
            if t.dtype != self.dtype:
                raise ValueError(f"every state tensor must share one dtype; got {[t.dtype for t in tensors]}")
            if not t.is_floating_point():
                raise TypeError(f"solver states must be floating point, got {t.dtype}")
        self.shapes: List[torch.Size] = [t.shape for t in tensors]
        self.sizes: List[int] = [_sample_size(t) for t in tensors]
        self.numel = sum(self.sizes)

    def flatten(self, z: State) -> Tensor:
        # Explicit per-sample sizes (not -1), so an empty batch flattens to (0, N) too.
        if not self.is_list:
            return z.reshape(self.batch, self.sizes[0])
        return torch.cat([t.reshape(self.batch, n) for t, n in zip(z, self.sizes)], dim=1)

    def unflatten(self, flat: Tensor) -> State:
        if not self.is_list:
            return flat.view(self.shapes[0])
        parts = torch.split(flat, self.sizes, dim=1)
        return [p.reshape(s) for p, s in zip(parts, self.shapes)]

    def resized(self, batch: int) -> "StatePacker":
        """The packer of the same state structure for ``batch`` samples (a sub-batch of a solve).

        Why: per-sample early exit evaluates ``f`` on the samples still iterating; their flat ``(b, N)``
        rows must unflatten to states of ``b`` samples with the same per-sample shapes.

        Args:
            batch: the number of samples of the new packer.

        Returns:
            A :class:`StatePacker` equal to this one except for the batch size.

        Example:
            >>> import torch
            >>> from deqlab.state import StatePacker
            >>> packer = StatePacker([torch.zeros(4, 2), torch.zeros(4, 3, 3)])
            >>> [tuple(s) for s in packer.resized(2).shapes]
            [(2, 2), (2, 3, 3)]
        """
        new = object.__new__(StatePacker)
        new.__dict__.update(self.__dict__)
        new.batch = int(batch)
        new.shapes = [torch.Size((int(batch), *s[1:])) for s in self.shapes]
        return new

    def describe(self, z: object) -> str:
        if isinstance(z, Tensor):
            return f"tensor {tuple(z.shape)} {z.dtype}"
        if isinstance(z, (list, tuple)) and all(isinstance(t, Tensor) for t in z):
            return "[" + ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in z) + "]"
        return type(z).__name__

    def check_output(self, fz: object) -> None:
        """Fail loudly when ``f`` returns something the solver cannot iterate on."""
        expected = "tensor" if not self.is_list else f"list of {len(self.shapes)} tensors"
        if self.is_list:
            ok = isinstance(fz, (list, tuple)) and len(fz) == len(self.shapes) and all(
                isinstance(t, Tensor) for t in fz
            )
            tensors = list(fz) if ok else []
        else:
            ok = isinstance(fz, Tensor)
            tensors = [fz] if ok else []
        if not ok:
            raise TypeError(f"the map must return a state shaped like z: expected a {expected} like z0, "
                            f"got {self.describe(fz)}")
        for t, shape in zip(tensors, self.shapes):
            if t.shape != shape:
                expected_shapes = [tuple(s) for s in self.shapes] if self.is_list else tuple(self.shapes[0])
                raise ValueError(
                    f"the map must return a state shaped like z: expected {expected_shapes}, got {self.describe(fz)}"
                )
            if t.dtype != self.dtype:
                raise ValueError(f"the map must return the dtype of its input: expected {self.dtype}, got {t.dtype}")


def make_flat_map(f: Callable[[State], State], packer: StatePacker) -> Callable[[Tensor], Tensor]:
    """Wrap ``f`` to act on flat ``(B, N)`` vectors; checks the first output's shape and dtype once."""
    checked = False

    def flat_f(z: Tensor) -> Tensor:
        nonlocal checked
        out = f(packer.unflatten(z))
        if not checked:
            packer.check_output(out)
            checked = True
        return packer.flatten(out)

    return flat_f
