"""Gradients of a DEQ layer: the implicit backward and its cheaper approximations.

The forward solve runs without building a graph. To give ``z*`` gradients, the layer passes
``(z*, x, *parameters)`` through `_EquilibriumGradient`, one ``torch.autograd.Function`` defined at
module level whose forward is the identity on ``z*`` (so the returned tensor equals the solver's iterate
exactly) and whose backward hands a *backward mode* the [`EquilibriumProblem`][deqlab.nn.EquilibriumProblem] (the fixed point and
how to re-evaluate ``f`` there) and the cotangent ``dL/dz*``, and gets a [`BackwardResult`][deqlab.nn.BackwardResult]:

* [`ImplicitBackward`][deqlab.nn.ImplicitBackward] (default): solve the adjoint system ``(I − Jᵀ) g = dL/dz*`` with
  ``J = ∂f/∂z`` at ``z*`` (matrix-free VJPs through one graph of ``f(z*, x)`` built in the backward) with
  any [`LinearSolver`][deqlab.solvers.LinearSolver], then ``dL/dθ = gᵀ ∂f/∂θ``, ``dL/dx = gᵀ ∂f/∂x``.
* [`JacobianFreeBackward`][deqlab.nn.JacobianFreeBackward]: ``g = dL/dz*`` (Fung et al., "JFB"): one VJP, no linear solve.
* [`PhantomGradient`][deqlab.nn.PhantomGradient]: backprop through ``steps`` damped applications of ``f`` started at ``z*``.
* [`NeumannPhantomGradient`][deqlab.nn.NeumannPhantomGradient]: the truncated Neumann series ``Σ_{i<k} (Jᵀ)ⁱ dL/dz*``
  in place of the adjoint solve (``k − 1`` VJPs).

What the backward spent and whether its solve met the tolerance is written into the layer's
[`DeepEquilibriumSolution`][deqlab.nn.DeepEquilibriumSolution] (``backward_nfe``, ``backward_residual``,
``backward_converged``), the one record of the solve.

Every parameter of the map is an input of the Function, so autograd routes its gradient even under
DDP (every parameter receives a gradient, zeros when ``f`` does not use it), and ``x`` gets a gradient so
the explicit stem before the DEQ trains.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, cast

import torch
from torch import Tensor
from torch.autograd.graph import Node

from deqlab import instrument
from deqlab.nn.reporting import user_stacklevel
from deqlab.nn.running_stats import frozen_running_stats
from deqlab.solvers.compiled import CompileOption, check_compile_option
from deqlab.solvers.linear import GMRES, FixedPointLinearSolver
from deqlab.solvers.protocols import LinearSolver, Solver
from deqlab.state import flatten, from_parts, unflatten

__all__ = [
    "BackwardMode",
    "BackwardResult",
    "EquilibriumProblem",
    "ImplicitBackward",
    "JacobianFreeBackward",
    "Linearization",
    "NeumannPhantomGradient",
    "PhantomGradient",
    "DEFAULT_ADJOINT_MAX_STEPS",
]

#: The default VJP budget of [`ImplicitBackward`][deqlab.nn.ImplicitBackward] (the paper's protocol: at most 15).
DEFAULT_ADJOINT_MAX_STEPS = 15

_HALF = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------------
# What a backward mode receives and returns
# --------------------------------------------------------------------------------------------------------


class EquilibriumProblem:
    """The fixed point of one forward and how to re-evaluate the map there: what a backward mode needs.

    The layer builds it inside the backward and passes it to `BackwardMode.gradients`; build one
    yourself only to test a backward mode in isolation. Every argument is keyword-only, so the layer's
    call site names what each value is.

    Args:
        f: the layer's map ``f(z, x)`` (state, injection -> state), as the forward evaluated it.
        is_list: whether the state is a list of tensors (multiscale), so `evaluate` rebuilds the
            structure ``f`` expects from the flat parts.
        z_star: the fixed point as a list of detached tensors (one per scale; one for a tensor state).
        x: the injection (detached).
        params: the map's parameters that require grad.
        grad_state: per-solve module state that requires grad (e.g. a weight-normed weight).
        needs: one bool per entry of ``[x, *params, *grad_state]``: whether autograd wants its gradient,
            so VJPs skip the inputs nobody asked for.
        forward_tol: the forward solver's termination tolerance (``None``: unknown), the default adjoint
            tolerance.
        stateful: the map's [`EquilibriumStateful`][deqlab.nn.EquilibriumStateful] modules, whose forward state is re-installed.
        snapshots: their ``deq_state()`` dicts taken in the forward (same order as ``stateful``).
        grad_slots: ``(module index, key)`` of each ``grad_state`` tensor inside ``snapshots``.
        owner: the layer. Default ``None``: no owner, so the one-time check that ``f`` uses no trainable
            tensors outside the layer's modules (a warning per owner) is skipped.
        autocast: ``(device_type, dtype)`` of the forward's ``torch.autocast``, re-entered so the backward
            linearizes the map the forward iterated. Default ``None``: the forward ran without autocast.
        map_modules: the map's modules; their train-mode BatchNorms normalise with batch statistics in
            `evaluate` but do not update their running statistics (the forward updated them once, at
            ``z*``). Default ``()``: nothing to freeze.
        solver_result: the forward's [`SolverResult`][deqlab.solvers.SolverResult], for backward modes
            that need more of the solve than ``z*`` (the reversible backward reads its final pair).
            Default ``None``: not given.

    Attributes:
        z_star: the fixed point as a list of detached tensors (one per scale; one for a tensor state).
        x: the injection (detached).
        params: the map's parameters that require grad (the gradients returned for them are accumulated
            by autograd).
        grad_state: per-solve module state that requires grad (e.g. a weight-normed weight computed once
            per forward), routed like parameters.
        needs: which of ``[x, *params, *grad_state]`` need a gradient.
        forward_tol: the tolerance of the forward solver's termination (``solver.termination.tol``), the
            default tolerance of the adjoint solve.
        solver_result: the forward's [`SolverResult`][deqlab.solvers.SolverResult] (``None`` when not given).

    Methods:
        evaluate(z_parts, x, grad_state): ``f(z, x)`` as a list of tensors, with the forward's module
            state (dropout mask, normalised weights) re-installed.
        linearize(): a [`Linearization`][deqlab.nn.Linearization] of ``f`` at ``z*``.

    Example:
        >>> import torch
        >>> from deqlab.nn import EquilibriumProblem
        >>> x = torch.ones(2, 3)
        >>> problem = EquilibriumProblem(                    # f(z, x) = z / 2 + x at its fixed point z* = 2x
        ...     f=lambda z, x: 0.5 * z + x, is_list=False, z_star=[2 * x], x=x, params=[], grad_state=[],
        ...     needs=[True], forward_tol=1e-6, stateful=[], snapshots=[], grad_slots=[])
        >>> problem.evaluate(problem.z_star, x, [])[0].tolist()   # f(z*) = z*
        [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
        >>> type(problem.linearize()).__name__
        'Linearization'
    """

    def __init__(
        self,
        *,
        f: Callable[[Any, Tensor], Any],
        is_list: bool,
        z_star: Sequence[Tensor],
        x: Tensor,
        params: Sequence[Tensor],
        grad_state: Sequence[Tensor],
        needs: Sequence[bool],
        forward_tol: Optional[float],
        stateful: Sequence[Any],
        snapshots: List[Dict[str, Any]],
        grad_slots: List[Tuple[int, str]],
        owner: Any = None,
        autocast: Optional[Tuple[str, torch.dtype]] = None,
        map_modules: Sequence[Any] = (),
        solver_result: Any = None,
    ):
        self._f = f
        self.is_list = is_list
        self.z_star = list(z_star)
        self.x = x
        self.params = list(params)
        self.grad_state = list(grad_state)
        self.needs = list(needs)
        self.forward_tol = forward_tol
        self._stateful = stateful
        self._snapshots = snapshots
        self._grad_slots = grad_slots
        self._owner = owner
        self._autocast = autocast
        self._map_modules = list(map_modules)
        self.solver_result = solver_result

    @contextlib.contextmanager
    def _installed(self, grad_state: Sequence[Tensor]):
        """Temporarily put the forward's module state back (with ``grad_state`` as the grad tensors)."""
        snaps = [dict(s) for s in self._snapshots]
        for (i, key), t in zip(self._grad_slots, grad_state):
            snaps[i][key] = t
        old = [m.deq_state() for m in self._stateful]
        for m, s in zip(self._stateful, snaps):
            m.deq_load_state(s)
        try:
            yield
        finally:
            for m, s in zip(self._stateful, old):
                m.deq_load_state(s)

    def evaluate(self, z_parts: Sequence[Tensor], x: Tensor, grad_state: Sequence[Tensor]) -> List[Tensor]:
        """``f(z, x)`` as a list of tensors, with the forward's module state and autocast re-installed.

        Args:
            z_parts: the state as a list of tensors (one per scale).
            x: the injection.
            grad_state: tensors to use for the grad-requiring module state (in ``grad_slots`` order).

        Returns:
            ``f(z, x)`` as a list of tensors.
        """
        # the forward's autocast state, so the backward linearizes the map the forward iterated
        amp = torch.autocast(self._autocast[0], dtype=self._autocast[1]) if self._autocast else contextlib.nullcontext()
        with self._installed(grad_state), amp, frozen_running_stats(self._map_modules):
            out = self._f(from_parts(list(z_parts), self.is_list), x)
        return [out] if isinstance(out, Tensor) else list(out)

    def linearize(self) -> "Linearization":
        """One graph of ``f`` at ``z*`` for VJPs.

        Returns:
            A [`Linearization`][deqlab.nn.Linearization] of ``f`` at ``z*``.
        """
        return Linearization(self)


_FOREIGN_CHECKED: "weakref.WeakSet" = weakref.WeakSet()


class Linearization:
    """One graph of ``f`` at ``z*`` and the VJPs a backward mode needs; counts them in ``nvjp``.

    Building it evaluates ``f`` once with grad enabled; every VJP then reuses that graph, so an adjoint
    solve of ``k`` steps costs ``k`` VJPs and no further evaluations of ``f``. While `deqlab.instrument`
    records, building it is region ``"adjoint.linearize"`` (the backward modes time their VJPs as
    ``"adjoint.vjp"`` and ``"adjoint.vjp_inputs"``).

    Args:
        problem: the [`EquilibriumProblem`][deqlab.nn.EquilibriumProblem] to linearize (usually ``problem.linearize()`` builds it).

    Example:
        >>> import torch
        >>> from deqlab.nn import EquilibriumProblem
        >>> x = torch.ones(2, 3)
        >>> problem = EquilibriumProblem(                    # f(z, x) = z / 2 + x at its fixed point z* = 2x
        ...     f=lambda z, x: 0.5 * z + x, is_list=False, z_star=[2 * x], x=x, params=[], grad_state=[],
        ...     needs=[True], forward_tol=1e-6, stateful=[], snapshots=[], grad_slots=[])
        >>> lin = problem.linearize()
        >>> lin.vjp_z(torch.ones(2, 3)).tolist()       # vᵀ ∂f/∂z = v / 2
        [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
        >>> lin.vjp_inputs(torch.ones(2, 3))[0].tolist(), lin.nvjp   # vᵀ ∂f/∂x = v; two VJPs so far
        ([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], 2)
    """

    def __init__(self, problem: EquilibriumProblem):
        self.problem = problem
        self.z = [t.detach().requires_grad_() for t in problem.z_star]
        self.x = problem.x.detach().requires_grad_(bool(problem.needs[0]))
        self.state = [t.detach().requires_grad_() for t in problem.grad_state]
        self.params = problem.params
        self.needs = problem.needs
        self.nvjp = 0
        with torch.enable_grad(), instrument.region("adjoint.linearize"):
            self.fz = problem.evaluate(self.z, self.x, self.state)
        owner = problem._owner
        if owner is not None and owner not in _FOREIGN_CHECKED:
            _FOREIGN_CHECKED.add(owner)
            _warn_foreign_leaves(self.fz, [*self.z, self.x, *self.params, *self.state])

    def vjp_z(self, v: Tensor) -> Tensor:
        """``vᵀ ∂f/∂z`` for a flat ``(B, N)`` ``v`` (keeps the graph for the next VJP).

        Args:
            v: the flat cotangent, shape ``(B, N)`` with ``N`` the per-sample state size.

        Returns:
            ``vᵀ ∂f/∂z``, flat ``(B, N)``.
        """
        self.nvjp += 1
        grads = torch.autograd.grad(self.fz, self.z, unflatten(v, self.fz), retain_graph=True, allow_unused=True)
        return flatten([torch.zeros_like(z) if g is None else g for g, z in zip(grads, self.z)])

    def vjp_inputs(self, v: Tensor) -> List[Optional[Tensor]]:
        """``vᵀ ∂f/∂(x, θ, state)`` for the inputs that need a gradient (``None`` elsewhere); frees the graph.

        Args:
            v: the flat cotangent ``(B, N)``, usually the adjoint solution ``g``.

        Returns:
            Gradients for ``[x, *params, *grad_state]``: ``None`` where not needed, zeros for parameters
            ``f`` does not reach (DDP expects every parameter to get one).
        """
        self.nvjp += 1
        return vjp_inputs(self.fz, v, self.x, self.params, self.state, self.needs, retain_graph=False)


@dataclass
class BackwardResult:
    """What a backward mode returns.

    Attributes:
        grads: gradients for ``[x, *params, *grad_state]`` (``None`` where not needed).
        nfe: VJPs (or evaluations of ``f``) spent.
        residual: per-sample relative residual of the adjoint solve, when there was one.
        converged: whether the adjoint solve met its tolerance for every sample (``None``: no solve).

    Example:
        >>> import torch
        >>> from deqlab.nn import EquilibriumProblem
        >>> x = torch.ones(2, 3)
        >>> problem = EquilibriumProblem(                    # f(z, x) = z / 2 + x at its fixed point z* = 2x
        ...     f=lambda z, x: 0.5 * z + x, is_list=False, z_star=[2 * x], x=x, params=[], grad_state=[],
        ...     needs=[True], forward_tol=1e-6, stateful=[], snapshots=[], grad_slots=[])
        >>> from deqlab.nn import ImplicitBackward
        >>> result = ImplicitBackward(tol=1e-8).gradients(problem, torch.ones(2, 3))
        >>> result.grads[0].round(decimals=4).tolist()   # dL/dx = (I − J)⁻ᵀ v = 2v, with J = I/2
        [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
        >>> result.nfe, result.converged                 # one GMRES step + the final VJP
        (2, True)
    """

    grads: List[Optional[Tensor]]
    nfe: int
    residual: Optional[Tensor] = None
    converged: Optional[bool] = None


def vjp_inputs(
    outputs: Sequence[Tensor],
    v: Tensor,
    x: Tensor,
    params: Sequence[Tensor],
    state: Sequence[Tensor],
    needs: Sequence[bool],
    *,
    retain_graph: bool,
) -> List[Optional[Tensor]]:
    """VJP of ``outputs`` with the flat cotangent ``v`` w.r.t. ``[x, *params, *state]`` (masked by ``needs``).

    Parameters that need a gradient but are not reached get zeros (DDP expects every parameter to get
    one); ``x`` and state tensors that are not reached get ``None``.
    """
    candidates = [x, *params, *state]
    idx = [i for i, n in enumerate(needs) if n and candidates[i].requires_grad]
    result: List[Optional[Tensor]] = [None] * len(candidates)
    if idx:
        grads = torch.autograd.grad(
            outputs, [candidates[i] for i in idx], unflatten(v, outputs), retain_graph=retain_graph, allow_unused=True
        )
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
    stack: List[Optional[Node]] = [o.grad_fn for o in outputs if o.grad_fn is not None]
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
            stacklevel=user_stacklevel(),  # the user's forward or backward call, not a line of deqlab
        )


# --------------------------------------------------------------------------------------------------------
# The autograd Function
# --------------------------------------------------------------------------------------------------------


class _GradientContext:
    """What the Function carries besides tensors: the problem template, the mode and the record to fill."""

    def __init__(
        self,
        problem_args: Dict[str, Any],
        mode: "BackwardMode",
        n_parts: int,
        n_params: int,
        on_backward: Optional[Callable[[BackwardResult], None]] = None,
    ):
        self.problem_args = problem_args
        self.mode = mode
        self.n_parts = n_parts
        self.n_params = n_params
        #: the forward's thread: a CUDA backward runs in autograd's device thread and reports to the
        #: recording of this one (deqlab.instrument)
        self.thread = threading.get_ident()
        #: called with the BackwardResult (set by the layer once the solution record exists)
        self.on_backward = on_backward


_DOUBLE_BACKWARD = (
    "Differentiating the implicit gradient of a DEQ a second time (create_graph=True, e.g. "
    "torch.autograd.functional.hessian or a gradient penalty) is not supported: the adjoint solve is "
    "once-differentiable, whatever the backward mode (ImplicitBackward, JacobianFreeBackward and PhantomGradient "
    "alike). Use the unrolled map instead: `with layer.fixed_depth_mode(d):` (backprop through d applications "
    "of f, which can be differentiated twice)."
)


_FUNCTORCH = (
    "torch.func transforms (grad, hessian, jacrev, jvp, vmap) cannot go through a DEQ's implicit gradient: the "
    "backward solves a linear system with a data-dependent iteration that functorch cannot transform. Use "
    "torch.autograd for first derivatives (loss.backward(), torch.autograd.grad), or transform the unrolled map: "
    "inside `with layer.fixed_depth_mode(d):` torch.func.grad and torch.func.hessian work (backprop through d "
    "applications of f)."
)


class _EquilibriumGradient(torch.autograd.Function):
    """Identity on ``z*`` in the forward; the backward mode's gradient in the backward.

    Inputs: ``(context, x, *z_parts, *params, *grad_state)``.
    """

    @staticmethod
    def forward(ctx, context: _GradientContext, x: Tensor, *tensors: Tensor):
        n, p = context.n_parts, context.n_params
        ctx.context = context
        # Parameters are used by f directly (not the saved copies), so they are held by reference: a
        # saved_tensors_hooks unpack (e.g. CPU offload) may return other tensor objects, which f would not
        # use. Their version counters are checked in the backward instead.
        ctx.params = tensors[n : n + p]
        ctx.versions = [t._version for t in ctx.params]
        ctx.save_for_backward(x, *tensors[:n], *tensors[n + p :])
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grad_z: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD)
        with instrument._adopted(ctx.context.thread, "deq.backward"):
            context: _GradientContext = ctx.context
            x, *tensors = ctx.saved_tensors
            n = context.n_parts
            z_star, grad_state = tensors[:n], tensors[n:]
            params = ctx.params
            for t, v in zip(params, ctx.versions):
                if t._version != v:
                    raise RuntimeError(
                        "A parameter of the DEQ map was modified in place between the forward and the backward "
                        f"(shape {tuple(t.shape)}); call backward before optimizer.step()"
                    )
            needs = [ctx.needs_input_grad[1]] + list(ctx.needs_input_grad[2 + n :])
            grad_parts = [torch.zeros_like(z) if g is None else g for g, z in zip(grad_z, z_star)]
            v = flatten(grad_parts)
            problem = EquilibriumProblem(
                z_star=z_star, x=x, params=params, grad_state=grad_state, needs=needs, **context.problem_args
            )
            result = context.mode.gradients(problem, v)
            if context.on_backward is not None:
                context.on_backward(result)
            gx, rest = result.grads[0], result.grads[1:]
            return (None, gx, *([None] * n), *rest)


def attach_gradient(
    context: _GradientContext,
    z_parts: Sequence[Tensor],
    x: Tensor,
    params: Sequence[Tensor],
    grad_state: Sequence[Tensor],
) -> List[Tensor]:
    """Return ``z_parts`` (values unchanged) connected to ``x``/``params`` through the backward mode."""
    try:
        out = _EquilibriumGradient.apply(context, x, *[z.detach() for z in z_parts], *params, *grad_state)
    except RuntimeError as err:
        if "setup_context" in str(err):  # torch.func's refusal of a Function it cannot transform
            raise RuntimeError(_FUNCTORCH) from err
        raise
    return list(out)


# --------------------------------------------------------------------------------------------------------
# Backward modes
# --------------------------------------------------------------------------------------------------------


class BackwardMode:
    """How a DEQ layer turns ``dL/dz*`` into ``dL/dx`` and ``dL/dθ``.

    Subclass and implement `gradients`; pass an instance as ``backward=`` to a DEQ layer.

    Attributes:
        warn_unconverged: what a result with ``converged=False`` does. ``None`` (the class default)
            follows the layer's ``on_unconverged`` policy; ``True``/``False`` always / never warn. Declared
            here so every backward mode has it and the layer reads it as a plain attribute.

    Example:
        A toy mode written against the public problem type: JFB with the gradient doubled (for
        ``f = z/2 + x`` that happens to be the exact gradient, ``dz*/dx = 2``):

        >>> import torch
        >>> from torch import nn
        >>> from deqlab.nn import DEQ
        >>> from deqlab.solvers import DiscreteDEQSolver
        >>> class Half(nn.Module):                  # z* = 2x, so dz*/dx = 2
        ...     def forward(self, z, x):
        ...         return 0.5 * z + x
        >>> solver = DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-6, max_steps=30)
        >>> from deqlab.nn import BackwardMode, BackwardResult
        >>> class DoubledJFB(BackwardMode):
        ...     def gradients(self, problem, v):
        ...         lin = problem.linearize()
        ...         return BackwardResult(grads=lin.vjp_inputs(2 * v), nfe=lin.nvjp)
        >>> x = torch.ones(2, 3, requires_grad=True)
        >>> z_star, solution = DEQ(Half(), solver, backward=DoubledJFB())(x)
        >>> z_star.sum().backward()
        >>> x.grad[0].tolist(), solution.backward_nfe
        ([2.0, 2.0, 2.0], 1)
    """

    warn_unconverged: Optional[bool] = None

    def gradients(self, problem: EquilibriumProblem, v: Tensor) -> BackwardResult:
        """Gradients for ``[x, *problem.params, *problem.grad_state]`` given the flat ``(B, N)`` cotangent
        ``v = dL/dz*``, and what it cost (see [`BackwardResult`][deqlab.nn.BackwardResult]).

        Args:
            problem: the fixed point and how to re-evaluate (or linearize) the map there.
            v: the flat cotangent ``dL/dz*``, shape ``(B, N)``.

        Returns:
            A [`BackwardResult`][deqlab.nn.BackwardResult] with one gradient (or ``None``) per input.

        Raises:
            NotImplementedError: always here; subclasses implement it.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


AdjointSolver = Union[str, LinearSolver, Solver]


class ImplicitBackward(BackwardMode):
    """Exact implicit differentiation: solve ``(I − Jᵀ) g = dL/dz*`` at the fixed point.

    Each step of the linear solver costs one VJP through a graph of ``f(z*, x)`` built once per backward;
    the final parameter/input gradient costs one more VJP. ``solution.backward_nfe`` counts all of them,
    ``solution.backward_residual``/``backward_converged`` say whether the solve met its tolerance.

    Args:
        solver: the adjoint solver. A [`LinearSolver`][deqlab.solvers.LinearSolver] (e.g.
            ``GMRES(tol=1e-6, max_steps=30)``), a fixed-point [`Solver`][deqlab.solvers.Solver] (e.g.
            ``DiscreteDEQSolver("anderson", ...)``, run on ``g = Jᵀ g + dL/dz*`` through
            [`FixedPointLinearSolver`][deqlab.solvers.FixedPointLinearSolver]), or a name as shorthand: ``"gmres"`` (the
            default) builds ``GMRES(tol, max_steps, restart=restart)``; any other registered solver name
            builds ``FixedPointLinearSolver(get_solver(name, mode="rel_norm", abstol_termination=tol,
            reltol_termination=tol, max_steps=max_steps), max_steps=max_steps)`` (``max_steps`` VJPs at
            most, the linear solver's residual check included; ``"newton_krylov"`` with
            ``line_search=True``, which rejects the steps that noisy finite-difference products spoil in
            half precision). GMRES is the default because it solves the
            adjoint system even when ``f`` is not a contraction (the paper's adjoint), where fixed-point
            iteration and short-memory Anderson stall.
        tol: relative tolerance for a named solver. Default ``None``: the forward solver's termination
            tolerance (``solver.termination.tol``), the paper's protocol (an adjoint solved far more
            accurately than the forward buys no accuracy).
        max_steps: VJP budget of a named solver. Default ``None``: 15, the paper's protocol, which keeps a
            hard backward from costing more than a forward as training makes the map less contractive.
        restart: GMRES restart length for ``"gmres"``. Default ``None``: no restarts within ``max_steps``
            (with a 15-step budget the Krylov basis stays small).
        warn_unconverged: ``None`` (default): an unconverged adjoint follows the layer's ``on_unconverged``
            policy; ``True``/``False``: always / never warn for this backward.
        compile: for ``"gmres"``, each Arnoldi step's algebra as one compiled graph (`GMRES`'s
            ``compile``); for ``"fixed_point"``, ``"anderson"``, ``"broyden"`` and ``"lbroyden"``, the
            algorithm's step and termination bookkeeping as compiled graphs around each VJP
            (``DiscreteDEQSolver(compile=..., compile_map=False)``). The VJPs stay eager. Default
            ``False``. A layer built with ``compile=`` passes it here.

    With a solver object, its own ``tol``/``max_steps`` apply, and the mode's ``tol``/``max_steps``
    attributes report them (``ImplicitBackward(GMRES(max_steps=12)).max_steps == 12``). A fixed-point
    solver object is wrapped as ``FixedPointLinearSolver(solver)``, whose budget is known for a
    ``DiscreteDEQSolver`` (``max_steps + 2`` products); for other solvers pass
    ``FixedPointLinearSolver(solver, max_steps=N)``. Note that ``GMRES()`` built by hand has *its own*
    defaults (``tol=1e-6``, ``max_steps=50``), not this mode's (forward tolerance, 15 VJPs).
    Half-precision (float16/bfloat16) adjoints are solved in float32.

    Raises:
        ValueError: ``solver`` is an unknown name; ``restart`` is given for a name other than ``"gmres"``;
            ``tol`` is not a number >= 0; ``max_steps`` is not an int >= 1; ``tol``, ``max_steps`` or
            ``restart`` is given together with a solver object (set them on the object); ``solver`` is a
            ``DiscreteDEQSolver(per_sample_exit=True)`` (per-sample exit is not supported for adjoint
            solves) or a fixed-point solver whose VJP budget is unknown (see above).
        TypeError: ``solver`` is neither a name, a ``LinearSolver`` nor a fixed-point ``Solver``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deqlab.nn import DEQ
        >>> from deqlab.solvers import DiscreteDEQSolver
        >>> class Half(nn.Module):                  # z* = 2x, so dz*/dx = 2
        ...     def forward(self, z, x):
        ...         return 0.5 * z + x
        >>> solver = DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-6, max_steps=30)
        >>> from deqlab.nn import ImplicitBackward
        >>> from deqlab.solvers import GMRES
        >>> for mode in (ImplicitBackward(), ImplicitBackward(GMRES(tol=1e-10, max_steps=30))):
        ...     x = torch.ones(2, 3, requires_grad=True)
        ...     z_star, solution = DEQ(Half(), solver, backward=mode)(x)
        ...     z_star.sum().backward()
        ...     print(round(float(x.grad[0, 0]), 4), solution.backward_nfe, solution.backward_converged)
        2.0 2 True
        2.0 2 True
        >>> ImplicitBackward().linear_solver(forward_tol=1e-6)     # what the "gmres" shorthand builds
        GMRES(tol=1e-06, max_steps=15, restart=None, atol=0.0)
        >>> ImplicitBackward(GMRES(max_steps=12)).max_steps      # an object's own budget is reported
        12
    """

    def __init__(
        self,
        solver: AdjointSolver = "gmres",
        *,
        tol: Optional[float] = None,
        max_steps: Optional[int] = None,
        restart: Optional[int] = None,
        warn_unconverged: Optional[bool] = None,
        compile: CompileOption = False,
    ):
        self._linear: Optional[LinearSolver] = None
        if isinstance(solver, str):
            from deqlab.solvers.registry import available_solvers

            if solver != "gmres" and solver not in available_solvers():
                raise ValueError(
                    f"ImplicitBackward: unknown solver {solver!r}; expected 'gmres', a registered "
                    f"solver name ({', '.join(available_solvers())}) or a solver object"
                )
            if restart is not None and solver != "gmres":
                raise ValueError(f"ImplicitBackward: restart= applies to 'gmres' only, not {solver!r}")
            if compile is not False and solver not in _COMPILABLE_ADJOINTS:
                raise ValueError(
                    f"ImplicitBackward: compile= applies to {', '.join(map(repr, _COMPILABLE_ADJOINTS))}, not "
                    f"{solver!r} (its step cannot be compiled around the eager VJPs); pass compile=False"
                )
            if tol is not None and (not isinstance(tol, (int, float)) or not tol >= 0):
                raise ValueError(f"ImplicitBackward: tol must be a number >= 0 or None, got {tol!r}")
            if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
                raise ValueError(f"ImplicitBackward: max_steps must be an int >= 1, got {max_steps!r}")
        else:
            given = [k for k, val in (("tol", tol), ("max_steps", max_steps), ("restart", restart)) if val is not None]
            if compile is not False:
                given.append("compile")
            if given:
                raise ValueError(
                    f"ImplicitBackward: {', '.join(given)} given together with a solver object "
                    f"{solver!r}; set them on the solver (e.g. GMRES(tol=..., max_steps=...))"
                )
            if isinstance(solver, LinearSolver):
                self._linear = solver
            elif isinstance(solver, Solver):
                self._linear = FixedPointLinearSolver(solver)
            else:
                raise TypeError(
                    f"ImplicitBackward: solver must be a name, a LinearSolver (solve(matvec, b)) or "
                    f"a fixed-point Solver (callable with a `termination`), got {solver!r}"
                )
        self.solver = solver
        if self._linear is not None:  # report the object's own budget: it is the one that governs
            self.tol: Optional[float] = float(self._linear.tol)
            self.max_steps = int(self._linear.max_steps)
            self.restart = self._linear.restart if isinstance(self._linear, GMRES) else None
        else:
            self.tol = None if tol is None else float(tol)
            self.max_steps = DEFAULT_ADJOINT_MAX_STEPS if max_steps is None else int(max_steps)
            self.restart = restart
        self.warn_unconverged = warn_unconverged
        #: ``compile=`` of the GMRES this mode builds from the name ``"gmres"`` (each Arnoldi step's algebra
        #: one compiled graph; the VJPs stay eager)
        self.compile = check_compile_option("ImplicitBackward", compile)
        self._built: Dict[float, LinearSolver] = {}

    def linear_solver(self, forward_tol: Optional[float] = None) -> LinearSolver:
        """The [`LinearSolver`][deqlab.solvers.LinearSolver] this mode uses for a forward tolerance ``forward_tol``.

        Args:
            forward_tol: the forward solver's tolerance, used when ``tol`` is ``None``. Default ``None``:
                unknown, so ``1e-6``.

        Returns:
            The solver object given at construction, or the one built from the name (cached per tolerance).
        """
        if self._linear is not None:
            return self._linear
        tol = self.tol if self.tol is not None else (1e-6 if forward_tol is None else float(forward_tol))
        built = self._built.get(tol)
        if built is None:
            if self.solver == "gmres":
                built = GMRES(tol=tol, max_steps=self.max_steps, restart=self.restart, compile=self.compile)
            else:
                from deqlab.solvers.registry import get_solver

                # Newton-Krylov on the (linear) adjoint system: a full Newton step with an exact product solves
                # it, so a step that raises the residual comes from an inexact finite-difference product (half
                # precision); the per-sample line search rejects such steps, and costs one norm per step when
                # every step is good.
                extra: Dict[str, Any] = {"line_search": True} if self.solver == "newton_krylov" else {}
                if self.compile is not False:  # the algorithm's algebra compiled around the eager VJPs
                    extra["compile"] = self.compile
                built = FixedPointLinearSolver(
                    get_solver(
                        cast(str, self.solver),  # a name: a solver object was kept in _linear
                        mode="rel_norm",
                        abstol_termination=tol,
                        reltol_termination=tol,
                        max_steps=self.max_steps,
                        **extra,
                    ),
                    max_steps=self.max_steps,
                )
            self._built[tol] = built
        return built

    def gradients(self, problem: EquilibriumProblem, v: Tensor) -> BackwardResult:
        lin = problem.linearize()
        with torch.no_grad():
            if not bool(v.ne(0).any()):
                g = torch.zeros_like(v)
                residual, converged = v.new_zeros(v.shape[0]).float(), True
            else:
                solver = self.linear_solver(problem.forward_tol)
                vjp = instrument.wrap("adjoint.vjp", lin.vjp_z)  # lin.vjp_z itself when nothing records
                with instrument.region("adjoint.solve"):
                    if v.dtype in _HALF:  # keep the Krylov/least-squares algebra in float32
                        dtype = v.dtype
                        out = solver.solve(_half_matvec(vjp, dtype, split=_uses_finite_differences(solver)), v.float())
                        g = out.x.to(dtype)
                    else:
                        out = solver.solve(lambda u: u - vjp(u), v)
                        g = out.x
                residual, converged = out.residual.detach(), bool(out.all_converged)
                if not bool(torch.isfinite(g).all()):
                    converged = False
        with instrument.region("adjoint.vjp_inputs"):
            grads = lin.vjp_inputs(g.detach())
        return BackwardResult(grads=grads, nfe=lin.nvjp, residual=residual, converged=converged)


#: the named adjoint solvers that ``compile=`` can compile (the discrete ones with a split pure step)
_COMPILABLE_ADJOINTS = ("gmres", "fixed_point", "anderson", "broyden", "lbroyden")


def _uses_finite_differences(solver: LinearSolver) -> bool:
    """Whether ``solver`` differentiates its matvec by finite differences (Newton–Krylov, ``jvp="fd"``)."""
    return isinstance(solver, FixedPointLinearSolver) and solver.finite_differences


def _half_matvec(vjp_z: Callable[[Tensor], Tensor], dtype: torch.dtype, split: bool) -> Callable[[Tensor], Tensor]:
    """The float32 adjoint matvec ``u -> u - Jᵀu`` of a half-precision map.

    Why ``split``: a finite-difference solver perturbs ``u`` by ~3e-4 relative (float32's sqrt(eps)),
    below bfloat16's resolution, so rounding ``u`` to the map's dtype erases the perturbation and the
    Newton–Krylov adjoint stalls (residual ~20). Splitting ``u = hi + lo`` into two half-precision parts
    (two VJPs, linear in ``u``) keeps ~16 bits of ``u``, enough for the difference to be resolved.
    """
    if not split:
        return lambda u: u - vjp_z(u.to(dtype)).float()

    def matvec(u: Tensor) -> Tensor:
        hi = u.to(dtype)
        lo = (u - hi.float()).to(dtype)
        return u - vjp_z(hi).float() - vjp_z(lo).float()

    return matvec


class JacobianFreeBackward(BackwardMode):
    """Jacobian-free backpropagation (Fung et al. 2022): use ``g = dL/dz*`` (drop the ``(I − J)⁻ᵀ``
    factor), i.e. differentiate one application of ``f`` at ``z*``. One VJP per backward; a descent
    direction when ``f`` is contractive, not the exact gradient. No solve: ``backward_converged`` stays
    ``None``.

    Example:
        For ``f = z/2 + x`` the exact ``dz*/dx`` is 2; JFB gives ``∂f/∂x = 1`` for one VJP:

        >>> import torch
        >>> from torch import nn
        >>> from deqlab.nn import DEQ
        >>> from deqlab.solvers import DiscreteDEQSolver
        >>> class Half(nn.Module):                  # z* = 2x, so dz*/dx = 2
        ...     def forward(self, z, x):
        ...         return 0.5 * z + x
        >>> solver = DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-6, max_steps=30)
        >>> from deqlab.nn import JacobianFreeBackward
        >>> x = torch.ones(2, 3, requires_grad=True)
        >>> z_star, solution = DEQ(Half(), solver, backward=JacobianFreeBackward())(x)
        >>> z_star.sum().backward()
        >>> x.grad[0].tolist(), solution.backward_nfe, solution.backward_converged
        ([1.0, 1.0, 1.0], 1, None)
    """

    def gradients(self, problem: EquilibriumProblem, v: Tensor) -> BackwardResult:
        lin = problem.linearize()
        with instrument.region("adjoint.vjp_inputs"):
            grads = lin.vjp_inputs(v)
        return BackwardResult(grads=grads, nfe=lin.nvjp)


class PhantomGradient(BackwardMode):
    """Phantom gradient (Geng et al. 2021): backprop through ``steps`` damped applications
    ``z ← (1 − damping) z + damping f(z, x)`` started at ``z*`` (detached). Costs ``steps`` evaluations
    of ``f`` plus their backward; interpolates between JFB (``steps=1, damping=1``) and the implicit
    gradient (``steps → ∞``). No solve: ``backward_converged`` stays ``None``.

    Args:
        steps: number of unrolled applications. Default 5: the gap to the implicit gradient shrinks like
            ``(1 − τ + τρ)^steps`` (``ρ``: the contraction of ``f``), so a handful of steps gets most of the
            way at a small, fixed cost.
        damping: τ in ``(0, 1]``. Default 0.5: averaging ``z`` with ``f(z, x)`` makes the unrolled map more
            contractive than ``f`` itself, so the gradient stays stable when ``f`` barely contracts.

    Raises:
        ValueError: ``steps < 1`` or ``damping`` outside ``(0, 1]``.

    Example:
        For ``f = z/2 + x`` the exact ``dz*/dx`` is 2; five damped steps give ``2 (1 − 0.75⁵)``:

        >>> import torch
        >>> from torch import nn
        >>> from deqlab.nn import DEQ
        >>> from deqlab.solvers import DiscreteDEQSolver
        >>> class Half(nn.Module):                  # z* = 2x, so dz*/dx = 2
        ...     def forward(self, z, x):
        ...         return 0.5 * z + x
        >>> solver = DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-6, max_steps=30)
        >>> from deqlab.nn import PhantomGradient
        >>> x = torch.ones(2, 3, requires_grad=True)
        >>> z_star, solution = DEQ(Half(), solver, backward=PhantomGradient(steps=5, damping=0.5))(x)
        >>> z_star.sum().backward()
        >>> round(float(x.grad[0, 0]), 4), round(2 * (1 - 0.75 ** 5), 4), solution.backward_nfe
        (1.5254, 1.5254, 5)
    """

    def __init__(self, steps: int = 5, damping: float = 0.5):
        if steps < 1 or not 0.0 < damping <= 1.0:
            raise ValueError(f"PhantomGradient: need steps >= 1 and 0 < damping <= 1, got {steps}, {damping}")
        self.steps = int(steps)
        self.damping = float(damping)

    def gradients(self, problem: EquilibriumProblem, v: Tensor) -> BackwardResult:
        needs = problem.needs
        x_ = problem.x.detach().requires_grad_(bool(needs[0]))
        state = [t.detach().requires_grad_() for t in problem.grad_state]
        z = [t.detach() for t in problem.z_star]
        tau = self.damping
        with torch.enable_grad():
            for _ in range(self.steps):
                fz = problem.evaluate(z, x_, state)
                z = [(1.0 - tau) * zi + tau * fi for zi, fi in zip(z, fz)] if tau != 1.0 else fz
        grads = vjp_inputs(z, v, x_, problem.params, state, needs, retain_graph=False)
        return BackwardResult(grads=grads, nfe=self.steps)


class NeumannPhantomGradient(BackwardMode):
    """Neumann phantom gradient (Geng et al. 2021; banax's ``NeumannPhantom``): replace the adjoint
    ``(I − Jᵀ)⁻¹ v`` by its truncated Neumann series

        g = τ Σ_{i<steps} Aᵢ,   A = ((1 − τ) I + τ Jᵀ),   i.e.  g = Σ_{i<steps} (Jᵀ)ⁱ v  for τ = 1,

    with ``J = ∂f/∂z`` at ``z*`` (one graph of ``f``, then matrix-free VJPs), and return
    ``dL/dθ = gᵀ ∂f/∂θ``, ``dL/dx = gᵀ ∂f/∂x``. Costs ``steps`` VJPs (``steps − 1`` for the series, one for
    the inputs) and one evaluation of ``f``, fewer than [`PhantomGradient`][deqlab.nn.PhantomGradient]
    (whose backprop through ``steps`` unrolled applications also keeps ``steps`` graphs of ``f``). For a
    contraction it tends to the implicit gradient as ``steps`` grows (the error shrinks like
    ``ρ(A)^steps``); ``steps=1`` is [`JacobianFreeBackward`][deqlab.nn.JacobianFreeBackward]. No solve:
    ``backward_converged`` stays ``None``.

    Args:
        steps: terms of the series (``k``; ``steps = 1`` keeps ``v`` alone, JFB). Default 5: as
            `PhantomGradient`'s, a handful of terms gets most of the way at a small, fixed cost.
        damping: τ in ``(0, 1]``, the series of the damped map ``(1 − τ) z + τ f(z)`` (whose fixed point and
            implicit gradient are ``f``'s), more contractive when ``f``'s Jacobian has eigenvalues near −1.
            Default 1.0: the plain series ``Σ (Jᵀ)ⁱ v``.

    Raises:
        ValueError: ``steps < 1`` or ``damping`` outside ``(0, 1]``.

    Example:
        For ``f = z/2 + x`` the exact ``dz*/dx`` is 2; five terms give ``1 + 1/2 + … + 1/16``:

        >>> import torch
        >>> from torch import nn
        >>> from deqlab.nn import DEQ
        >>> from deqlab.solvers import DiscreteDEQSolver
        >>> class Half(nn.Module):                  # z* = 2x, so dz*/dx = 2
        ...     def forward(self, z, x):
        ...         return 0.5 * z + x
        >>> solver = DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-6, max_steps=30)
        >>> from deqlab.nn import NeumannPhantomGradient
        >>> x = torch.ones(2, 3, requires_grad=True)
        >>> z_star, solution = DEQ(Half(), solver, backward=NeumannPhantomGradient(steps=5))(x)
        >>> z_star.sum().backward()
        >>> float(x.grad[0, 0]), solution.backward_nfe, solution.backward_converged
        (1.9375, 5, None)
    """

    def __init__(self, steps: int = 5, damping: float = 1.0):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or not 0.0 < damping <= 1.0:
            raise ValueError(
                f"NeumannPhantomGradient: need an int steps >= 1 and 0 < damping <= 1, got {steps!r}, {damping!r}"
            )
        self.steps = int(steps)
        self.damping = float(damping)

    def gradients(self, problem: EquilibriumProblem, v: Tensor) -> BackwardResult:
        lin = problem.linearize()
        tau = self.damping
        vjp = instrument.wrap("adjoint.vjp", lin.vjp_z)
        with torch.no_grad(), instrument.region("adjoint.solve"):
            term, total = v, v
            for _ in range(self.steps - 1):
                jt = vjp(term)
                term = jt if tau == 1.0 else (1.0 - tau) * term + tau * jt
                total = total + term
            g = total if tau == 1.0 else tau * total
        with instrument.region("adjoint.vjp_inputs"):
            grads = lin.vjp_inputs(g.detach())
        return BackwardResult(grads=grads, nfe=lin.nvjp)

    def __repr__(self) -> str:
        return f"NeumannPhantomGradient(steps={self.steps}, damping={self.damping})"
