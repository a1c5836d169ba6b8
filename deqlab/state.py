"""The one state vocabulary of deqlab: a DEQ state is a tensor ``(B, ...)`` or a list of such tensors.

Why one module: solvers iterate on flat ``(B, N)`` vectors while layers and multiscale maps see
structured states (one tensor, or one tensor per resolution). Every conversion between the two, the
per-sample norms the termination tests and the layers share, and the type alias ``State`` live here
once, so a solver and a layer can never disagree on what "the residual of a sample" means. Pure torch.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union, cast

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


def as_parts(state: Union[Tensor, Sequence[Tensor]]) -> List[Tensor]:
    """A state as a list of tensors (a single tensor becomes a one-element list).

    Why: code that handles single-tensor and multiscale states alike iterates over parts; this is the
    one place that decides what the parts of a state are. [`from_parts`][deqlab.state.from_parts] undoes it.

    Args:
        state: a batch-first tensor ``(B, ...)``, or a list (or tuple) of such tensors.

    Returns:
        A new list of the tensors themselves (not copies); one element for a tensor state.

    Example:
        >>> import torch
        >>> from deqlab.state import as_parts, shapes_of
        >>> shapes_of(as_parts(torch.zeros(2, 3)))
        [(2, 3)]
        >>> shapes_of(as_parts([torch.zeros(2, 3), torch.zeros(2, 4, 4)]))
        [(2, 3), (2, 4, 4)]
    """
    if isinstance(state, Tensor):
        return [state]
    return list(state)


def from_parts(parts: Sequence[Tensor], is_list: bool) -> State:
    """Inverse of [`as_parts`][deqlab.state.as_parts]: the parts as the state structure they came from.

    Args:
        parts: the tensors of the state, in order.
        is_list: ``True`` when the original state was a list (the parts come back as a new list),
            ``False`` for a single-tensor state (``parts[0]`` comes back). Passed explicitly because a
            one-element list and a tensor have the same parts.

    Returns:
        A list of the tensors, or the single tensor ``parts[0]``.

    Example:
        >>> import torch
        >>> from deqlab.state import as_parts, from_parts
        >>> z = torch.zeros(2, 3)
        >>> from_parts(as_parts(z), is_list=False) is z
        True
        >>> type(from_parts(as_parts([z]), is_list=True)).__name__
        'list'
    """
    return list(parts) if is_list else parts[0]


def _sample_size(t: Tensor) -> int:
    return t[0].numel() if t.shape[0] else int(torch.Size(t.shape[1:]).numel())


def flatten(parts: Sequence[Tensor]) -> Tensor:
    """Concatenate per-sample flattened parts into one ``(B, N)`` tensor (a free view for one part).

    Why: solvers iterate on flat vectors, one row per sample; ``N`` is the total number of entries of
    one sample across all parts. [`unflatten`][deqlab.state.unflatten] undoes it.

    Args:
        parts: batch-first tensors sharing the batch size ``B`` (e.g. from [`as_parts`][deqlab.state.as_parts]).

    Returns:
        A ``(B, N)`` tensor: a view of the part when there is one, else a new concatenated tensor.

    Example:
        >>> import torch
        >>> from deqlab.state import flatten
        >>> flatten([torch.ones(2, 3), torch.zeros(2, 2, 4)]).shape
        torch.Size([2, 11])
    """
    if len(parts) == 1:
        return parts[0].reshape(parts[0].shape[0], -1)
    return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> List[Tensor]:
    """Split a ``(B, N)`` tensor back into tensors shaped like ``like``; the inverse of [`flatten`][deqlab.state.flatten].

    Args:
        flat: a ``(B, N)`` tensor whose ``N`` is the per-sample size of all of ``like`` together.
        like: tensors with the target shapes (only their shapes are read).

    Returns:
        A list of tensors with the shapes of ``like``, in order (views of ``flat`` where possible).

    Example:
        >>> import torch
        >>> from deqlab.state import shapes_of, unflatten
        >>> like = [torch.zeros(2, 3), torch.zeros(2, 2, 4)]
        >>> shapes_of(unflatten(torch.arange(22.0).reshape(2, 11), like))
        [(2, 3), (2, 2, 4)]
    """
    if len(like) == 1:
        return [flat.reshape(like[0].shape)]
    chunks = torch.split(flat, [_sample_size(p) for p in like], dim=1)
    return [c.reshape(p.shape) for c, p in zip(chunks, like)]


def shapes_of(state: State) -> Union[Tuple[int, ...], List[Tuple[int, ...]]]:
    """Shape of a tensor state, or the list of shapes of a list state (for error messages).

    Args:
        state: a tensor or a list of tensors.

    Returns:
        A tuple of ints for a tensor, or a list of such tuples for a list state.

    Example:
        >>> import torch
        >>> from deqlab.state import shapes_of
        >>> shapes_of(torch.zeros(2, 3))
        (2, 3)
        >>> shapes_of([torch.zeros(2, 3), torch.zeros(2, 1, 4)])
        [(2, 3), (2, 1, 4)]
    """
    if isinstance(state, Tensor):
        return tuple(state.shape)
    return [tuple(s.shape) for s in state]


def detach(state: State) -> State:
    """The state without its autograd history, with the same structure.

    Args:
        state: a tensor or a list of tensors.

    Returns:
        ``state.detach()`` for a tensor, or a new list of detached tensors (sharing storage with the
        originals, as `torch.Tensor.detach` does).

    Example:
        >>> import torch
        >>> from deqlab.state import detach
        >>> z = 2 * torch.ones(2, 3, requires_grad=True)
        >>> detach(z).requires_grad, [t.requires_grad for t in detach([z, z])]
        (False, [False, False])
    """
    if isinstance(state, Tensor):
        return state.detach()
    return [s.detach() for s in state]


def batch_norm(v: Tensor, kind: str = "l2") -> Tensor:
    """Per-sample norm of a ``(B, N)`` tensor: ``l2`` or dimension-independent ``rms`` (``l2 / sqrt(N)``).

    float16/bfloat16 inputs give a float32 norm; other dtypes keep theirs.

    Args:
        v: a flat ``(B, N)`` tensor.
        kind: ``"l2"`` (default, the norm of the reference package's termination tests) or ``"rms"``,
            under which one tolerance means the same for a state of 4 and of 100 000 numbers. Any other
            value gives the L2 norm: the value is not checked here (this runs every solver step);
            [`TerminationCondition`][deqlab.solvers.TerminationCondition] validates it once.

    Returns:
        The ``(B,)`` per-sample norms (float32 for half-precision ``v``, else ``v``'s dtype).

    Example:
        >>> import torch
        >>> from deqlab.state import batch_norm
        >>> v = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
        >>> batch_norm(v)
        tensor([5., 1.])
        >>> batch_norm(v, "rms")
        tensor([3.5355, 0.7071])
        >>> batch_norm(v.half()).dtype
        torch.float32
    """
    # Half-precision sums of squares overflow (float16 at entries of 256), so their norms are float32.
    n = torch.linalg.vector_norm(v, dim=1, dtype=torch.float32 if v.dtype in _HALF else None)
    if kind == "rms":
        n = n / (max(v.shape[1], 1) ** 0.5)
    return n


def per_sample_norm(parts: Sequence[Tensor], norm: str = "l2") -> Tensor:
    """Per-sample L2 (or RMS) norm of a state given as parts; shape ``(B,)``.

    Args:
        parts: the state's tensors (see [`as_parts`][deqlab.state.as_parts]); the norm runs over all of a sample's entries.
        norm: ``"l2"`` (default) or ``"rms"``, as in [`batch_norm`][deqlab.state.batch_norm]; the default matches the
            solvers' default norm, so a layer reports residuals the way its solver measured them.

    Returns:
        The ``(B,)`` norms (float32 for half-precision parts).

    Example:
        >>> import torch
        >>> from deqlab.state import per_sample_norm
        >>> per_sample_norm([torch.ones(2, 3), torch.ones(2, 1)])
        tensor([2., 2.])
    """
    return batch_norm(flatten(parts), norm)


def batch_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product of two ``(B, N)`` tensors, shape ``(B,)``.

    Args:
        a: a ``(B, N)`` tensor.
        b: a tensor of the same shape (or broadcastable to it).

    Returns:
        The ``(B,)`` tensor of ``sum_j a[i, j] * b[i, j]``.

    Example:
        >>> import torch
        >>> from deqlab.state import batch_dot
        >>> batch_dot(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
        tensor([3., 4.])
    """
    return (a * b).sum(dim=1)


class StatePacker:
    """Remembers the structure of ``z0`` so flat ``(B, N)`` vectors can be turned back into states.

    A single tensor is flattened with a view (free); a list is concatenated. Every solver builds one
    from its ``z0`` and validates it here, so a malformed initial guess fails before ``f`` is called.

    Args:
        z0: the initial guess: a floating-point tensor ``(B, ...)`` or a non-empty list (or tuple) of
            such tensors sharing the batch size ``B`` and one dtype.

    Attributes:
        is_list: whether ``z0`` was a list (states are unflattened as lists).
        batch: the batch size ``B``.
        dtype: the state's dtype.
        device: the device of the first tensor.
        shapes: the shape of each tensor.
        sizes: the per-sample number of entries of each tensor.
        numel: ``N = sum(sizes)``, the width of the flat vectors.

    Raises:
        TypeError: ``z0`` is neither a tensor nor a non-empty list of tensors, or its dtype is not
            floating point.
        ValueError: ``z0`` is a 0-dimensional tensor (no batch dimension), or its tensors differ in
            batch size or dtype.

    Example:
        >>> import torch
        >>> from deqlab.state import StatePacker, shapes_of
        >>> packer = StatePacker([torch.zeros(2, 3), torch.zeros(2, 2, 4)])
        >>> packer.batch, packer.numel, packer.sizes
        (2, 11, [3, 8])
        >>> flat = packer.flatten([torch.ones(2, 3), torch.ones(2, 2, 4)])
        >>> flat.shape
        torch.Size([2, 11])
        >>> shapes_of(packer.unflatten(flat))
        [(2, 3), (2, 2, 4)]
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
        """A state with ``z0``'s structure as one ``(B, N)`` tensor (a view for a tensor state)."""
        # Explicit per-sample sizes (not -1), so an empty batch flattens to (0, N) too.
        if not self.is_list:
            return cast(Tensor, z).reshape(self.batch, self.sizes[0])  # z0's structure: a tensor
        return torch.cat([t.reshape(self.batch, n) for t, n in zip(z, self.sizes)], dim=1)

    def unflatten(self, flat: Tensor) -> State:
        """A ``(B, N)`` tensor as a state with ``z0``'s structure (views of ``flat``)."""
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
            A [`StatePacker`][deqlab.state.StatePacker] equal to this one except for the batch size.

        Example:
            >>> import torch
            >>> from deqlab.state import StatePacker
            >>> packer = StatePacker([torch.zeros(4, 2), torch.zeros(4, 3, 3)])
            >>> small = packer.resized(2)
            >>> small.batch, small.numel, tuple(small.shapes[1])
            (2, 11, (2, 3, 3))
        """
        new = object.__new__(StatePacker)
        new.__dict__.update(self.__dict__)
        new.batch = int(batch)
        new.shapes = [torch.Size((int(batch), *s[1:])) for s in self.shapes]
        return new

    def describe(self, z: object) -> str:
        """Shapes and dtypes of ``z`` as short text, for error messages."""
        if isinstance(z, Tensor):
            return f"tensor {tuple(z.shape)} {z.dtype}"
        if isinstance(z, (list, tuple)) and all(isinstance(t, Tensor) for t in z):
            return "[" + ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in z) + "]"
        return type(z).__name__

    def check_output(self, fz: object) -> None:
        """Fail loudly when ``f`` returns something the solver cannot iterate on.

        Raises:
            TypeError: ``fz`` is not a tensor (tensor state) or a list of as many tensors (list state).
            ValueError: a tensor of ``fz`` differs from ``z0``'s in shape, dtype or device.
        """
        expected = "tensor" if not self.is_list else f"list of {len(self.shapes)} tensors"
        if self.is_list:
            ok = (
                isinstance(fz, (list, tuple)) and len(fz) == len(self.shapes) and all(isinstance(t, Tensor) for t in fz)
            )
            tensors = list(cast(Sequence[Tensor], fz)) if ok else []  # ok: a list of tensors
        else:
            ok = isinstance(fz, Tensor)
            tensors = [fz] if isinstance(fz, Tensor) else []
        if not ok:
            raise TypeError(
                f"the map must return a state shaped like z: expected a {expected} like z0, got {self.describe(fz)}"
            )
        for t, shape in zip(tensors, self.shapes):
            if t.shape != shape:
                expected_shapes = [tuple(s) for s in self.shapes] if self.is_list else tuple(self.shapes[0])
                raise ValueError(
                    f"the map must return a state shaped like z: expected {expected_shapes}, got {self.describe(fz)}"
                )
            if t.dtype != self.dtype:
                raise ValueError(f"the map must return the dtype of its input: expected {self.dtype}, got {t.dtype}")
            if t.device != self.device:
                raise ValueError(
                    f"the map must return a state on the device of its input: expected device "
                    f"{self.device}, got {t.device}; keep the map's parameters and inputs on the "
                    f"device of z0"
                )


def version_of(t: Tensor) -> Optional[int]:
    """``t._version`` (bumped by every in-place operation on ``t`` or a view of it), or ``None`` for an
    inference-mode tensor, which has no version counter."""
    try:
        return t._version
    except RuntimeError:
        return None


IN_PLACE_HINT = (
    "e.g. nn.ReLU(inplace=True) or z.add_(...) applied to z itself. The solver keeps its iterates "
    "(and the backward differentiates at z*), so changing the input corrupts the solve: use the "
    "out-of-place op (nn.ReLU(), z + 1), or clone z first inside the map (z = z.clone())"
)


def make_flat_map(f: Callable[[State], State], packer: StatePacker) -> Callable[[Tensor], Tensor]:
    """Wrap ``f`` to act on flat ``(B, N)`` vectors; checks the first output's shape and dtype once.

    Why once: a map that returns the wrong structure does so on its first call, and checking every
    call would cost a Python loop per solver step.

    Args:
        f: the map on structured states (a tensor or a list of tensors, as ``packer`` describes).
        packer: the [`StatePacker`][deqlab.state.StatePacker] of the solve's ``z0``.

    Returns:
        ``flat_f(z)``: ``packer.flatten(f(packer.unflatten(z)))``.

    Raises:
        TypeError: on the first call of ``flat_f``, when ``f`` returns something that is not a state of
            ``z0``'s structure (see `StatePacker.check_output`).
        ValueError: on the first call of ``flat_f``, when ``f`` returns a state not shaped like ``z0``, of
            another dtype or on another device, or modified its input in place (the check that makes it
            safe for the solver to keep its iterates).

    Example:
        >>> import torch
        >>> from deqlab.state import StatePacker, make_flat_map
        >>> packer = StatePacker([torch.zeros(2, 3), torch.zeros(2, 1)])
        >>> F = make_flat_map(lambda zs: [2 * zs[0], zs[1] - 1], packer)
        >>> F(torch.ones(2, 4))
        tensor([[2., 2., 2., 0.],
                [2., 2., 2., 0.]])
        >>> make_flat_map(lambda zs: zs[0], packer)(torch.ones(2, 4))
        Traceback (most recent call last):
        ...
        TypeError: the map must return a state shaped like z: expected a list of 2 tensors like z0,
            got tensor (2, 3) torch.float32
    """
    checked = False

    def flat_f(z: Tensor) -> Tensor:
        nonlocal checked
        if checked:
            return packer.flatten(f(packer.unflatten(z)))
        version = version_of(z)
        out = f(packer.unflatten(z))
        if version is not None and version_of(z) != version:
            raise ValueError(f"the map modified its input z in place ({IN_PLACE_HINT})")
        packer.check_output(out)
        checked = True
        return packer.flatten(out)

    return flat_f
