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
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def make_solver(kind: SolverKind, *, mode: str, tol: float, max_steps: int) -> Any:
    """The forward solver: ``continuous`` integrates ``du/dt = f(u, x) − u`` to the steady state with Tsit5
    (the ODE step tolerances equal the termination tolerance, as in the paper-era code); ``discrete`` is
    limited-memory Broyden. Both stop by the termination ``mode`` with abs = rel tolerance ``tol``."""
    check_choice("solver", kind, SOLVER_KINDS)
    if kind == "continuous":
        return ContinuousDEQSolver("tsit5", mode=mode, abstol=tol, reltol=tol, abstol_termination=tol,
                                   reltol_termination=tol, max_steps=max_steps)
    return DiscreteDEQSolver("lbroyden", mode=mode, abstol_termination=tol, reltol_termination=tol,
                             max_steps=max_steps)


def make_backward(tol: float, max_steps: int) -> ImplicitBackward:
    """The paper's adjoint: GMRES on ``(I − Jᵀ) g = dL/dz*`` with the forward tolerance and a VJP budget."""
    return ImplicitBackward("gmres", tol=tol, max_steps=max_steps)


def make_deq(model_type: ModelType, model: nn.Module, solver: Any, *, shortcut: Optional[nn.Module],
             backward: ImplicitBackward, jac_reg: bool, detach_skip_target: Optional[bool] = None) -> nn.Module:
    """A single-state DEQ layer for ``vanilla`` / ``skip`` / ``skip_reg``. ``detach_skip_target=None`` keeps
    the layer's default: a detached target for ``skip``, the coupled loss for ``skip_reg``
    (:class:`deqlab.nn.MapGuess` says why)."""
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
    """``stem → DEQ layer → head``, the contract of :class:`deqlab.zoo.DEQClassifier`.

    ``forward(x) -> (logits, solution)``; ``explicit_forward(x)`` gives the u0-only logits of Skip models
    (``head(u0)``, the paper's "explicit accuracy") and ``None`` for vanilla and neural-ODE models, whose
    u0 = 0 carries no information.

    Attributes:
        stem, deq, head: the three parts (``deq`` is a deqlab layer; its ``solver`` and ``backward`` are
            public attributes).
        model_type, solver_kind: the names the model was built from.
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
    """Number of (trainable) parameters, each tensor counted once even when shared."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
