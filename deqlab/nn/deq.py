"""DEQ layers: vanilla, Skip, Skip Reg., and their multiscale versions.

Data flow of one forward (``deq(x) -> (z_star, solution)``):

1. every :class:`~deqlab.nn.layers.EquilibriumStateful` submodule starts its per-solve state (weight-norm
   cache, dropout mask);
2. the initial state ``u0`` is built (zeros / ``initializer(x)`` / ``shortcut(x)`` / ``f(0, x)``);
3. the solver finds ``z* = f(z*, x)`` from ``u0`` without building a graph (memory does not grow with
   solver steps), or, in fixed-depth mode, ``d`` applications of ``f`` run with ordinary backprop;
4. ``z*`` is connected to ``x`` and the map's parameters through the backward mode (implicit by default);
5. Jacobian and skip losses are formed; everything is returned in a
   :class:`~deqlab.nn.solution.DeepEquilibriumSolution`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, List, Literal, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from deqlab.state import State, as_parts, detach, from_parts, per_sample_norm, shapes_of
from deqlab.nn.implicit import BackwardMode, ImplicitBackward, _GradientSpec, attach_gradient
from deqlab.nn.layers import EquilibriumStateful
from deqlab.nn.regularization import jacobian_frobenius_estimate
from deqlab.nn.solution import DeepEquilibriumSolution
from deqlab.solvers.result import SolverStatus

__all__ = [
    "DeepEquilibriumNetwork",
    "DEQ",
    "SkipDeepEquilibriumNetwork",
    "SkipDEQ",
    "MultiScaleMap",
    "MultiScaleDeepEquilibriumNetwork",
    "MultiScaleSkipDeepEquilibriumNetwork",
]

SkipLoss = Literal["l1", "l2"]


def _fmt(shapes: Any) -> str:
    """Shapes with the batch dimension written as B."""
    if isinstance(shapes, list):
        return "[" + ", ".join(_fmt(s) for s in shapes) + "]"
    return "(B, " + ", ".join(str(d) for d in shapes[1:]) + ")" if len(shapes) > 1 else str(tuple(shapes))


class _CheckedMap:
    """``z -> f(z, x)`` for the solver; the first call validates shapes and dtypes (no per-step cost)."""

    def __init__(self, layer: "DeepEquilibriumNetwork", x: Tensor):
        self.layer = layer
        self.x = x
        self.checked = False

    def __call__(self, z: State) -> State:
        if self.checked:
            return self.layer._map(z, self.x)
        name = type(self.layer).__name__
        try:
            out = self.layer._map(z, self.x)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"{name}: the DEQ map failed on a state z of shape {_fmt(shapes_of(z))} "
                f"({as_parts(z)[0].dtype}) and an injection x of shape {_fmt(tuple(self.x.shape))} "
                f"({self.x.dtype}). Check that x has the shape and dtype the model expects, and pass "
                f"z_shape=... (or initializer=...) when the state differs from x in shape. Original error: "
                f"{err}") from err
        zp, op = as_parts(z), as_parts(out) if isinstance(out, (Tensor, list, tuple)) else None
        if op is None or len(zp) != len(op) or any(not isinstance(o, Tensor) for o in op) or \
                any(a.shape != b.shape for a, b in zip(zp, op)):
            got = _fmt(shapes_of(list(out) if isinstance(out, tuple) else out)) if op is not None else type(out)
            raise ValueError(f"{name}: the DEQ map must return a state shaped like z: expected "
                             f"{_fmt(shapes_of(z))}, got {got}")
        if any(a.dtype != b.dtype for a, b in zip(zp, op)):
            raise ValueError(f"{name}: the DEQ map returned dtype {op[0].dtype} for a state of dtype "
                             f"{zp[0].dtype}; cast x (dtype {self.x.dtype}) or the model to one dtype")
        self.checked = True
        return out if isinstance(out, Tensor) else list(out)


class DeepEquilibriumNetwork(nn.Module):
    """A Deep Equilibrium layer: ``z* = model(z*, x)``, solved by ``solver``, differentiated implicitly.

    Args:
        model: the map ``f``, any module called as ``model(z, x)`` returning a tensor shaped like ``z``
            (usually ``z`` enters one branch and the injection ``x`` another).
        solver: a solver from :mod:`deqlab.solvers` (``DiscreteDEQSolver`` / ``ContinuousDEQSolver``), any
            callable ``solver(f, z0) -> SolverResult``, or a registered solver name.
        backward: how gradients are computed (:class:`ImplicitBackward` by default; also
            :class:`JacobianFreeBackward`, :class:`PhantomGradient`).
        jacobian_regularization: add a Hutchinson estimate of ``‖∂f/∂z‖_F²`` at ``z*`` to the solution
            (``solution.jacobian_loss``; adding it to the loss with a weight is the caller's job).
        jacobian_probes: Gaussian probes per estimate (each costs one VJP).
        jacobian_normalize: ``"element"`` (divide by ``z.numel()``, Bai et al.), ``"sample"`` or ``"none"``.
        z_shape: per-sample state shape when it differs from ``x`` (reduced-dimension DEQs); ``u0`` is then
            zeros of shape ``(B, *z_shape)``.
        initializer: alternatively a callable ``x -> u0``; it is called without gradient tracking
            (use :class:`SkipDeepEquilibriumNetwork` for a learned initial guess).
        fixed_depth: when > 0, skip the solver and run ``fixed_depth`` unrolled applications of ``f`` from
            ``u0`` with ordinary backprop (pretraining); ``solution.nfe`` is then exactly the depth.
    """

    def __init__(
        self,
        model: nn.Module,
        solver: Any,
        *,
        backward: Optional[BackwardMode] = None,
        jacobian_regularization: bool = False,
        jacobian_probes: int = 1,
        jacobian_normalize: Literal["element", "sample", "none"] = "element",
        z_shape: Optional[Sequence[int]] = None,
        initializer: Optional[Callable[[Tensor], State]] = None,
        fixed_depth: int = 0,
    ):
        super().__init__()
        if isinstance(solver, str):
            from deqlab.solvers import get_solver

            solver = get_solver(solver)
        if not callable(solver):
            raise TypeError(f"{type(self).__name__}: solver must be callable as solver(f, z0), got {solver!r}")
        if backward is None:
            backward = ImplicitBackward()
        if not isinstance(backward, BackwardMode):
            raise TypeError(f"{type(self).__name__}: backward must be a BackwardMode (ImplicitBackward(), "
                            f"JacobianFreeBackward(), PhantomGradient()), got {backward!r}")
        if z_shape is not None and initializer is not None:
            raise ValueError(f"{type(self).__name__}: pass z_shape or initializer, not both")
        if jacobian_probes < 1:
            raise ValueError(f"{type(self).__name__}: jacobian_probes must be >= 1, got {jacobian_probes}")
        self.model = model
        self.solver = solver
        self.backward = backward
        self.jacobian_regularization = bool(jacobian_regularization)
        self.jacobian_probes = int(jacobian_probes)
        self.jacobian_normalize = jacobian_normalize
        self.z_shape = tuple(z_shape) if z_shape is not None else None
        self.initializer = initializer
        self.fixed_depth = int(fixed_depth)
        self.last_backward_nfe = 0
        # skip machinery (configured by the Skip subclasses)
        self.shortcut: Optional[nn.Module] = None
        self._skip_mode: Optional[str] = None
        self.skip_loss_kind: SkipLoss = "l1"
        self.detach_skip_target = True
        self._check_foreign = [True]

    # ---------------------------------------------------------------- pieces subclasses may override
    def _map(self, z: State, x: Tensor) -> State:
        return self.model(z, x)

    def _map_modules(self) -> List[nn.Module]:
        return [self.model]

    def _zeros(self, x: Tensor) -> State:
        if self.initializer is not None:
            with torch.no_grad():
                return self.initializer(x)
        if self.z_shape is not None:
            return x.new_zeros((x.shape[0], *self.z_shape))
        return torch.zeros_like(x)

    # ---------------------------------------------------------------- public helpers
    @contextlib.contextmanager
    def fixed_depth_mode(self, depth: int) -> Iterator["DeepEquilibriumNetwork"]:
        """Temporarily run as ``depth`` unrolled applications of ``f`` (``depth = 0``: solve)."""
        if depth < 0:
            raise ValueError(f"fixed_depth must be >= 0, got {depth}")
        old = self.fixed_depth
        self.fixed_depth = int(depth)
        try:
            yield self
        finally:
            self.fixed_depth = old

    def explicit(self, x: Tensor) -> State:
        """The explicit prediction ``u0`` alone (Skip: ``shortcut(x)``; Skip Reg.: ``f(0, x)``; else zeros),
        e.g. to log the "explicit accuracy" of a Skip DEQ without solving."""
        with self._session():
            u0, _ = self._initial_state(x, _CheckedMap(self, x))
        return u0

    # ---------------------------------------------------------------- internals
    def _stateful(self, modules: Sequence[nn.Module]) -> List[EquilibriumStateful]:
        seen, out = set(), []
        for root in modules:
            for m in root.modules():
                if isinstance(m, EquilibriumStateful) and id(m) not in seen:
                    seen.add(id(m))
                    out.append(m)
        return out

    @contextlib.contextmanager
    def _session(self):
        stateful = self._stateful([self])
        for m in stateful:
            m.deq_begin()
        try:
            yield
        finally:
            for m in stateful:
                m.deq_end()

    def _initial_state(self, x: Tensor, fmap: _CheckedMap) -> Tuple[State, Optional[State]]:
        """Return ``(u0, u0_for_skip_loss)``."""
        if self._skip_mode == "shortcut":
            u0 = self.shortcut(x)
            u0 = list(u0) if isinstance(u0, tuple) else u0
            return u0, u0
        if self._skip_mode == "reg":
            u0 = fmap(self._zeros(x))
            return u0, u0
        return self._zeros(x), None

    def _validate_input(self, x: Any) -> None:
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected x to be a tensor of shape (B, ...), got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point x, got dtype {x.dtype} (shape "
                             f"{tuple(x.shape)}); convert it with x.float()")
        if x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"{name}: expected x with a non-empty batch dimension, got shape {tuple(x.shape)}")

    def _residual_norm(self) -> str:
        norm = getattr(getattr(self.solver, "termination", None), "norm", getattr(self.solver, "norm", "l2"))
        return norm if norm in ("l2", "rms") else "l2"

    def forward(self, x: Tensor) -> Tuple[State, DeepEquilibriumSolution]:
        self._validate_input(x)
        with self._session():
            return self._forward(x)

    def _forward(self, x: Tensor) -> Tuple[State, DeepEquilibriumSolution]:
        fmap = _CheckedMap(self, x)
        u0, u0_skip = self._initial_state(x, fmap)
        u0_parts = as_parts(u0)
        if u0_parts[0].shape[0] != x.shape[0]:
            raise ValueError(f"{type(self).__name__}: the initial state has batch size {u0_parts[0].shape[0]}"
                             f" but x has {x.shape[0]}")
        is_list = not isinstance(u0, Tensor)
        start = detach(u0) if self._skip_mode == "shortcut" else u0
        result = None
        if self.fixed_depth > 0:
            z = start
            for _ in range(self.fixed_depth):
                z = fmap(z)
            with torch.no_grad():
                fz = fmap(z)
                residual = per_sample_norm([a - b for a, b in zip(as_parts(fz), as_parts(z))],
                                           self._residual_norm())
            z_star = z
            nfe = self.fixed_depth
            converged = torch.zeros_like(residual, dtype=torch.bool)
            status = SolverStatus.MAX_STEPS if bool(torch.isfinite(residual).all()) else SolverStatus.NONFINITE
            nfe_box = [0]
        else:
            with torch.no_grad():
                result = self.solver(fmap, detach(start))
            z_parts = [t.detach() for t in as_parts(result.z)]
            nfe_box = [0]
            z_parts = self._attach(z_parts, x, is_list, nfe_box)
            z_star = from_parts(z_parts, is_list)
            residual, nfe = result.residual.detach(), int(result.nfe)
            converged, status = result.converged, result.status

        jac = self._jacobian_loss(z_star, x) if self.jacobian_regularization else x.new_zeros(())
        skip = self._skip_loss(u0_skip, z_star) if u0_skip is not None else x.new_zeros(())
        solution = DeepEquilibriumSolution(
            z_star=z_star, u0=u0, residual=residual, jacobian_loss=jac, skip_loss=skip, nfe=nfe,
            converged=converged, status=status, solver_result=result, _backward_nfe=nfe_box)
        return z_star, solution

    def _attach(self, z_parts: List[Tensor], x: Tensor, is_list: bool, nfe_box: List[int]) -> List[Tensor]:
        if not torch.is_grad_enabled():
            return z_parts
        modules = self._map_modules()
        seen, params = set(), []
        for m in modules:
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        stateful = self._stateful(modules)
        snapshots = [m.deq_state() for m in stateful]
        grad_slots, grad_state = [], []
        for i, snap in enumerate(snapshots):
            for key, val in snap.items():
                if isinstance(val, Tensor) and val.requires_grad:
                    grad_slots.append((i, key))
                    grad_state.append(val)
        if not (x.requires_grad or params or grad_state):
            return z_parts

        def on_backward(n: int) -> None:
            self.last_backward_nfe = n

        spec = _GradientSpec(f=self._map, is_list=is_list, n_parts=len(z_parts), n_params=len(params),
                             stateful=stateful, snapshots=snapshots, grad_slots=grad_slots,
                             mode=self.backward, nfe_box=nfe_box, on_backward=on_backward,
                             check_foreign=self._check_foreign)
        return attach_gradient(spec, z_parts, x, params, grad_state)

    def _jacobian_loss(self, z_star: State, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return x.new_zeros(())
        z = [t.detach().requires_grad_() for t in as_parts(z_star)]
        is_list = not isinstance(z_star, Tensor)
        fz = self._map(from_parts(z, is_list), x)
        return jacobian_frobenius_estimate(fz, z, n_probes=self.jacobian_probes,
                                           normalize=self.jacobian_normalize, create_graph=True)

    def _skip_loss(self, u0: State, z_star: State) -> Tensor:
        total, count = None, 0
        for a, b in zip(as_parts(u0), as_parts(z_star)):
            b = b.detach() if self.detach_skip_target else b
            d = (a - b).abs() if self.skip_loss_kind == "l1" else (a - b).pow(2)
            total = d.sum() if total is None else total + d.sum()
            count += d.numel()
        return total / count

    def extra_repr(self) -> str:
        return (f"solver={self.solver!r}, backward={self.backward!r}, "
                f"jacobian_regularization={self.jacobian_regularization}, fixed_depth={self.fixed_depth}")


DEQ = DeepEquilibriumNetwork


def _configure_skip(layer: DeepEquilibriumNetwork, shortcut: Optional[nn.Module], skip_loss: str,
                    detach_skip_target: bool) -> None:
    if skip_loss not in ("l1", "l2"):
        raise ValueError(f"{type(layer).__name__}: skip_loss must be 'l1' or 'l2', got {skip_loss!r}")
    layer.shortcut = shortcut
    layer._skip_mode = "shortcut" if shortcut is not None else "reg"
    layer.skip_loss_kind = skip_loss  # type: ignore[assignment]
    layer.detach_skip_target = bool(detach_skip_target)


class SkipDeepEquilibriumNetwork(DeepEquilibriumNetwork):
    """Skip DEQ (with a ``shortcut``) or Skip Reg. DEQ (``shortcut=None``).

    * Skip DEQ: ``u0 = shortcut(x)`` enters the solve *detached*; the shortcut learns only through
      ``solution.skip_loss``.
    * Skip Reg. DEQ: ``u0 = f(0, x)`` (one application of the map, differentiable, no extra parameters).

    ``solution.skip_loss`` is ``mean|u0 − z*|`` (``"l1"``, the paper's) or ``mean (u0 − z*)²`` (``"l2"``).
    By default ``z*`` is a *detached target* in this loss (``detach_skip_target=True``): the skip loss
    trains the predictor of ``u0`` (the shortcut, or ``f``'s one-step map in Skip Reg.) towards the fixed
    point and does not pull the fixed point towards the predictor (which would also cost a second adjoint
    solve). Set ``detach_skip_target=False`` for the reference package's coupling, where the skip loss also
    differentiates through ``z*``.

    Args:
        model, solver: as :class:`DeepEquilibriumNetwork`.
        shortcut: the explicit predictor ``x -> u0`` (state-shaped output), or ``None`` for Skip Reg.
        skip_loss: ``"l1"`` or ``"l2"``.
        detach_skip_target: see above.
        **kwargs: the keyword arguments of :class:`DeepEquilibriumNetwork`.
    """

    def __init__(self, model: nn.Module, solver: Any, shortcut: Optional[nn.Module] = None, *,
                 skip_loss: SkipLoss = "l1", detach_skip_target: bool = True, **kwargs: Any):
        super().__init__(model, solver, **kwargs)
        _configure_skip(self, shortcut, skip_loss, detach_skip_target)


SkipDEQ = SkipDeepEquilibriumNetwork


class _Zero(nn.Module):
    """Marks a missing off-diagonal entry of a mapping matrix (no connection)."""

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - never called
        raise RuntimeError("_Zero is a placeholder")


class MultiScaleMap(nn.Module):
    """The multiscale DEQ map ``f(z, x)`` on a list state ``z = [z_1, …, z_n]``.

    ``m_1 = main_layers[0](z_1, x)``, ``m_i = main_layers[i](z_i)`` (i > 1);
    ``out_j = Σ_i mapping_layers[i][j](m_i)`` (``None`` on the diagonal means identity, ``None`` off the
    diagonal means no connection); then ``post_fuse_layers[j](out_j)`` when given.
    """

    def __init__(self, main_layers: Sequence[nn.Module], mapping_layers: Sequence[Sequence[Optional[nn.Module]]],
                 post_fuse_layers: Optional[Sequence[Optional[nn.Module]]] = None):
        super().__init__()
        n = len(main_layers)
        if len(mapping_layers) != n or any(len(row) != n for row in mapping_layers):
            raise ValueError(f"MultiScaleMap: mapping_layers must be a {n}x{n} matrix (one row and column per "
                             f"scale), got rows of lengths {[len(r) for r in mapping_layers]}")
        if post_fuse_layers is not None and len(post_fuse_layers) != n:
            raise ValueError(f"MultiScaleMap: expected {n} post_fuse_layers, got {len(post_fuse_layers)}")
        self.main_layers = nn.ModuleList(main_layers)
        rows = []
        for i, row in enumerate(mapping_layers):
            rows.append(nn.ModuleList([
                (nn.Identity() if i == j else _Zero()) if m is None else m for j, m in enumerate(row)]))
        self.mapping_layers = nn.ModuleList(rows)
        self.post_fuse_layers = None if post_fuse_layers is None else nn.ModuleList(
            [nn.Identity() if m is None else m for m in post_fuse_layers])

    @property
    def num_scales(self) -> int:
        return len(self.main_layers)

    def forward(self, z: Sequence[Tensor], x: Tensor) -> List[Tensor]:
        n = self.num_scales
        if len(z) != n:
            raise ValueError(f"MultiScaleMap: expected a state of {n} scales, got {len(z)}")
        main = [self.main_layers[0](z[0], x)] + [self.main_layers[i](z[i]) for i in range(1, n)]
        out = []
        for j in range(n):
            acc = None
            for i in range(n):
                m = self.mapping_layers[i][j]
                if isinstance(m, _Zero):
                    continue
                y = m(main[i])
                acc = y if acc is None else acc + y
            if self.post_fuse_layers is not None:
                acc = self.post_fuse_layers[j](acc)
            out.append(acc)
        return out


class MultiScaleDeepEquilibriumNetwork(DeepEquilibriumNetwork):
    """Multiscale (MDEQ-style) DEQ whose state is a list of tensors, one per resolution.

    Args:
        main_layers: one module per scale; ``main_layers[0](z_1, x)`` gets the injection, the others
            ``main_layers[i](z_i)``.
        mapping_layers: ``n × n`` matrix, entry ``[i][j]`` maps scale ``i`` to scale ``j``
            (``None``/``nn.Identity()`` on the diagonal).
        post_fuse_layers: optional per-scale modules applied after the fusion (or ``None``).
        solver: as :class:`DeepEquilibriumNetwork` (solvers accept list states).
        scales: per-sample shapes of the state, e.g. ``[(8, 28, 28), (16, 14, 14)]``.
        **kwargs: the keyword arguments of :class:`DeepEquilibriumNetwork` (except ``z_shape``).

    Returns (from ``forward``): ``(list of z*_i, solution)``.
    """

    def __init__(self, main_layers: Sequence[nn.Module], mapping_layers: Sequence[Sequence[Optional[nn.Module]]],
                 post_fuse_layers: Optional[Sequence[Optional[nn.Module]]], solver: Any,
                 scales: Sequence[Sequence[int]], **kwargs: Any):
        if "z_shape" in kwargs:
            raise TypeError(f"{type(self).__name__}: use scales=..., not z_shape")
        model = MultiScaleMap(main_layers, mapping_layers, post_fuse_layers)
        if len(scales) != model.num_scales:
            raise ValueError(f"{type(self).__name__}: got {len(scales)} scales for {model.num_scales} main layers")
        super().__init__(model, solver, **kwargs)
        self.scales = [tuple(int(d) for d in s) for s in scales]

    def _zeros(self, x: Tensor) -> State:
        if self.initializer is not None:
            with torch.no_grad():
                return list(self.initializer(x))
        return [x.new_zeros((x.shape[0], *s)) for s in self.scales]


class _PerScaleShortcut(nn.Module):
    """Applies one module per scale to the same ``x`` and returns the list."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> List[Tensor]:
        return [m(x) for m in self.layers]


class MultiScaleSkipDeepEquilibriumNetwork(MultiScaleDeepEquilibriumNetwork):
    """Multiscale Skip DEQ (``shortcut_layers`` given) or Skip Reg. DEQ (``shortcut_layers=None``).

    Args:
        main_layers, mapping_layers, post_fuse_layers, solver, scales: as
            :class:`MultiScaleDeepEquilibriumNetwork`.
        shortcut_layers: a sequence of modules, one per scale, each applied to ``x``; or one module that
            returns the list of per-scale initial states; or ``None`` (Skip Reg.: ``u0 = f(0, x)``).
        skip_loss, detach_skip_target: as :class:`SkipDeepEquilibriumNetwork`.
    """

    def __init__(self, main_layers: Sequence[nn.Module], mapping_layers: Sequence[Sequence[Optional[nn.Module]]],
                 post_fuse_layers: Optional[Sequence[Optional[nn.Module]]], solver: Any,
                 scales: Sequence[Sequence[int]], shortcut_layers: Union[None, nn.Module, Sequence[nn.Module]] = None,
                 *, skip_loss: SkipLoss = "l1", detach_skip_target: bool = True, **kwargs: Any):
        super().__init__(main_layers, mapping_layers, post_fuse_layers, solver, scales, **kwargs)
        if shortcut_layers is not None and not isinstance(shortcut_layers, nn.Module):
            if len(shortcut_layers) != len(self.scales):
                raise ValueError(f"{type(self).__name__}: expected {len(self.scales)} shortcut_layers, "
                                 f"got {len(shortcut_layers)}")
            shortcut_layers = _PerScaleShortcut(shortcut_layers)
        _configure_skip(self, shortcut_layers, skip_loss, detach_skip_target)
