"""Solver, adjoint and DEQ-layer construction shared by every paper model and by the zoo.

Why one place: each experiment names a model type (``vanilla`` / ``skip`` / ``skip_reg`` / ``neural_ode``)
and a solver (a kind, ``continuous`` / ``discrete``, or a solver name); turning those names into deqlab
objects is the same code for the dense MNIST model, every multiscale network and the Lightning zoo
(``deqlab.zoo.build_solver`` and ``deqlab.zoo.build_backward`` are these functions), so it lives here once.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, Union

from torch import Tensor, nn

from deqlab.nn import (
    BackwardMode,
    DeepEquilibriumNetwork,
    ImplicitBackward,
    MultiScaleDeepEquilibriumNetwork,
    MultiScaleNeuralODE,
    MultiScaleSkipDeepEquilibriumNetwork,
    SkipDeepEquilibriumNetwork,
    ZeroGuess,
)
from deqlab.solvers import ContinuousDEQSolver, DiscreteDEQSolver
from deqlab._compat import renamed
from deqlab.solvers.protocols import Solver

__all__ = ["MODEL_TYPES", "SOLVER_KINDS", "ModelType", "SolverKind", "build_solver", "build_backward",
           "make_solver", "make_backward", "check_choice", "PaperNetwork"]

ModelType = Literal["vanilla", "skip", "skip_reg", "neural_ode"]
SolverKind = Literal["continuous", "discrete"]
MODEL_TYPES = ("vanilla", "skip", "skip_reg", "neural_ode")
SOLVER_KINDS = ("continuous", "discrete")

SolverName = Literal["lbroyden", "broyden", "anderson", "fixed_point", "newton_krylov", "tsit5", "vcab3"]
#: the continuous DEQ's integrators that `build_solver` and `make_solver` take by name: ``tsit5`` (the MNIST
#: table's) and ``vcab3`` (the multiscale experiments', one evaluation per step)
ODESolverName = Literal["tsit5", "vcab3"]
ODE_SOLVERS = ("tsit5", "vcab3")
BackwardName = Literal["gmres", "anderson", "fixed_point", "broyden", "lbroyden"]
TerminationModeName = Literal[
    "abs", "abs_norm", "rel", "rel_norm", "norm",
    "abs_deq_default", "rel_deq_default", "abs_deq_best", "rel_deq_best",
]
#: the paper's termination tolerance (abs = rel) of every experiment's forward solve
PAPER_TOL = 5e-3


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raise unless ``value`` is one of ``choices``, naming the argument and every valid value.

    Args:
        name: the argument's name, for the message.
        value: what the caller passed.
        choices: the valid values.

    Raises:
        ValueError: when ``value`` is not in ``choices``.

    Examples:
        >>> from deqlab.models._build import SOLVER_KINDS, check_choice
        >>> check_choice("solver", "discrete", SOLVER_KINDS)
        >>> check_choice("solver", "euler", SOLVER_KINDS)
        Traceback (most recent call last):
        ...
        ValueError: solver must be one of 'continuous', 'discrete', got 'euler'
    """
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def build_solver(
    name: SolverName,
    *,
    mode: TerminationModeName = "rel_deq_default",
    abstol_termination: Optional[float] = None,
    reltol_termination: Optional[float] = None,
    ode_abstol: Optional[float] = None,
    ode_reltol: Optional[float] = None,
    max_steps: int = 50,
    abstol: Optional[float] = None,
    reltol: Optional[float] = None,
    reference_counting: str = "deqjl",
    batch_wide: bool = False,
) -> Solver:
    """A deqlab solver from a name (the string shorthand of the zoo's ``solver`` argument): ``tsit5`` or
    ``vcab3`` → ``ContinuousDEQSolver`` with that integrator (integrate to the steady state), anything
    else → ``DiscreteDEQSolver(name)``.
    The defaults are the paper's (5e-3, 50 steps).

    Two tolerances are named apart: the *termination* tolerances (how close to the fixed point the solve
    stops, every solver) and the *ODE step* tolerances (how accurately ``tsit5`` follows the flow). The
    ODE ones default to the termination ones, so the integration is as accurate as the stopping test, as in
    the paper-era code.

    Args:
        name: ``lbroyden``, ``broyden``, ``anderson``, ``fixed_point``, ``newton_krylov`` (discrete
            solvers), ``tsit5`` or ``vcab3`` (the continuous DEQ). No default: the zoo models pass theirs
            (``lbroyden``).
        mode: termination mode of the solve (see `deqlab.solvers.termination`). Default
            ``rel_deq_default``, the paper's: stop when ``||f(z) - z|| / ||f(z)||`` is below
            ``reltol_termination`` (or, after a patience window, stalls near it).
        abstol_termination: absolute termination tolerance. ``None`` (default): 5e-3, the paper's.
        reltol_termination: relative termination tolerance. ``None`` (default): 5e-3, the paper's.
        ode_abstol: ``tsit5`` / ``vcab3`` only: the ODE stepper's absolute local error tolerance. ``None`` (default):
            ``abstol_termination``.
        ode_reltol: ``tsit5`` / ``vcab3`` only: the ODE stepper's relative local error tolerance. ``None`` (default):
            ``reltol_termination``.
        max_steps: iteration budget (solver steps; stepper calls, accepted or rejected, for ``tsit5``).
            Default 50, the paper's MNIST budget.
        abstol: deprecated old name of ``abstol_termination`` (warns ``DeprecationWarning``); default
            ``None`` (not given).
        reltol: deprecated old name of ``reltol_termination`` (warns); default ``None`` (not given).
        reference_counting: the convention of ``reference_nfe`` (the paper's NFE count beside ours, see
            `deqlab.solvers.counting`). Default ``"deqjl"``.
        batch_wide: one termination test over the whole batch (the reference code's semantics). Default
            ``False``: each sample stops on its own.

    Returns:
        A ``ContinuousDEQSolver`` for ``tsit5``, else a ``DiscreteDEQSolver``; pass it as a layer's or
            a zoo model's ``solver``.

    Raises:
        ValueError: from the solver for an unknown ``name`` or ``mode``; when a tolerance is given under
            both its names; when an ODE tolerance is given for a discrete solver (it has no ODE).

    Examples:
        >>> from deqlab.zoo import build_solver
        >>> build_solver("anderson", max_steps=20)
        DiscreteDEQSolver(Anderson(...), mode='rel_deq_default', abstol_termination=0.005, reltol_termination=0.005, ..., max_steps=20)
        >>> s = build_solver("tsit5", reltol_termination=1e-2, ode_reltol=1e-4)
        >>> s.termination.reltol, s.ode_reltol, s.ode_abstol
        (0.01, 0.0001, 0.005)
    """
    owner = "build_solver"
    atol = renamed(owner, "abstol_termination", abstol_termination, "abstol", abstol, PAPER_TOL)
    rtol = renamed(owner, "reltol_termination", reltol_termination, "reltol", reltol, PAPER_TOL)
    if name in ODE_SOLVERS:
        return ContinuousDEQSolver(
            name, mode=mode, abstol_termination=atol, reltol_termination=rtol, max_steps=max_steps,
            ode_abstol=atol if ode_abstol is None else ode_abstol,
            ode_reltol=rtol if ode_reltol is None else ode_reltol, reference_counting=reference_counting,
            batch_wide=batch_wide,
        )
    given = [k for k, v in (("ode_abstol", ode_abstol), ("ode_reltol", ode_reltol)) if v is not None]
    if given:
        raise ValueError(f"{owner}: {', '.join(given)} set the ODE stepper of 'tsit5' / 'vcab3'; the discrete solver {name!r} "
                         "has none: drop it, or use abstol_termination / reltol_termination")
    return DiscreteDEQSolver(name, mode=mode, abstol_termination=atol, reltol_termination=rtol, max_steps=max_steps,
                             reference_counting=reference_counting, batch_wide=batch_wide)


def build_backward(name: BackwardName = "gmres", *, tol: Optional[float] = None,
                   max_steps: Optional[int] = None) -> BackwardMode:
    """The implicit backward with adjoint solver ``name``: [`deqlab.nn.ImplicitBackward`][deqlab.nn.ImplicitBackward]'s own default
    budget (the paper's protocol: tolerance = the forward solver's termination tolerance, at most 15
    VJPs), so a zoo model and a hand-built layer differentiate alike; ``tol``/``max_steps`` override it.

    Args:
        name: the adjoint solver: ``gmres``, ``anderson``, ``fixed_point``, ``broyden`` or ``lbroyden``.
            Default ``gmres``, the paper's adjoint solver (the adjoint system is linear, GMRES's home).
        tol: adjoint tolerance. Default ``None``: ``ImplicitBackward``'s default, the forward solver's
            termination tolerance (a gradient more accurate than the fixed point is wasted work).
        max_steps: VJP budget of the adjoint solve. Default ``None``: ``ImplicitBackward``'s default (15).

    Returns:
        The backward mode, an [`ImplicitBackward`][deqlab.nn.ImplicitBackward]; pass it as a layer's or a zoo
            model's ``backward``.

    Raises:
        ValueError: from ``ImplicitBackward`` for an unknown ``name`` or an invalid budget.

    Examples:
        >>> from deqlab.zoo import build_backward
        >>> build_backward()
        ImplicitBackward(solver='gmres', tol=None, max_steps=15, ...)
        >>> build_backward("anderson", tol=1e-4).tol
        0.0001
    """
    budget = {k: v for k, v in (("tol", tol), ("max_steps", max_steps)) if v is not None}
    return ImplicitBackward(name, **budget)


def make_solver(kind: SolverKind, *, mode: str, tol: float, max_steps: int,
                ode_solver: ODESolverName = "tsit5", reference_counting: str = "deqjl",
                batch_wide: bool = False) -> Any:
    """The forward solver of a solver *kind* ([`build_solver`][deqlab.zoo.build_solver] by name): ``continuous``
    integrates ``du/dt = f(u, x) − u`` to the steady state with ``ode_solver`` (the ODE step tolerances
    equal the termination tolerance); ``discrete`` is limited-memory Broyden. Both stop by the termination
    ``mode`` with abs = rel tolerance ``tol``.

    Args:
        kind: ``continuous`` or ``discrete``.
        mode: termination mode (see `deqlab.solvers.termination`).
        tol: absolute and relative termination tolerance (and the ODE step tolerances).
        max_steps: step budget (solver iterations, or ODE stepper calls).
        ode_solver: the continuous kind's integrator, ``tsit5`` or ``vcab3``. Default ``tsit5``; ignored
            by the discrete kind.
        reference_counting: the convention of the solver's ``reference_nfe``. Default ``"deqjl"``.
        batch_wide: one termination test over the whole batch. Default ``False``.

    Returns:
        A ``ContinuousDEQSolver`` or a ``DiscreteDEQSolver``.

    Raises:
        ValueError: for an unknown ``kind`` (or ``mode``).

    Examples:
        >>> from deqlab.models._build import make_solver
        >>> make_solver("discrete", mode="rel_norm", tol=1e-2, max_steps=20)
        DiscreteDEQSolver(LimitedMemoryBroyden(...), mode='rel_norm', abstol_termination=0.01, reltol_termination=0.01, ..., max_steps=20)
    """
    check_choice("solver", kind, SOLVER_KINDS)
    check_choice("ode_solver", ode_solver, ODE_SOLVERS)
    return build_solver(ode_solver if kind == "continuous" else "lbroyden", mode=mode,  # type: ignore[arg-type]
                        abstol_termination=tol, reltol_termination=tol, max_steps=max_steps,
                        reference_counting=reference_counting, batch_wide=batch_wide)


def make_backward(tol: float, max_steps: int) -> BackwardMode:
    """The paper's adjoint ([`build_backward`][deqlab.zoo.build_backward] with GMRES): ``(I − Jᵀ) g = dL/dz*`` with the
    forward tolerance and a VJP budget.

    Args:
        tol: GMRES tolerance (the forward's: a more accurate gradient than fixed point is wasted work).
        max_steps: VJP budget of the adjoint solve.

    Returns:
        The backward mode, an [`ImplicitBackward`][deqlab.nn.ImplicitBackward].

    Examples:
        >>> from deqlab.models._build import make_backward
        >>> make_backward(5e-2, 20)
        ImplicitBackward(solver='gmres', tol=0.05, max_steps=20, ...)
    """
    return build_backward("gmres", tol=tol, max_steps=max_steps)


def make_deq(model_type: ModelType, model: nn.Module, solver: Any, *, shortcut: Optional[nn.Module],
             backward: Optional[BackwardMode], jac_reg: bool, detach_skip_target: Optional[bool] = None,
             reapply_map: bool = False, vanilla_penalty: bool = False) -> nn.Module:
    """A single-state DEQ layer for ``vanilla`` / ``skip`` / ``skip_reg`` (``shortcut`` is used by ``skip``
    only; ``backward=None`` is the layer's default). ``detach_skip_target=None`` keeps the layer's default:
    a detached target for ``skip``, the coupled loss for ``skip_reg`` ([`deqlab.nn.MapGuess`][deqlab.nn.MapGuess] says why).
    ``reapply_map`` and ``vanilla_penalty`` are the January-2022 code's semantics (``z* = f(u_T, x)``; the
    skip loss ``mean |z*|`` on vanilla models, through ``ZeroGuess(fixed_point_penalty=True)``)."""
    check_choice("model_type", model_type, ("vanilla", "skip", "skip_reg"))
    kwargs = dict(backward=backward, jacobian_regularization=jac_reg, reapply_map=reapply_map)
    if model_type == "vanilla":
        init = ZeroGuess(fixed_point_penalty=True) if vanilla_penalty else None
        return DeepEquilibriumNetwork(model, solver, init=init, **kwargs)
    return SkipDeepEquilibriumNetwork(model, solver, shortcut=shortcut if model_type == "skip" else None,
                                      detach_skip_target=detach_skip_target, **kwargs)


def make_multiscale(model_type: ModelType, main: Sequence[nn.Module], mapping: Sequence[Sequence[Optional[nn.Module]]],
                    post_fuse: Optional[Sequence[Optional[nn.Module]]], solver: Any, scales: Sequence[Sequence[int]],
                    *, shortcut: Union[None, nn.Module, Sequence[nn.Module]], backward: BackwardMode,
                    jac_reg: bool, ode_tol: float, detach_skip_target: Optional[bool] = None) -> nn.Module:
    """A multiscale layer for any model type (``neural_ode``: the same map on ``t ∈ [0, 1]``)."""
    if model_type == "neural_ode":
        check_neural_ode(solver, jac_reg)
        return MultiScaleNeuralODE(main, mapping, post_fuse, "tsit5", scales, ode_abstol=ode_tol, ode_reltol=ode_tol)
    kwargs = dict(backward=backward, jacobian_regularization=jac_reg)
    if model_type == "vanilla":
        return MultiScaleDeepEquilibriumNetwork(main, mapping, post_fuse, solver, scales, **kwargs)
    return MultiScaleSkipDeepEquilibriumNetwork(
        main, mapping, post_fuse, solver, scales, shortcut if model_type == "skip" else None,
        detach_skip_target=detach_skip_target, **kwargs)


def check_neural_ode(solver: Any, jac_reg: bool) -> None:
    """The neural-ODE baseline integrates on a fixed interval: it has no discrete form and no fixed point to
    regularize, so asking for either is an error rather than a silently different model."""
    if not isinstance(solver, ContinuousDEQSolver):
        raise ValueError("model_type='neural_ode' integrates du/dt = f(u, x) - u on t in [0, 1] with an ODE "
                         "solver; it has no discrete form: pass solver='continuous'")
    if jac_reg:
        raise ValueError("model_type='neural_ode' has no fixed point, so Jacobian regularization does not "
                         "apply: pass jac_reg=False")


class PaperNetwork(nn.Module):
    """``stem → DEQ layer → head``, the contract of [`deqlab.zoo.DEQClassifier`][deqlab.zoo.DEQClassifier].

    ``forward(x) -> (logits, solution)``; ``explicit_forward(x)`` gives the u0-only logits of Skip models
    (``head(u0)``, the paper's "explicit accuracy") and ``None`` for vanilla and neural-ODE models, whose
    u0 = 0 carries no information.

    [`build_model`][deqlab.models.build_model] builds these; construct one directly to wrap your own parts in the
    same contract.

    Args:
        stem: maps the input to the DEQ layer's injection ``x``.
        deq: the DEQ layer: ``deq(x) -> (z_star, solution)``, plus ``deq.explicit(x) -> u0`` for Skip models.
        head: maps ``z*`` (or ``u0``) to logits.
        model_type: ``vanilla``, ``skip``, ``skip_reg`` or ``neural_ode``. No default and keyword-only: it
            decides whether ``explicit_forward`` has a prediction, so it must match ``deq``.
        solver_kind: ``continuous`` or ``discrete``, the solver ``deq`` was built with (shown in the repr,
            read by scripts that label results). Keyword-only, like ``model_type``.

    Attributes:
        stem: the first part, as given.
        deq: the DEQ layer (a deqlab layer; its ``solver`` and ``backward`` are public attributes).
        head: the last part, as given.
        model_type: the model-type name the network was built from.
        solver_kind: the solver-kind name the network was built from.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from deqlab import DeepEquilibriumNetwork, DiscreteDEQSolver
        >>> from deqlab.nn import DenseDEQBlock
        >>> from deqlab.models import PaperNetwork
        >>> deq = DeepEquilibriumNetwork(DenseDEQBlock(8), DiscreteDEQSolver("anderson"))
        >>> net = PaperNetwork(nn.Linear(4, 8), deq, nn.Linear(8, 3), model_type="vanilla",
        ...                    solver_kind="discrete")
        >>> logits, solution = net(torch.randn(2, 4))
        >>> logits.shape, net.explicit_forward(torch.randn(2, 4))  # vanilla: u0 = 0 predicts nothing
        (torch.Size([2, 3]), None)
    """

    def __init__(self, stem: nn.Module, deq: nn.Module, head: nn.Module, *, model_type: ModelType,
                 solver_kind: SolverKind):
        super().__init__()
        self.stem = stem
        self.deq = deq
        self.head = head
        self.model_type = model_type
        self.solver_kind = solver_kind

    def forward(self, x: Tensor):
        z, solution = self.deq(self.stem(x))
        return self.head(z), solution

    def explicit_forward(self, x: Tensor) -> Optional[Tensor]:
        if self.model_type in ("vanilla", "neural_ode"):
            return None
        return self.head(self.deq.explicit(self.stem(x)))

    def extra_repr(self) -> str:
        return f"model_type={self.model_type!r}, solver={self.solver_kind!r}"


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters, each tensor counted once even when shared.

    Args:
        model: the network to count.
        trainable_only: count only tensors with ``requires_grad``. Default ``True``: the size of what
            training updates (a frozen stem does not make a model bigger to train).

    Returns:
        The number of scalar parameters.

    Examples:
        >>> import torch
        >>> from deqlab.models import build_model, count_parameters
        >>> count_parameters(build_model("mnist", "dense", width=16))
        13514
        >>> layer = torch.nn.Linear(3, 3)
        >>> _ = layer.bias.requires_grad_(False)
        >>> count_parameters(layer), count_parameters(layer, trainable_only=False)
        (9, 12)
    """
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
