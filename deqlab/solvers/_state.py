"""Flatten solver states to one ``(B, N)`` tensor and back.

Why: every algorithm works on a batch of flat vectors, so it is written once for dense, image and
multiscale (list) states. A single tensor is flattened with a view (free); a list is concatenated.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Union

import torch
from torch import Tensor

State = Union[Tensor, List[Tensor]]


class StatePacker:
    """Remembers the structure of ``z0`` so flat vectors can be turned back into states."""

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
        self.sizes: List[int] = [t[0].numel() if t.shape[0] else int(torch.Size(t.shape[1:]).numel()) for t in tensors]
        self.numel = sum(self.sizes)

    def flatten(self, z: State) -> Tensor:
        if not self.is_list:
            return z.reshape(self.batch, -1)
        return torch.cat([t.reshape(self.batch, -1) for t in z], dim=1)

    def unflatten(self, flat: Tensor) -> State:
        if not self.is_list:
            return flat.view(self.shapes[0])
        parts = torch.split(flat, self.sizes, dim=1)
        return [p.reshape(s) for p, s in zip(parts, self.shapes)]

    def describe(self, z: State) -> str:
        if isinstance(z, Tensor):
            return f"tensor {tuple(z.shape)} {z.dtype}"
        return "[" + ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in z) + "]"

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
            raise TypeError(f"f must return a {expected} like z0, got {type(fz).__name__}")
        for t, shape in zip(tensors, self.shapes):
            if t.shape != shape:
                expected_shapes = [tuple(s) for s in self.shapes] if self.is_list else tuple(self.shapes[0])
                raise ValueError(
                    f"f must return the shape of its input: expected {expected_shapes}, got {self.describe(fz)}"
                )
            if t.dtype != self.dtype:
                raise ValueError(f"f must return the dtype of its input: expected {self.dtype}, got {t.dtype}")


def make_flat_map(f: Callable[[State], State], packer: StatePacker) -> Callable[[Tensor], Tensor]:
    """Wrap ``f`` to act on flat ``(B, N)`` vectors; checks the first output's shape and dtype once."""
    checked = [False]

    def flat_f(z: Tensor) -> Tensor:
        out = f(packer.unflatten(z))
        if not checked[0]:
            packer.check_output(out)
            checked[0] = True
        return packer.flatten(out)

    return flat_f


def batch_norm(v: Tensor, kind: str) -> Tensor:
    """Per-sample norm of a ``(B, N)`` tensor: ``l2`` or dimension-independent ``rms``."""
    n = torch.linalg.vector_norm(v, dim=1)
    if kind == "rms":
        n = n / (v.shape[1] ** 0.5)
    return n


def batch_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product of two ``(B, N)`` tensors, shape ``(B,)``."""
    return (a * b).sum(dim=1)
