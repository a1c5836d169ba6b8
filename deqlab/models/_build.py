"""Solver, adjoint and DEQ-layer construction shared by every paper model.

Why one place: each experiment names a model type (``vanilla`` / ``skip`` / ``skip_reg`` / ``neural_ode``)
and a solver kind (``continuous`` / ``discrete``); turning those names into deqlab layers is the same code
for the dense MNIST model and for every multiscale network, so it lives here once.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, Union

from torch import Tensor, nn

from deqlab.nn import (
    DeepEquilibriumNetwork,
    ImplicitBackward,
    MultiScaleDeepEquilibriumNetwork,
    MultiScaleNeuralODE,
    MultiScaleSkipDeepEquilibriumNetwork,
    SkipDeepEquilibriumNetwork,
)
from deqlab.solvers import ContinuousDEQSolver, DiscreteDEQSolver

__all__ = ["MODEL_TYPES", "SOLVER_KINDS", "ModelType", "SolverKind", "make_solver", "make_backward",
           "check_choice", "PaperNetwork"]

ModelType = Literal["vanilla", "skip", "skip_reg", "neural_ode"]
SolverKind = Literal["continuous", "discrete"]
MODEL_TYPES = ("vanilla", "skip", "skip_reg", "neural_ode")
SOLVER_KINDS = ("continuous", "discrete")


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


def make_solver(kind: SolverKind, *, mode: str, tol: float, max_steps: int) -> Any:
    """The forward solver: ``continuous`` integrates ``du/dt = f(u, x) − u`` to the steady state with Tsit5
    (the ODE step tolerances equal the termination tolerance, as in the paper-era code); ``discrete`` is
    limited-memory Broyden. Both stop by the termination ``mode`` with abs = rel tolerance ``tol``.

    Args:
        kind: ``continuous`` or ``discrete``.
        mode: termination mode (see `deqlab.solvers.termination`).
        tol: absolute and relative termination tolerance (and the ODE step tolerances).
        max_steps: step budget (solver iterations, or ODE stepper calls).

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
    if kind == "continuous":
        return ContinuousDEQSolver("tsit5", mode=mode, abstol=tol, reltol=tol, abstol_termination=tol,
                                   reltol_termination=tol, max_steps=max_steps)
    return DiscreteDEQSolver("lbroyden", mode=mode, abstol_termination=tol, reltol_termination=tol,
                             max_steps=max_steps)


def make_backward(tol: float, max_steps: int) -> ImplicitBackward:
    """The paper's adjoint: GMRES on ``(I − Jᵀ) g = dL/dz*`` with the forward tolerance and a VJP budget.

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
    return ImplicitBackward("gmres", tol=tol, max_steps=max_steps)


def make_deq(model_type: ModelType, model: nn.Module, solver: Any, *, shortcut: Optional[nn.Module],
             backward: ImplicitBackward, jac_reg: bool, detach_skip_target: Optional[bool] = None) -> nn.Module:
    """A single-state DEQ layer for ``vanilla`` / ``skip`` / ``skip_reg``. ``detach_skip_target=None`` keeps
    the layer's default: a detached target for ``skip``, the coupled loss for ``skip_reg``
    ([`deqlab.nn.MapGuess`][deqlab.nn.MapGuess] says why)."""
    kwargs = dict(backward=backward, jacobian_regularization=jac_reg)
    if model_type == "vanilla":
        return DeepEquilibriumNetwork(model, solver, **kwargs)
    return SkipDeepEquilibriumNetwork(model, solver, shortcut=shortcut if model_type == "skip" else None,
                                      detach_skip_target=detach_skip_target, **kwargs)


def make_multiscale(model_type: ModelType, main: Sequence[nn.Module], mapping: Sequence[Sequence[Optional[nn.Module]]],
                    post_fuse: Optional[Sequence[Optional[nn.Module]]], solver: Any, scales: Sequence[Sequence[int]],
                    *, shortcut: Union[None, nn.Module, Sequence[nn.Module]], backward: ImplicitBackward,
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
