"""Helpers for DEQ states that are either one tensor ``(B, ...)`` or a list of tensors (multiscale)."""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

State = Union[Tensor, List[Tensor]]


def as_parts(state: State) -> List[Tensor]:
    """A state as a list of tensors (a single tensor becomes a one-element list)."""
    if isinstance(state, Tensor):
        return [state]
    return list(state)


def from_parts(parts: Sequence[Tensor], is_list: bool) -> State:
    """Inverse of :func:`as_parts`."""
    return list(parts) if is_list else parts[0]


def flatten(parts: Sequence[Tensor]) -> Tensor:
    """Concatenate per-sample flattened parts into one ``(B, N)`` tensor."""
    if len(parts) == 1:
        return parts[0].reshape(parts[0].shape[0], -1)
    return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> List[Tensor]:
    """Split a ``(B, N)`` tensor back into tensors shaped like ``like``."""
    sizes = [p[0].numel() if p.shape[0] else int(torch.Size(p.shape[1:]).numel()) for p in like]
    chunks = torch.split(flat, sizes, dim=1) if len(like) > 1 else (flat,)
    return [c.reshape(p.shape) for c, p in zip(chunks, like)]


def shapes_of(state: State) -> Union[Tuple[int, ...], List[Tuple[int, ...]]]:
    if isinstance(state, Tensor):
        return tuple(state.shape)
    return [tuple(s.shape) for s in state]


def detach(state: State) -> State:
    if isinstance(state, Tensor):
        return state.detach()
    return [s.detach() for s in state]


def per_sample_norm(parts: Sequence[Tensor], norm: str = "l2") -> Tensor:
    """Per-sample L2 (or RMS) norm of a state given as parts; shape ``(B,)``."""
    flat = flatten(parts)
    n = torch.linalg.vector_norm(flat, dim=1)
    if norm == "rms":
        n = n / max(flat.shape[1], 1) ** 0.5
    return n
