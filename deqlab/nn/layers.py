"""Building blocks for DEQ maps: per-solve stateful modules and the paper's residual blocks.

Why "per-solve state": inside one DEQ forward the map ``f`` is evaluated tens of times. Two things must
then happen once per forward, not once per evaluation:

* weight normalisation (``w = g * v / ||v||``) is a pure function of the parameters, so computing it
  per evaluation is wasted work;
* variational (hidden) dropout must use *one* mask for the whole solve, otherwise ``f`` changes between
  iterations and there is no fixed point.

Modules that need this derive from [`EquilibriumStateful`][deqlab.nn.EquilibriumStateful]. Every DEQ layer in `deqlab.nn`
finds them among its submodules and calls `EquilibriumStateful.deq_begin` at the start of each
forward and `EquilibriumStateful.deq_end` at its end, automatically; the implicit backward
re-installs the exact state (same mask, same normalised weight) when it re-evaluates ``f``. No user
``reset`` calls are needed. Outside a DEQ forward the modules behave like ordinary layers.

The per-solve state is kept per *thread* (not on the module), so two threads calling the same DEQ layer
each solve with their own normalised weight and dropout mask and never see the other's.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as module_mod
from torch.nn.modules.conv import _ConvNd

__all__ = [
    "EquilibriumStateful",
    "equilibrium_session",
    "stateful_modules",
    "WeightNorm",
    "SpectralNorm",
    "apply_norm",
    "VariationalHiddenDropout",
    "DenseDEQBlock",
    "ResidualBlock",
    "Downsample",
    "Upsample",
    "PostFuse",
]


_LOCAL = threading.local()


def _thread_states() -> "weakref.WeakKeyDictionary[nn.Module, Dict[str, Any]]":
    states = getattr(_LOCAL, "states", None)
    if states is None:
        states = _LOCAL.states = weakref.WeakKeyDictionary()
    return states


class EquilibriumStateful(nn.Module):
    """Base class of modules that keep state fixed for the duration of one DEQ forward.

    Subclasses implement the four hooks below. ``deq_state``/``deq_load_state`` exchange a plain dict;
    tensors in it that require grad are routed through the implicit backward so their gradients reach
    the parameters they were computed from.

    Keep the state in `solve_state` (a dict private to the calling thread), not in attributes:
    a module shared by two threads then never mixes their solves.

    Example:
        A map that counts its own evaluations per solve; the layer calls the hooks itself:

        >>> import torch
        >>> from deqlab.nn import DEQ, EquilibriumStateful
        >>> from deqlab.solvers import DiscreteDEQSolver
        >>> class CountingHalf(EquilibriumStateful):     # f(z, x) = z / 2 + x
        ...     def deq_begin(self):
        ...         self.solve_state()["calls"] = 0
        ...     def deq_end(self):
        ...         self.last_calls = self.peek_solve_state("calls")
        ...         self.clear_solve_state()
        ...     def forward(self, z, x):
        ...         if self.peek_solve_state("calls") is not None:
        ...             self.solve_state()["calls"] += 1
        ...         return 0.5 * z + x
        >>> solver = DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-6, max_steps=30)
        >>> deq = DEQ(CountingHalf(), solver)
        >>> z_star, solution = deq(torch.ones(2, 3))
        >>> deq.model.last_calls == solution.nfe, deq.model.peek_solve_state("calls")   # state dropped
        (True, None)
    """

    def solve_state(self) -> Dict[str, Any]:
        """This module's per-solve state in the calling thread (created empty on first use)."""
        states = _thread_states()
        state = states.get(self)
        if state is None:
            state = states[self] = {}
        return state

    def peek_solve_state(self, key: str, default: Any = None) -> Any:
        """One entry of `solve_state` without creating the dict."""
        state = _thread_states().get(self)
        return default if state is None else state.get(key, default)

    def clear_solve_state(self) -> None:
        """Forget this thread's per-solve state."""
        _thread_states().pop(self, None)

    def deq_begin(self) -> None:  # pragma: no cover - interface
        """Called once at the start of a DEQ forward (grad mode as in that forward)."""

    def deq_end(self) -> None:  # pragma: no cover - interface
        """Called once at the end of a DEQ forward; drop caches so stale values are never reused."""

    def deq_state(self) -> Dict[str, Any]:  # pragma: no cover - interface
        """The per-solve state to re-install in the backward (tensors requiring grad are routed through it).

        Returns:
            A plain dict (empty by default: nothing to re-install).
        """
        return {}

    def deq_load_state(self, state: Dict[str, Any]) -> None:  # pragma: no cover - interface
        """Re-install a dict returned by `deq_state` (no-op by default).

        Args:
            state: the dict `deq_state` returned in the forward.
        """
        pass

    def deq_select(self, index: Optional[Tensor]) -> None:
        """Evaluate the next calls on the samples ``index`` of the DEQ's batch (``None``: the whole batch).

        Why: with per-sample early exit (``DiscreteDEQSolver(per_sample_exit=True)``) the solver evaluates
        the map on the samples still iterating. A module whose per-solve state has one entry per sample
        (a dropout mask) must then use the rows ``index`` of it; state shared by all samples (a
        normalised weight) needs nothing, which is the default.
        """


def stateful_modules(roots: Sequence[nn.Module]) -> List[EquilibriumStateful]:
    """Every [`EquilibriumStateful`][deqlab.nn.EquilibriumStateful] module under ``roots``, each once, in module order."""
    seen, out = set(), []
    for root in roots:
        for m in root.modules():
            if isinstance(m, EquilibriumStateful) and id(m) not in seen:
                seen.add(id(m))
                out.append(m)
    return out


@contextlib.contextmanager
def equilibrium_session(roots: Sequence[nn.Module]) -> Iterator[List[EquilibriumStateful]]:
    """One DEQ forward: ``deq_begin`` on every stateful module under ``roots``, ``deq_end`` on exit."""
    stateful = stateful_modules(roots)
    for m in stateful:
        m.deq_begin()
    try:
        yield stateful
    finally:
        for m in stateful:
            m.deq_end()


class _NormalisedWeight(EquilibriumStateful):
    """What [`WeightNorm`][deqlab.nn.WeightNorm] and [`SpectralNorm`][deqlab.nn.SpectralNorm] share: the
    normalised weight held for one solve (per thread), re-installed in the backward, and the call of the
    wrapped module with it. A subclass sets ``module``/``name`` and implements ``compute_weight``; it may
    override ``_weight_outside_solve`` (the weight of a call outside a DEQ forward)."""

    module: nn.Module
    name: str

    def compute_weight(self) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def _cache(self) -> Optional[Tensor]:
        """The weight normalised for the current solve in this thread (``None`` outside a DEQ forward)."""
        return self.peek_solve_state("weight")

    def _weight_outside_solve(self) -> Tensor:
        return self.compute_weight()

    def deq_begin(self) -> None:
        self.solve_state()["weight"] = self.compute_weight()

    def deq_end(self) -> None:
        self.clear_solve_state()

    def deq_state(self) -> Dict[str, Any]:
        return {"weight": self._cache}

    def deq_load_state(self, state: Dict[str, Any]) -> None:
        if state["weight"] is None:
            self.clear_solve_state()
        else:
            self.solve_state()["weight"] = state["weight"]

    def forward(self, *args, **kwargs):
        """Call the wrapped module with the normalised weight (the solve's, inside a DEQ forward), without
        mutating it where possible.

        Why: the wrapped module is shared by every thread calling this layer. ``nn.Linear`` and
        ``nn.Conv1d/2d/3d`` (with their stock ``forward`` and no hooks) are evaluated functionally
        (``F.linear`` / ``_conv_forward`` with the weight passed in), so concurrent calls never touch the
        module. Any other wrapped module needs the weight as an attribute: it is installed, the module is
        called and the attribute removed under one process-wide lock, so threads take turns on that call
        (correct, not parallel).
        """
        w = self._cache
        if w is None:
            w = self._weight_outside_solve()
        return _call_with_weight(self.module, self.name, w, args, kwargs)


class WeightNorm(_NormalisedWeight):
    """Weight normalisation ``w = g * v / ||v||`` around any module with a weight (``Conv2d``, ``Linear``...).

    Inside a DEQ forward the normalised weight is computed once (in `deq_begin`) and reused by every
    solver iteration; outside a DEQ forward it is computed on each call.

    Args:
        module: the wrapped layer; its ``name`` parameter is replaced by ``weight_g`` and ``weight_v`` on
            this wrapper. Required.
        name: which parameter to normalise. Default ``"weight"``: the weight of ``Conv2d``/``Linear``.
        dim: the dimension kept by the norm. Default 0: one scale per output channel/unit, as
            ``torch.nn.utils.weight_norm`` and the paper's MDEQ.

    Raises:
        ValueError: ``module`` has no parameter called ``name``.

    Example:
        At construction ``g = ‖v‖``, so the wrapped layer computes what the original did:

        >>> import torch
        >>> from torch import nn
        >>> from deqlab.nn import WeightNorm
        >>> _ = torch.manual_seed(0)
        >>> plain = nn.Linear(3, 2)
        >>> _ = torch.manual_seed(0)                    # the same initial weights
        >>> wn = WeightNorm(nn.Linear(3, 2))
        >>> sorted(name for name, _ in wn.named_parameters())
        ['module.bias', 'weight_g', 'weight_v']
        >>> x = torch.randn(4, 3)
        >>> wn.weight_g.shape, torch.allclose(wn(x), plain(x))
        (torch.Size([2, 1]), True)
    """

    def __init__(self, module: nn.Module, name: str = "weight", dim: int = 0):
        super().__init__()
        weight = getattr(module, name)
        if not isinstance(weight, nn.Parameter):
            raise ValueError(f"WeightNorm: module {type(module).__name__} has no parameter {name!r}")
        del module._parameters[name]
        self.module = module
        self.name = name
        self.dim = dim
        self.weight_v = nn.Parameter(weight.detach().clone())
        self.weight_g = nn.Parameter(self._norm(weight.detach()).clone())

    def _norm(self, v: Tensor) -> Tensor:
        dims = [d for d in range(v.dim()) if d != self.dim]
        return torch.linalg.vector_norm(v, dim=dims, keepdim=True)

    def compute_weight(self) -> Tensor:
        """The normalised weight ``g * v / ||v||``.

        Returns:
            A tensor shaped like the wrapped module's weight, differentiable w.r.t. ``weight_g``/``weight_v``.
        """
        return self.weight_g * self.weight_v / self._norm(self.weight_v)


class SpectralNorm(_NormalisedWeight):
    """DEQ-aware spectral normalisation ``w = scale · target · W / σ(W)`` around a ``Linear``/``Conv`` layer.

    ``σ(W)`` is the largest singular value of the weight reshaped to 2-D, ``(out, in · kernel…)``, as
    ``torch.nn.utils.spectral_norm`` does; for a convolution that bounds the norm of the weight matrix,
    not the operator norm of the convolution itself (which can be larger by up to ``√(kernel size)``).
    It is estimated by power iteration whose vectors ``u``, ``v`` are buffers kept across forwards: inside
    a DEQ forward (training mode) they take ``n_power_iterations`` steps *once*, in `deq_begin`, and the
    normalised weight computed then is reused by every evaluation of ``f`` in that solve and by its
    backward (the map does not change between solver iterations, so a fixed point exists; the estimate
    converges across forwards, as the weight changes slowly). Outside a DEQ forward each training-mode
    call takes those steps; in eval mode the buffers are not updated.

    What the target means: ``clamp=False`` (default) rescales to ``σ(w) = scale · target`` exactly (up to
    the power iteration's accuracy); ``clamp=True`` only shrinks, ``σ(w) = min(σ(W), target)`` (times
    ``scale``), leaving weights that already satisfy the bound untouched.

    Args:
        module: the wrapped layer; its ``name`` parameter is replaced by ``weight_orig`` on this wrapper.
            Required.
        target: the norm after normalisation. Default 1.0: a map built of 1-Lipschitz activations and such
            layers is non-expansive; pick ``< 1`` for a guaranteed contraction.
        clamp: only shrink weights whose norm exceeds ``target`` (see above). Default ``False``: torch's
            ``spectral_norm`` semantics, always ``σ = target``.
        learn_scale: add a learned scalar ``scale`` (initialised to 1) multiplying the normalised weight, so
            training can move the norm away from ``target`` (then ``σ(w) = |scale| · target``). Default
            ``False``: the norm is fixed, which is the usual reason for spectral normalisation in a DEQ.
        n_power_iterations: power-iteration steps per DEQ forward. Default 1: one step per forward tracks a
            slowly changing weight, as torch's.
        init_iterations: power-iteration steps at construction (warm start). Default 15, as torch's.
        name: which parameter to normalise. Default ``"weight"``.
        eps: floor of norms in the power iteration and of ``σ``. Default 1e-12, as torch's.

    Attributes:
        num_updates: power-iteration updates made so far (one per training-mode DEQ forward).

    Raises:
        ValueError: ``module`` has no parameter ``name``; ``target <= 0``; ``n_power_iterations < 1`` or
            ``init_iterations < 0``.

    Example:
        After the forward's update the normalised weight's largest singular value is the target:

        >>> import torch
        >>> from torch import nn
        >>> from deqlab.nn import SpectralNorm
        >>> _ = torch.manual_seed(0)
        >>> sn = SpectralNorm(nn.Linear(4, 4), target=0.9, init_iterations=50)
        >>> sorted(name for name, _ in sn.named_parameters())
        ['module.bias', 'weight_orig']
        >>> y = sn(torch.randn(2, 4))
        >>> round(float(torch.linalg.matrix_norm(sn.compute_weight().detach(), ord=2)), 4), sn.num_updates
        (0.9, 1)
    """

    def __init__(
        self,
        module: nn.Module,
        target: float = 1.0,
        *,
        clamp: bool = False,
        learn_scale: bool = False,
        n_power_iterations: int = 1,
        init_iterations: int = 15,
        name: str = "weight",
        eps: float = 1e-12,
    ):
        super().__init__()
        weight = getattr(module, name, None)
        if not isinstance(weight, nn.Parameter):
            raise ValueError(f"SpectralNorm: module {type(module).__name__} has no parameter {name!r}")
        if not target > 0:
            raise ValueError(f"SpectralNorm: target must be > 0, got {target!r}")
        if n_power_iterations < 1 or init_iterations < 0:
            raise ValueError(
                f"SpectralNorm: need n_power_iterations >= 1 and init_iterations >= 0, got "
                f"{n_power_iterations}, {init_iterations}"
            )
        del module._parameters[name]
        self.module = module
        self.name = name
        self.target = float(target)
        self.clamp = bool(clamp)
        self.n_power_iterations = int(n_power_iterations)
        self.eps = float(eps)
        self.weight_orig = nn.Parameter(weight.detach().clone())
        self.scale = nn.Parameter(torch.ones((), dtype=weight.dtype, device=weight.device)) if learn_scale else None
        mat = self._matrix(self.weight_orig.detach())
        gen = torch.Generator().manual_seed(0)
        u = torch.randn(mat.shape[0], generator=gen, dtype=mat.dtype).to(mat.device)
        v = torch.randn(mat.shape[1], generator=gen, dtype=mat.dtype).to(mat.device)
        self.register_buffer("u", F.normalize(u, dim=0, eps=self.eps))
        self.register_buffer("v", F.normalize(v, dim=0, eps=self.eps))
        self.num_updates = 0
        self._power_iterate(init_iterations)

    @staticmethod
    def _matrix(weight: Tensor) -> Tensor:
        return weight.reshape(weight.shape[0], -1)

    def _vectors(self) -> Tuple[Tensor, Tensor]:
        """The power iteration's singular-vector estimates, the buffers ``u`` and ``v``."""
        return cast(Tensor, self.u), cast(Tensor, self.v)

    @torch.no_grad()
    def _power_iterate(self, steps: int) -> None:
        mat = self._matrix(self.weight_orig.detach())
        u_buffer, v_buffer = self._vectors()
        u, v = u_buffer, v_buffer
        for _ in range(steps):
            v = F.normalize(mat.t() @ u, dim=0, eps=self.eps)
            u = F.normalize(mat @ v, dim=0, eps=self.eps)
        u_buffer.copy_(u)
        v_buffer.copy_(v)

    def update(self) -> None:
        """Take ``n_power_iterations`` power-iteration steps on the current weight (counted in ``num_updates``).

        A DEQ layer calls it once per training-mode forward (through `deq_begin`); call it yourself only to
        refine the estimate, e.g. after loading weights.
        """
        self._power_iterate(self.n_power_iterations)
        self.num_updates += 1

    def normalised(self, weight: Tensor) -> Tensor:
        """``weight`` normalised with the current power-iteration vectors (no update).

        Args:
            weight: a tensor shaped like ``weight_orig`` (differentiable; gradients flow through ``σ`` too).

        Returns:
            ``scale · target · weight / σ`` (``σ = uᵀ W v``), or with ``clamp`` ``weight · min(1, target / σ)``.
        """
        u, v = self._vectors()
        sigma = torch.dot(u.clone(), self._matrix(weight) @ v.clone()).clamp_min(self.eps)
        factor = self.target / (torch.maximum(sigma, sigma.new_tensor(self.target)) if self.clamp else sigma)
        w = weight * factor
        return w * self.scale if self.scale is not None else w

    def compute_weight(self) -> Tensor:
        """The normalised weight from ``weight_orig`` and the current buffers (no update).

        Returns:
            A tensor shaped like the wrapped module's weight, differentiable w.r.t. ``weight_orig``.
        """
        return self.normalised(self.weight_orig)

    def deq_begin(self) -> None:
        if self.training:
            self.update()
        super().deq_begin()

    def _weight_outside_solve(self) -> Tensor:
        if self.training:
            self.update()
        return self.compute_weight()

    def extra_repr(self) -> str:
        return (
            f"target={self.target}, clamp={self.clamp}, learn_scale={self.scale is not None}, "
            f"n_power_iterations={self.n_power_iterations}"
        )


def _call_with_weight(module: nn.Module, name: str, w: Tensor, args: tuple, kwargs: dict) -> Any:
    """``module(*args, **kwargs)`` with its parameter ``name`` replaced by ``w`` (functionally where possible)."""
    if name == "weight" and not kwargs and len(args) == 1 and not _has_hooks(module):
        forward = type(module).forward
        if forward is nn.Linear.forward:
            return F.linear(args[0], w, cast(nn.Linear, module).bias)
        if forward in _CONV_FORWARDS:
            conv = cast(_ConvNd, module)  # a Conv1d, Conv2d or Conv3d: its forward is one of _CONV_FORWARDS
            return conv._conv_forward(args[0], w, conv.bias)
    with _ATTRIBUTE_LOCK:
        setattr(module, name, w)
        try:
            return module(*args, **kwargs)
        finally:
            delattr(module, name)


_NORMS = {"weight_norm": WeightNorm, "spectral_norm": SpectralNorm}
_NORMED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def apply_norm(
    model: nn.Module, norm: str = "weight_norm", filter_out: "Sequence[str] | Callable[[str], bool]" = (), **kwargs: Any
) -> nn.Module:
    """Wrap every ``Linear``/``Conv1d/2d/3d`` of ``model`` in [`WeightNorm`][deqlab.nn.WeightNorm] or
    [`SpectralNorm`][deqlab.nn.SpectralNorm], in place (torchdeq's ``apply_norm``).

    No reset call is needed afterwards (torchdeq's ``reset_norm``): both wrappers are
    [`EquilibriumStateful`][deqlab.nn.EquilibriumStateful], so a DEQ layer computes the normalised weights
    once at the start of each forward and drops them at its end by itself.

    Args:
        model: the module whose layers to wrap (usually the DEQ map). Required.
        norm: ``"weight_norm"`` (default, the MDEQ choice) or ``"spectral_norm"``.
        filter_out: names to skip: a layer is left alone when its qualified name (``"block.conv1"``) equals
            one of them, starts with one followed by ``"."``, or has one as a dot-separated component; or a
            predicate ``qualified_name -> bool`` (``True``: skip that module and everything under it; the
            root's name is ``""``), e.g. torchdeq's substring and prefix filters. Default ``()``: wrap them all.
        **kwargs: options of the wrapper (``target=``, ``clamp=`` ... for ``SpectralNorm``; ``dim=`` for
            ``WeightNorm``).

    Returns:
        ``model`` itself (wrapped in place), or the wrapper when ``model`` itself is such a layer.

    Raises:
        ValueError: ``norm`` is not ``"weight_norm"`` or ``"spectral_norm"``.

    Example:
        >>> from torch import nn
        >>> from deqlab.nn import apply_norm
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> net = apply_norm(net, "spectral_norm", filter_out=["2"], target=0.9)
        >>> tuple(type(m).__name__ for m in net)
        ('SpectralNorm', 'Tanh', 'Linear')
    """
    if norm not in _NORMS:
        raise ValueError(f"apply_norm: norm must be 'weight_norm' or 'spectral_norm', got {norm!r}")
    wrapper = _NORMS[norm]
    skip = [] if callable(filter_out) else [str(n) for n in filter_out]

    def skipped(qualified: str) -> bool:
        if callable(filter_out):
            return bool(filter_out(qualified))
        parts = qualified.split(".")
        return any(qualified == n or qualified.startswith(n + ".") or n in parts for n in skip)

    if isinstance(model, _NORMED):
        return model if skipped("") else wrapper(model, **kwargs)

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, _NormalisedWeight):
            return  # already normalised
        for child_name, child in list(module.named_children()):
            qualified = f"{prefix}{child_name}"
            if skipped(qualified):
                continue
            if isinstance(child, _NORMED) and isinstance(getattr(child, "weight", None), nn.Parameter):
                setattr(module, child_name, wrapper(child, **kwargs))
            else:
                visit(child, qualified + ".")

    visit(model, "")
    return model


_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)
# Serialises the attribute-swapping fallback of _call_with_weight (WeightNorm, SpectralNorm; re-entrant: a
# wrapped module may itself contain a WeightNorm that takes the fallback).
_ATTRIBUTE_LOCK = threading.RLock()


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run forward hooks that a functional evaluation would skip."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module_mod._global_forward_hooks
        or module_mod._global_forward_pre_hooks
    )


class VariationalHiddenDropout(EquilibriumStateful):
    """Dropout whose mask is drawn once per DEQ forward and held fixed during the solve.

    The mask is drawn at the first call after the DEQ forward starts, on the input's device and dtype,
    scaled by ``1 / (1 - p)``. With ``spatial=True`` one value per (sample, channel) is shared over the
    spatial dimensions (as in MDEQ). In eval mode, or with ``p == 0``, it is the identity. Outside a DEQ
    forward a fresh mask is drawn per call (ordinary dropout semantics).

    Args:
        p: drop probability. Default 0.0: the identity, so dropout is opt-in (the paper configurations
            in `deqlab.models` set it per dataset).
        spatial: share the mask over dimensions 2.. (inputs of rank >= 3). Default ``True``: one value
            per (sample, channel), as in MDEQ, which drops whole feature maps rather than pixels.

    Raises:
        ValueError: ``p`` is not in ``[0, 1)``.

    Example:
        Inside a DEQ the mask stays fixed, so ``f(z, x) = z / 2 + drop(x)`` has a fixed point
        (``2 · mask · x``, with mask values 0 or 2):

        >>> import torch
        >>> from torch import nn
        >>> from deqlab.nn import DEQ, VariationalHiddenDropout
        >>> from deqlab.solvers import DiscreteDEQSolver
        >>> class DropHalf(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.drop = VariationalHiddenDropout(0.5)
        ...     def forward(self, z, x):
        ...         return 0.5 * z + self.drop(x)
        >>> solver = DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-6, max_steps=30)
        >>> z_star, solution = DEQ(DropHalf(), solver)(torch.ones(2, 8))
        >>> solution.status.value, sorted(z_star.round(decimals=4).unique().tolist())
        ('converged', [0.0, 4.0])
        >>> drop = VariationalHiddenDropout(0.5)
        >>> y = drop(torch.ones(2, 4, 3, 3))               # outside a DEQ: ordinary (spatial) dropout
        >>> bool((y == y[..., :1, :1]).all())              # one value per (sample, channel)
        True
        >>> torch.equal(drop.eval()(y), y)                 # identity in eval mode
        True
    """

    def __init__(self, p: float = 0.0, spatial: bool = True):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"VariationalHiddenDropout: p must be in [0, 1), got {p}")
        self.p = float(p)
        self.spatial = spatial

    def deq_begin(self) -> None:
        self.solve_state().update(active=True, mask=None)

    def deq_end(self) -> None:
        self.clear_solve_state()

    def deq_state(self) -> Dict[str, Any]:
        return {"active": self.peek_solve_state("active", False), "mask": self.peek_solve_state("mask")}

    def deq_load_state(self, state: Dict[str, Any]) -> None:
        if not state["active"]:
            self.clear_solve_state()
        else:
            self.solve_state().update(active=True, mask=state["mask"])

    def deq_select(self, index: Optional[Tensor]) -> None:
        if self.peek_solve_state("active", False):
            self.solve_state()["rows"] = index

    def _draw(self, x: Tensor) -> Tensor:
        shape = list(x.shape)
        if self.spatial and x.dim() >= 3:
            shape = shape[:2] + [1] * (x.dim() - 2)
        mask = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(1.0 - self.p)
        return mask / (1.0 - self.p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if not self.peek_solve_state("active", False):
            return x * self._draw(x)
        state = self.solve_state()
        mask = state.get("mask")
        rows = state.get("rows")
        if rows is not None:  # a sub-batch of the solve (per-sample early exit): the same samples' masks
            if mask is None:
                raise RuntimeError(
                    "VariationalHiddenDropout: evaluated on a sub-batch before its mask was drawn on the full batch"
                )
            return x * mask.index_select(0, rows)
        if mask is None or mask.shape[0] != x.shape[0]:
            mask = state["mask"] = self._draw(x)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}, spatial={self.spatial}"


class DenseDEQBlock(nn.Module):
    """The MNIST-dense map of the paper: ``f(z, x) = relu(W1 z) + relu(W2 x)``, no biases.

    Args:
        dim: state width. Required.
        injection_dim: width of ``x``. Default ``None``: ``dim``, the paper's model, where ``x`` is already
            projected to the state width.

    Example:
        >>> import torch
        >>> from deqlab.nn import DEQ, DenseDEQBlock
        >>> from deqlab.solvers import DiscreteDEQSolver
        >>> block = DenseDEQBlock(4, injection_dim=3)
        >>> block(torch.zeros(2, 4), torch.ones(2, 3)).shape
        torch.Size([2, 4])
        >>> solver = DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-6, max_steps=30)
        >>> from deqlab.nn import ZeroGuess
        >>> z_star, solution = DEQ(block, solver, init=ZeroGuess(shape=(4,)))(torch.randn(2, 3))
        >>> z_star.shape, solution.status.value
        (torch.Size([2, 4]), 'converged')
    """

    def __init__(self, dim: int, injection_dim: Optional[int] = None):
        super().__init__()
        self.w_z = nn.Linear(dim, dim, bias=False)
        self.w_x = nn.Linear(injection_dim or dim, dim, bias=False)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return F.relu(self.w_z(z)) + F.relu(self.w_x(x))


def _conv3x3(cin: int, cout: int, weight_norm: bool, std: Optional[float]) -> nn.Module:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    if std is not None:
        nn.init.normal_(conv.weight, 0.0, std)
    return WeightNorm(conv) if weight_norm else conv


class ResidualBlock(nn.Module):
    """The paper-v1 MDEQ residual block (CIFAR-10 / SVHN / MNIST-conv main layers).

    ``y = conv2(gelu(GN(conv1(z))))`` with conv1: C→eC, conv2: eC→C (3×3, no bias, weight-normed,
    N(0, 0.01) init); ``out = GN(gelu(GN(dropout(y) + x) + z))``. Called as ``block(z, x)`` (``x`` is
    the injection, same shape as ``z``) or ``block(z)`` (no injection: scales > 1 of a multiscale model).

    Args:
        channels: C, the channels of the state (and of ``x``). Required.
        expansion: e, the width factor of the hidden convolution. Default 5, paper v1's.
        num_groups: GroupNorm groups; must divide C and eC (capped at the channel count). Default 8,
            paper v1's.
        dropout: variational hidden dropout probability (mask fixed per solve). Default 0.0: off; the
            paper configurations in `deqlab.models` set it per dataset.
        weight_norm: wrap both convolutions in [`WeightNorm`][deqlab.nn.WeightNorm]. Default ``True``, as paper v1.
        init_std: std of the normal weight init (``None``: PyTorch default). Default 0.01, paper v1's:
            small weights start the map close to contractive, so the first solves converge.

    Example:
        >>> import torch
        >>> from deqlab.nn import ResidualBlock
        >>> block = ResidualBlock(4, expansion=2, num_groups=2)
        >>> z = torch.randn(2, 4, 5, 5)
        >>> block(z, torch.randn(2, 4, 5, 5)).shape, block(z).shape   # with and without injection
        (torch.Size([2, 4, 5, 5]), torch.Size([2, 4, 5, 5]))
    """

    def __init__(
        self,
        channels: int,
        expansion: int = 5,
        num_groups: int = 8,
        dropout: float = 0.0,
        weight_norm: bool = True,
        init_std: Optional[float] = 0.01,
    ):
        super().__init__()
        hidden = channels * expansion
        self.conv1 = _conv3x3(channels, hidden, weight_norm, init_std)
        self.gn1 = nn.GroupNorm(min(num_groups, hidden), hidden)
        self.conv2 = _conv3x3(hidden, channels, weight_norm, init_std)
        self.dropout = VariationalHiddenDropout(dropout)
        self.gn2 = nn.GroupNorm(min(num_groups, channels), channels)
        self.gn3 = nn.GroupNorm(min(num_groups, channels), channels)

    def forward(self, z: Tensor, x: Optional[Tensor] = None) -> Tensor:
        y = self.conv2(F.gelu(self.gn1(self.conv1(z))))
        y = self.dropout(y)
        if x is not None:
            y = y + x
        return self.gn3(F.gelu(self.gn2(y) + z))


class Downsample(nn.Module):
    """Mapping i→j with j > i: ``factor`` = 2^(j−i) halvings, each a stride-2 conv3×3 + GroupNorm
    (gelu between stages).

    Args:
        in_channels: channels of scale ``i``. Required.
        out_channels: channels of scale ``j`` (the intermediate stages keep ``in_channels``). Required.
        factor: total downsampling, a power of 2. Default 2: neighbouring scales of the multiscale
            models differ by one halving.
        num_groups: GroupNorm groups, capped at the channel count. Default 4: a small count that divides
            the few channels of small models (the paper's models pass their own).

    Raises:
        ValueError: ``factor`` is not a power of 2 >= 2.

    Example:
        >>> import torch
        >>> from deqlab.nn import Downsample
        >>> Downsample(4, 8, factor=4, num_groups=2)(torch.randn(2, 4, 8, 8)).shape   # two halvings
        torch.Size([2, 8, 2, 2])
    """

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2, num_groups: int = 4):
        super().__init__()
        stages = int(round(math.log2(factor)))
        if 2**stages != factor or stages < 1:
            raise ValueError(f"Downsample: factor must be a power of 2 >= 2, got {factor}")
        layers = []
        c = in_channels
        for k in range(stages):
            last = k == stages - 1
            cout = out_channels if last else in_channels
            layers += [
                nn.Conv2d(c, cout, 3, stride=2, padding=1, bias=False),
                nn.GroupNorm(min(num_groups, cout), cout),
            ]
            if not last:
                layers.append(nn.GELU())
            c = cout
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Upsample(nn.Module):
    """Mapping i→j with j < i: conv1×1 + GroupNorm, then nearest upsampling by ``factor``.

    Args:
        in_channels: channels of scale ``i``. Required.
        out_channels: channels of scale ``j``. Required.
        factor: upsampling factor (2^(i−j)). Default 2: neighbouring scales differ by one halving.
        num_groups: GroupNorm groups, capped at ``out_channels``. Default 4, as [`Downsample`][deqlab.nn.Downsample].

    Example:
        >>> import torch
        >>> from deqlab.nn import Upsample
        >>> Upsample(8, 4, factor=2, num_groups=2)(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 4, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2, num_groups: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.norm = nn.GroupNorm(min(num_groups, out_channels), out_channels)
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.norm(self.conv(x)), scale_factor=self.factor, mode="nearest")


class PostFuse(nn.Module):
    """Paper-v1 post-fuse layer per scale: gelu → conv1×1 → GroupNorm.

    Args:
        channels: channels of the scale (kept). Required.
        num_groups: GroupNorm groups, capped at ``channels``. Default 4, the post-fuse groups of the
            paper-v1 CIFAR-10/SVHN configuration.

    Example:
        >>> import torch
        >>> from deqlab.nn import PostFuse
        >>> PostFuse(4, num_groups=2)(torch.randn(2, 4, 4, 4)).shape
        torch.Size([2, 4, 4, 4])
    """

    def __init__(self, channels: int, num_groups: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm = nn.GroupNorm(min(num_groups, channels), channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(F.gelu(x)))
