"""Initial guesses ``u0`` of a DEQ solve, as strategy objects.

Why strategies: what distinguishes a vanilla DEQ, a Skip DEQ and a Skip Reg. DEQ (Pal et al. 2022) is
only where the solve starts and which extra loss trains that start. Keeping that in one small object per
variant lets [`DeepEquilibriumNetwork`][deqlab.nn.DeepEquilibriumNetwork] stay one class, and lets a researcher try a new
start (an EMA of past fixed points, a cached solution, a coarse solve) by writing one class and passing
it as ``init=``, without touching deqlab.

The contract is the protocol [`GuessStrategy`][deqlab.nn.GuessStrategy]: a layer accepts any object with its four
members. [`InitialGuess`][deqlab.nn.InitialGuess] is the convenient base class that implements it as an ``nn.Module`` (so
a learned predictor's parameters are registered with the layer and move with ``.to()``), with no-op
defaults for all but ``forward``:

* ``forward(x, f) -> u0``: the initial state for the batch ``x``; ``f`` is the DEQ map ``z -> f(z, x)``
  (checked on its first call), for guesses that evaluate it. ``u0`` may carry gradients.
* ``start(u0) -> state``: what the solver (or the fixed-depth unroll) starts from; ``u0`` itself by
  default. The solver always runs without a graph; this matters for the fixed-depth unroll.
* ``skip_loss(u0, z_star) -> Tensor | None``: the extra loss that trains the guess (``None``: none; the
  layer then reports a zero scalar as ``solution.skip_loss``).
* ``observe(x, z_star)``: called after every forward with the (detached) fixed point, for guesses that
  learn from past solves without gradients. No-op by default.
"""

from __future__ import annotations

from typing import Any, Callable, List, Literal, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from deqlab.state import State, as_parts, detach

__all__ = ["FunctionGuess", "InitialGuess", "MapGuess", "ShortcutGuess", "ZeroGuess", "skip_loss"]

SkipLoss = Literal["l1", "l2"]
#: A per-sample state shape ``(C, H, W)``, or one shape per scale of a list state.
StateShape = Union[Sequence[int], Sequence[Sequence[int]]]


def _normalise_shape(shape: Optional[StateShape], owner: str):
    if shape is None:
        return None
    dims: List[Any] = list(shape)
    if all(isinstance(d, int) for d in dims):
        return tuple(int(d) for d in dims)
    if all(isinstance(s, (list, tuple)) and all(isinstance(d, int) for d in s) for s in dims) and dims:
        return [tuple(int(d) for d in s) for s in dims]
    raise ValueError(
        f"{owner}: shape must be a per-sample shape like (C, H, W) or a list of them (one per scale), got {dims!r}"
    )


def zero_state(x: Tensor, shape) -> State:
    """Zeros for the batch of ``x``: shaped like ``x`` (``shape=None``), ``(B, *shape)``, or a list of them."""
    if shape is None:
        return torch.zeros_like(x)
    if isinstance(shape, list):
        return [x.new_zeros((x.shape[0], *s)) for s in shape]
    return x.new_zeros((x.shape[0], *shape))


def skip_loss(u0: State, z_star: State, kind: SkipLoss = "l1", detach_target: bool = True) -> Tensor:
    """``mean |u0 − z*|`` (``"l1"``, the paper's) or ``mean (u0 − z*)²`` (``"l2"``) over every element.

    With ``detach_target`` the fixed point is a constant target: the loss trains the predictor of
    ``u0`` and does not pull ``z*`` towards it (which would also cost a second adjoint solve).
    """
    total: Optional[Tensor] = None
    count = 0
    for a, b in zip(as_parts(u0), as_parts(z_star)):
        b = b.detach() if detach_target else b
        d = (a - b).abs() if kind == "l1" else (a - b).pow(2)
        total = d.sum() if total is None else total + d.sum()
        count += d.numel()
    assert total is not None  # a state has at least one part
    return total / count


def _check_kind(owner: str, kind: str) -> None:
    if kind not in ("l1", "l2"):
        raise ValueError(f"{owner}: skip_loss must be 'l1' or 'l2', got {kind!r}")


class InitialGuess(nn.Module):
    """Base class of initial-guess strategies: implements [`GuessStrategy`][deqlab.nn.GuessStrategy] as an ``nn.Module``.

    Subclass it and implement `forward`; override `start`, `skip_loss` or
    `observe` when the strategy needs them. Pass an instance as ``init=`` to a DEQ layer. Inheriting is a
    convenience, not a requirement: any object with the protocol's members is accepted as ``init=``.

    Example:
        A strategy that starts every solve from the injection itself:

        >>> import torch
        >>> from torch import nn
        >>> from deqlab.nn import DEQ, InitialGuess
        >>> from deqlab.solvers import DiscreteDEQSolver
        >>> class StartAtX(InitialGuess):
        ...     def forward(self, x, f):
        ...         return x.clone()
        >>> class Half(nn.Module):
        ...     def forward(self, z, x):
        ...         return 0.5 * z + x
        >>> solver = DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-6, max_steps=30)
        >>> z_star, solution = DEQ(Half(), solver, init=StartAtX())(torch.ones(2, 3))
        >>> solution.u0.tolist(), solution.status.value
        ([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], 'converged')
    """

    def forward(self, x: Tensor, f: Callable[[State], State]) -> State:  # pragma: no cover - interface
        """The initial state ``u0`` for the batch ``x``.

        Args:
            x: the layer's input (injection), batch-first.
            f: the DEQ map ``z -> f(z, x)`` (checked on its first call), for guesses that evaluate it.

        Returns:
            ``u0``: a tensor, or a list of tensors for a list state; it may carry gradients.

        Raises:
            NotImplementedError: always here; subclasses implement it.
        """
        raise NotImplementedError

    def start(self, u0: State) -> State:
        """The state the solve starts from (``u0`` itself by default)."""
        return u0

    def skip_loss(self, u0: State, z_star: State) -> Optional[Tensor]:
        """The loss that trains the guess, or ``None`` when the guess has none."""
        return None

    def observe(self, x: Tensor, z_star: State) -> None:
        """Called after each forward with the detached fixed point (no-op by default)."""


class ZeroGuess(InitialGuess):
    """``u0 = 0`` (the vanilla DEQ): the start that assumes nothing about the fixed point and adds no
    parameters.

    Args:
        shape: per-sample state shape when it differs from ``x`` (reduced-dimension DEQs), e.g. ``(8,)``,
            or a list of shapes for a multiscale (list) state. Default ``None``: zeros shaped like ``x``,
            right for maps whose state and injection have the same shape.
        fixed_point_penalty: give the guess a "skip loss" ``mean |0 − z*| = mean |z*|`` (``z*`` not
            detached), so that a skip-loss weight λ adds ``λ · mean |z*|`` to a vanilla model's loss, as
            the January-2022 reference code did for every model type. Default ``False``: the paper
            describes no such penalty, and a vanilla DEQ has no guess to train.

    Raises:
        ValueError: ``shape`` is neither a per-sample shape nor a list of them.

    Example:
        >>> import torch
        >>> from deqlab.nn import ZeroGuess
        >>> x = torch.ones(2, 3)
        >>> ZeroGuess()(x, None).shape                  # shaped like x (f is not used)
        torch.Size([2, 3])
        >>> ZeroGuess(shape=(8,))(x, None).shape        # reduced-dimension state
        torch.Size([2, 8])
        >>> [tuple(t.shape) for t in ZeroGuess(shape=[(4, 2, 2), (8, 1, 1)])(x, None)]   # multiscale
        [(2, 4, 2, 2), (2, 8, 1, 1)]
        >>> float(ZeroGuess(fixed_point_penalty=True).skip_loss(x.new_zeros(2, 3), -x))   # mean |z*|
        1.0
    """

    def __init__(self, shape: Optional[StateShape] = None, *, fixed_point_penalty: bool = False):
        super().__init__()
        self.shape = _normalise_shape(shape, "ZeroGuess")
        self.fixed_point_penalty = bool(fixed_point_penalty)

    def forward(self, x: Tensor, f: Callable[[State], State]) -> State:
        return zero_state(x, self.shape)

    def skip_loss(self, u0: State, z_star: State) -> Optional[Tensor]:
        """``mean |z*|`` with ``fixed_point_penalty``, else ``None`` (no loss: zeros have nothing to learn)."""
        if not self.fixed_point_penalty:
            return None
        return skip_loss(u0, z_star, "l1", detach_target=False)

    def extra_repr(self) -> str:
        return f"shape={self.shape}" + (", fixed_point_penalty=True" if self.fixed_point_penalty else "")


class _SkipGuess(InitialGuess):
    """Shared configuration of the two Skip variants: the skip loss kind and its target coupling."""

    def __init__(self, skip_loss: SkipLoss, detach_skip_target: bool):
        super().__init__()
        _check_kind(type(self).__name__, skip_loss)
        self.skip_loss_kind: SkipLoss = skip_loss
        self.detach_skip_target = bool(detach_skip_target)

    def skip_loss(self, u0: State, z_star: State) -> Optional[Tensor]:
        _check_kind(type(self).__name__, self.skip_loss_kind)
        return skip_loss(u0, z_star, self.skip_loss_kind, self.detach_skip_target)


class _PerScale(nn.Module):
    """Applies one module per scale to the same ``x`` and returns the list."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> List[Tensor]:
        return [m(x) for m in self.layers]


class ShortcutGuess(_SkipGuess):
    """Skip DEQ: ``u0 = module(x)``, a learned explicit predictor of the fixed point.

    ``u0`` enters the solve *detached*, so the predictor learns only through ``solution.skip_loss``
    (the task loss gives it no gradient). The predictor is the submodule ``shortcut`` (state-dict keys
    ``init.shortcut.*`` in a layer).

    Args:
        module: ``x -> u0`` (state-shaped); or a sequence of modules, one per scale of a list state, each
            applied to ``x``. Required: it is the predictor.
        skip_loss: ``"l1"`` (default: ``mean|u0 − z*|``, the paper's) or ``"l2"`` (``mean (u0 − z*)²``).
        detach_skip_target: ``True`` (default): ``z*`` is a constant target in the skip loss, so the loss
            trains the predictor towards the fixed point without pulling the fixed point towards the
            predictor (which would also cost a second adjoint solve); ``False`` also differentiates the
            skip loss through ``z*`` (the reference package's coupling).
        shape: per-sample state shape(s); when given, ``module``'s output is checked against it on every
            call. Default ``None``: no check (the map's own first-call check still catches a wrong shape).

    Raises:
        TypeError: ``module`` is neither a module nor a sequence of modules.
        ValueError: ``skip_loss`` is not ``"l1"`` or ``"l2"``; ``shape`` is not a shape or list of shapes.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deqlab.nn import ShortcutGuess
        >>> guess = ShortcutGuess(nn.Linear(3, 3), shape=(3,))
        >>> x = torch.ones(2, 3)
        >>> u0 = guess(x, None)                         # the prediction, with gradients to the shortcut
        >>> u0.shape, u0.requires_grad, guess.start(u0).requires_grad   # the solve starts detached
        (torch.Size([2, 3]), True, False)
        >>> loss = guess.skip_loss(u0, 2 * x)           # trains the shortcut towards z*
        >>> loss.shape, loss.requires_grad
        (torch.Size([]), True)
    """

    def __init__(
        self,
        module: Union[nn.Module, Sequence[nn.Module]],
        *,
        skip_loss: SkipLoss = "l1",
        detach_skip_target: bool = True,
        shape: Optional[StateShape] = None,
    ):
        super().__init__(skip_loss, detach_skip_target)
        if not isinstance(module, nn.Module):
            if not isinstance(module, (list, tuple)) or not all(isinstance(m, nn.Module) for m in module):
                raise TypeError(
                    f"ShortcutGuess: module must be an nn.Module or a sequence of them (one per "
                    f"scale), got {type(module).__name__}"
                )
            module = _PerScale(module)
        self.shortcut = module
        self.shape = _normalise_shape(shape, "ShortcutGuess")

    def forward(self, x: Tensor, f: Callable[[State], State]) -> State:
        u0 = self.shortcut(x)
        u0 = list(u0) if isinstance(u0, tuple) else u0
        if self.shape is not None:
            want = self.shape if isinstance(self.shape, list) else [self.shape]
            got = [tuple(t.shape[1:]) for t in as_parts(u0)]
            if got != want:
                raise ValueError(f"ShortcutGuess: the shortcut returned per-sample shapes {got}, expected {want}")
        return u0

    def start(self, u0: State) -> State:
        return detach(u0)


class MapGuess(_SkipGuess):
    """Skip Reg. DEQ: ``u0 = f(0, x)``, one application of the map itself (differentiable, no parameters).

    Through the skip loss it trains ``f`` to reach its fixed point in one step.

    Unlike [`ShortcutGuess`][deqlab.nn.ShortcutGuess], the skip loss is *coupled* by default (``detach_skip_target=False``,
    the reference package's form): it differentiates through ``z*`` as well as through ``f(0, x)``. Why:
    with a detached target the only way the loss can shrink ``|f(0, x) − z*|`` is by moving ``f(0, x)``,
    which moves ``z*`` with it; measured on the paper's MNIST dense model (400 steps), ``|z*|`` then ran
    away to ~600 and test accuracy stayed at 26 %, while the coupled loss reached vanilla's accuracy.

    Args:
        skip_loss: ``"l1"`` (default: ``mean|u0 − z*|``, the paper's) or ``"l2"``, as in
            [`ShortcutGuess`][deqlab.nn.ShortcutGuess].
        detach_skip_target: ``False`` (default, for the reason above): the loss also pulls ``z*`` towards
            ``f(0, x)``; ``True``: ``z*`` is a constant target.
        shape: per-sample shape(s) of the zero state ``f`` is applied to. Default ``None``: shaped like
            ``x``, as [`ZeroGuess`][deqlab.nn.ZeroGuess].

    Raises:
        ValueError: ``skip_loss`` is not ``"l1"`` or ``"l2"``; ``shape`` is not a shape or list of shapes.

    Example:
        >>> import torch
        >>> from deqlab.nn import MapGuess
        >>> x = torch.ones(2, 3)
        >>> u0 = MapGuess()(x, lambda z: 0.5 * z + x)   # f(0, x) = x
        >>> u0.tolist()
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
        >>> round(float(MapGuess().skip_loss(u0, 2 * x)), 3)   # mean |x - 2x|
        1.0
    """

    def __init__(
        self, *, skip_loss: SkipLoss = "l1", detach_skip_target: bool = False, shape: Optional[StateShape] = None
    ):
        super().__init__(skip_loss, detach_skip_target)
        self.shape = _normalise_shape(shape, "MapGuess")

    def forward(self, x: Tensor, f: Callable[[State], State]) -> State:
        return f(zero_state(x, self.shape))


class FunctionGuess(InitialGuess):
    """``u0 = fn(x)`` for a plain callable, evaluated without gradient tracking (no skip loss).

    What the ``initializer=`` argument of the layers builds; for a *learned* predictor use
    [`ShortcutGuess`][deqlab.nn.ShortcutGuess], which trains it through the skip loss.

    Args:
        fn: ``x -> u0``, returning a state (a tensor, or a list/tuple of tensors for a list state).
            Required. It runs under ``torch.no_grad()``: without a skip loss nothing would train it, so
            tracking its graph would only cost memory.

    Raises:
        TypeError: ``fn`` is not callable.

    Example:
        >>> import torch
        >>> from deqlab.nn import FunctionGuess
        >>> guess = FunctionGuess(lambda x: 2 * x)
        >>> u0 = guess(torch.ones(1, 2, requires_grad=True), None)
        >>> u0.tolist(), u0.requires_grad
        ([[2.0, 2.0]], False)
    """

    def __init__(self, fn: Callable[[Tensor], State]):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"FunctionGuess: fn must be callable as fn(x) -> u0, got {fn!r}")
        if isinstance(fn, nn.Module) and any(p.requires_grad for p in fn.parameters()):
            # registered, saved in checkpoints, but never trained: u0 = fn(x) runs without gradient and has no
            # skip loss. A learned predictor is a Skip DEQ's shortcut.
            raise TypeError(
                f"FunctionGuess: fn is a module with trainable parameters ({type(fn).__name__}); they "
                f"would never be trained (u0 = fn(x) takes no gradient and has no skip loss). For a "
                f"learned predictor use init=ShortcutGuess(module) (a Skip DEQ); for a fixed function "
                f"freeze it first (module.requires_grad_(False))"
            )
        self.fn = fn

    def forward(self, x: Tensor, f: Callable[[State], State]) -> State:
        with torch.no_grad():
            u0 = self.fn(x)
        return list(u0) if isinstance(u0, tuple) else u0
