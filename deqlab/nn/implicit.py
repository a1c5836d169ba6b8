"""Gradients of a DEQ layer: the implicit backward and its cheaper approximations.

The forward solve runs without building a graph. To give ``z*`` gradients, the layer passes
``(z*, x, *parameters)`` through :class:`_EquilibriumGradient`, one ``torch.autograd.Function`` defined at
module level whose forward is the identity on ``z*`` (so the returned tensor equals the solver's iterate
exactly) and whose backward asks a *backward mode* object for ``dL/dx`` and ``dL/dθ``:

* :class:`ImplicitBackward` (default): solve the adjoint fixed point ``g = Jᵀ g + dL/dz*`` with
  ``J = ∂f/∂z`` at ``z*`` (matrix-free VJPs through one graph of ``f(z*, x)`` built in the backward),
  then ``dL/dθ = gᵀ ∂f/∂θ``, ``dL/dx = gᵀ ∂f/∂x`` with one more VJP.
* :class:`JacobianFreeBackward`: ``g = dL/dz*`` (Fung et al., "JFB"): one VJP, no linear solve.
* :class:`PhantomGradient`: backprop through ``steps`` damped applications of ``f`` started at ``z*``.

Every parameter of the map is an input of the Function, so autograd routes its gradient even under
DDP (every parameter receives a gradient, zeros when ``f`` does not use it), and ``x`` gets a gradient so
the explicit stem before the DEQ trains.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from deqlab.state import flatten, from_parts, unflatten

__all__ = ["BackwardMode", "ImplicitBackward", "JacobianFreeBackward", "PhantomGradient"]


# --------------------------------------------------------------------------------------------------------
# What the Function needs to re-evaluate f in the backward
# --------------------------------------------------------------------------------------------------------


@dataclass
class _GradientSpec:
    """Everything the backward needs besides the saved tensors."""

    f: Callable[[Any, Tensor], Any]  # f(state, x) -> state
    is_list: bool
    n_parts: int
    n_params: int
    stateful: Sequence[Any]  # EquilibriumStateful modules
    snapshots: List[Dict[str, Any]]  # their state after the forward solve
    grad_slots: List[Tuple[int, str]]  # (module index, key) of snapshot tensors that require grad
    mode: "BackwardMode"
    nfe_box: List[int]
    on_backward: Optional[Callable[[int], None]] = None
    check_foreign: List[bool] = field(default_factory=lambda: [True])

    @contextlib.contextmanager
    def installed(self, grad_state: Sequence[Tensor]):
        """Temporarily put the forward's module state back (with ``grad_state`` as the grad tensors)."""
        snaps = [dict(s) for s in self.snapshots]
        for (i, key), t in zip(self.grad_slots, grad_state):
            snaps[i][key] = t
        old = [m.deq_state() for m in self.stateful]
        for m, s in zip(self.stateful, snaps):
            m.deq_load_state(s)
        try:
            yield
        finally:
            for m, s in zip(self.stateful, old):
                m.deq_load_state(s)

    def evaluate(self, z_parts: Sequence[Tensor], x: Tensor, grad_state: Sequence[Tensor]) -> List[Tensor]:
        with self.installed(grad_state):
            out = self.f(from_parts(list(z_parts), self.is_list), x)
        return [out] if isinstance(out, Tensor) else list(out)


class _Linearization:
    """One graph of ``f`` at ``z*`` and the VJPs a backward mode needs; counts VJPs."""

    def __init__(self, spec: _GradientSpec, z_star: Sequence[Tensor], x: Tensor, params: Sequence[Tensor],
                 grad_state: Sequence[Tensor], needs: Sequence[bool]):
        self.spec = spec
        self.z = [t.detach().requires_grad_() for t in z_star]
        self.x = x.detach().requires_grad_(bool(needs[0]))
        self.state = [t.detach().requires_grad_() for t in grad_state]
        self.params = list(params)
        self.needs = list(needs)
        self.nvjp = 0
        with torch.enable_grad():
            self.fz = spec.evaluate(self.z, self.x, self.state)
        if spec.check_foreign[0]:
            spec.check_foreign[0] = False
            _warn_foreign_leaves(self.fz, [*self.z, self.x, *self.params, *self.state])

    def vjp_z(self, v: Tensor) -> Tensor:
        """``vᵀ ∂f/∂z`` for a flat ``(B, N)`` ``v``."""
        self.nvjp += 1
        grads = torch.autograd.grad(self.fz, self.z, unflatten(v, self.fz), retain_graph=True,
                                    allow_unused=True)
        return flatten([torch.zeros_like(z) if g is None else g for g, z in zip(grads, self.z)])

    def vjp_inputs(self, v: Tensor) -> List[Optional[Tensor]]:
        """``vᵀ ∂f/∂(x, θ, state)`` for the inputs that need a gradient (``None`` elsewhere)."""
        return vjp_inputs(self.fz, v, self.x, self.params, self.state, self.needs, retain_graph=False,
                          counter=self)


def vjp_inputs(outputs: Sequence[Tensor], v: Tensor, x: Tensor, params: Sequence[Tensor],
               state: Sequence[Tensor], needs: Sequence[bool], *, retain_graph: bool,
               counter: Any = None) -> List[Optional[Tensor]]:
    """VJP of ``outputs`` with the flat cotangent ``v`` w.r.t. ``[x, *params, *state]`` (masked by ``needs``).

    Parameters that need a gradient but are not reached get zeros (DDP expects every parameter to get
    one); ``x`` and state tensors that are not reached get ``None``.
    """
    candidates = [x, *params, *state]
    idx = [i for i, n in enumerate(needs) if n and candidates[i].requires_grad]
    result: List[Optional[Tensor]] = [None] * len(candidates)
    if counter is not None:
        counter.nvjp += 1
    if idx:
        grads = torch.autograd.grad(outputs, [candidates[i] for i in idx], unflatten(v, outputs),
                                    retain_graph=retain_graph, allow_unused=True)
        for i, g in zip(idx, grads):
            result[i] = g
    for i in range(1, 1 + len(params)):
        if needs[i] and result[i] is None:
            result[i] = torch.zeros_like(candidates[i])
    return result


def _warn_foreign_leaves(outputs: Sequence[Tensor], known: Sequence[Tensor]) -> None:
    """Warn once if ``f`` uses trainable tensors that are not parameters of the DEQ map (lost gradients)."""
    known_ids = {id(t) for t in known}
    seen = set()
    stack = [o.grad_fn for o in outputs if o.grad_fn is not None]
    foreign = []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None:
            if id(var) not in known_ids:
                foreign.append(tuple(var.shape))
            continue
        stack.extend(n for n, _ in node.next_functions)
    if foreign:
        warnings.warn(
            "The DEQ map uses trainable tensors that are not parameters of the DEQ layer's modules "
            f"(shapes {foreign[:5]}); the implicit backward cannot give them gradients. Register them "
            "as parameters of the map module (or pass them through the injection x).",
            RuntimeWarning,
            stacklevel=3,
        )


class _EquilibriumGradient(torch.autograd.Function):
    """Identity on ``z*`` in the forward; the backward mode's gradient in the backward.

    Inputs: ``(spec, x, *z_parts, *params, *grad_state)``.
    """

    @staticmethod
    def forward(ctx, spec: _GradientSpec, x: Tensor, *tensors: Tensor):
        n, p = spec.n_parts, spec.n_params
        ctx.spec = spec
        # Parameters are used by f directly (not the saved copies), so they are held by reference: a
        # saved_tensors_hooks unpack (e.g. CPU offload) may return other tensor objects, which f would not
        # use. Their version counters are checked in the backward instead.
        ctx.params = tensors[n:n + p]
        ctx.versions = [t._version for t in ctx.params]
        ctx.save_for_backward(x, *tensors[:n], *tensors[n + p:])
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_z: Tensor):
        spec: _GradientSpec = ctx.spec
        x, *tensors = ctx.saved_tensors
        n = spec.n_parts
        z_star, grad_state = tensors[:n], tensors[n:]
        params = ctx.params
        for t, v in zip(params, ctx.versions):
            if t._version != v:
                raise RuntimeError(
                    "A parameter of the DEQ map was modified in place between the forward and the backward "
                    f"(shape {tuple(t.shape)}); call backward before optimizer.step()")
        needs = [ctx.needs_input_grad[1]] + list(ctx.needs_input_grad[2 + n:])
        grad_parts = [torch.zeros_like(z) if g is None else g for g, z in zip(grad_z, z_star)]
        v = flatten(grad_parts)
        grads, nvjp = spec.mode.gradients(spec, z_star, x, params, grad_state, needs, v)
        spec.nfe_box[0] += nvjp
        if spec.on_backward is not None:
            spec.on_backward(nvjp)
        gx, rest = grads[0], grads[1:]
        return (None, gx, *([None] * n), *rest)


def attach_gradient(spec: _GradientSpec, z_parts: Sequence[Tensor], x: Tensor, params: Sequence[Tensor],
                    grad_state: Sequence[Tensor]) -> List[Tensor]:
    """Return ``z_parts`` (values unchanged) connected to ``x``/``params`` through the backward mode."""
    out = _EquilibriumGradient.apply(spec, x, *[z.detach() for z in z_parts], *params, *grad_state)
    return list(out)


# --------------------------------------------------------------------------------------------------------
# Backward modes
# --------------------------------------------------------------------------------------------------------


class BackwardMode:
    """How a DEQ layer turns ``dL/dz*`` into ``dL/dx`` and ``dL/dθ``. Subclass and implement
    :meth:`gradients`; pass an instance as ``backward=`` to a DEQ layer."""

    def gradients(self, spec: _GradientSpec, z_star: Sequence[Tensor], x: Tensor, params: Sequence[Tensor],
                  grad_state: Sequence[Tensor], needs: Sequence[bool], v: Tensor
                  ) -> Tuple[List[Optional[Tensor]], int]:
        """Return gradients for ``[x, *params, *grad_state]`` and the number of VJPs spent."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


SolverSpec = Union[str, Callable[..., Any]]


class ImplicitBackward(BackwardMode):
    """Exact implicit differentiation: solve ``g = Jᵀ g + dL/dz*`` at the fixed point.

    Each solver step costs one VJP through a graph of ``f(z*, x)`` built once per backward; the final
    parameter/input gradient costs one more VJP. ``solution.backward_nfe`` counts all of them.

    Args:
        solver: ``"gmres"`` (default: solves ``(I − Jᵀ) g = dL/dz*`` even when ``f`` is not a
            contraction, as in the paper's adjoint; it stays within budget as training makes the map
            less contractive, where Anderson with a short memory stalls in float32), ``"anderson"``,
            ``"fixed_point"`` (cheapest per step for strongly contractive maps), ``"broyden"``,
            ``"lbroyden"``, or a solver object from :mod:`deqlab.solvers` called as ``solver(h, g0)``.
        tol: relative tolerance of the adjoint solve (``||r|| <= tol * ||dL/dz*||`` for GMRES, the
            solver's ``rel_norm`` termination otherwise).
        max_steps: cap on adjoint solver steps (VJPs), so a hard backward never runs unbounded.
        restart: GMRES restart length (``None``: no restarts within ``max_steps``).
        warn_unconverged: warn when the adjoint solve does not reach ``tol``.
    """

    def __init__(self, solver: SolverSpec = "gmres", *, tol: float = 1e-6, max_steps: int = 50,
                 restart: Optional[int] = None, warn_unconverged: bool = False):
        if isinstance(solver, str) and solver not in {"gmres", "fixed_point", "anderson", "broyden",
                                                       "lbroyden", "newton_krylov"}:
            raise ValueError(f"ImplicitBackward: unknown solver {solver!r}; expected 'gmres', "
                             "'fixed_point', 'anderson', 'broyden', 'lbroyden' or a solver object")
        if tol < 0 or max_steps < 1:
            raise ValueError(f"ImplicitBackward: need tol >= 0 and max_steps >= 1, got {tol}, {max_steps}")
        self.solver = solver
        self.tol = float(tol)
        self.max_steps = int(max_steps)
        self.restart = restart
        self.warn_unconverged = warn_unconverged
        self._solver_obj = None
        self.last_converged: Optional[bool] = None

    def _discrete_solver(self):
        if self._solver_obj is None:
            from deqlab.solvers import DiscreteDEQSolver

            self._solver_obj = DiscreteDEQSolver(self.solver, mode="rel_norm", abstol_termination=self.tol,
                                                 reltol_termination=self.tol, max_steps=self.max_steps)
        return self._solver_obj

    def solve_adjoint(self, vjp: Callable[[Tensor], Tensor], v: Tensor) -> Tensor:
        """Solve ``g = vjp(g) + v`` for a flat ``(B, N)`` ``v``."""
        if not bool(v.ne(0).any()):
            self.last_converged = True
            return torch.zeros_like(v)
        if self.solver == "gmres":
            from deqlab.solvers import gmres

            restart = min(self.restart or self.max_steps, self.max_steps)
            g, info = gmres(lambda u: u - vjp(u), v, tol=self.tol, restart=restart,
                            max_restarts=max(1, -(-self.max_steps // restart)))
            conv = _info_converged(info)
        else:
            solver = self._discrete_solver() if isinstance(self.solver, str) else self.solver
            res = solver(lambda g: vjp(g) + v, v.clone())
            g = res.z
            conv = bool(res.converged.all())
        self.last_converged = conv
        if self.warn_unconverged and conv is False:
            warnings.warn("ImplicitBackward: the adjoint solve did not reach its tolerance", RuntimeWarning)
        return g

    def gradients(self, spec, z_star, x, params, grad_state, needs, v):
        lin = _Linearization(spec, z_star, x, params, grad_state, needs)
        with torch.no_grad():
            g = self.solve_adjoint(lin.vjp_z, v)
        grads = lin.vjp_inputs(g.detach())
        return grads, lin.nvjp


def _info_converged(info: Any) -> Optional[bool]:
    """Best-effort reading of a GMRES ``info`` (dict, record or tensor mask)."""
    val = None
    if isinstance(info, dict):
        val = info.get("converged")
    else:
        val = getattr(info, "converged", info if isinstance(info, (Tensor, bool)) else None)
    if isinstance(val, Tensor):
        return bool(val.all())
    if isinstance(val, bool):
        return val
    return None


class JacobianFreeBackward(BackwardMode):
    """Jacobian-free backpropagation (Fung et al. 2022): use ``g = dL/dz*`` (drop the ``(I − J)⁻ᵀ``
    factor), i.e. differentiate one application of ``f`` at ``z*``. One VJP per backward; a descent
    direction when ``f`` is contractive, not the exact gradient."""

    def gradients(self, spec, z_star, x, params, grad_state, needs, v):
        lin = _Linearization(spec, z_star, x, params, grad_state, needs)
        return lin.vjp_inputs(v), lin.nvjp


class PhantomGradient(BackwardMode):
    """Phantom gradient (Geng et al. 2021): backprop through ``steps`` damped applications
    ``z ← (1 − damping) z + damping f(z, x)`` started at ``z*`` (detached). Costs ``steps`` evaluations
    of ``f`` plus their backward; interpolates between JFB (``steps=1, damping=1``) and the implicit
    gradient (``steps → ∞``).

    Args:
        steps: number of unrolled applications.
        damping: τ in ``(0, 1]``.
    """

    def __init__(self, steps: int = 5, damping: float = 0.5):
        if steps < 1 or not 0.0 < damping <= 1.0:
            raise ValueError(f"PhantomGradient: need steps >= 1 and 0 < damping <= 1, got {steps}, {damping}")
        self.steps = int(steps)
        self.damping = float(damping)

    def gradients(self, spec, z_star, x, params, grad_state, needs, v):
        x_ = x.detach().requires_grad_(bool(needs[0]))
        state = [t.detach().requires_grad_() for t in grad_state]
        z = [t.detach() for t in z_star]
        tau = self.damping
        with torch.enable_grad():
            for _ in range(self.steps):
                fz = spec.evaluate(z, x_, state)
                z = [(1.0 - tau) * zi + tau * fi for zi, fi in zip(z, fz)] if tau != 1.0 else fz
        grads = vjp_inputs(z, v, x_, params, state, needs, retain_graph=False)
        return grads, self.steps
