"""The paper's MNIST models (v1 experiments): the dense DEQ and the 2-scale convolutional MDEQ."""
from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor, nn

from deqlab.models._build import (
    ModelType,
    PaperNetwork,
    SolverKind,
    check_neural_ode,
    make_backward,
    make_deq,
    make_solver,
)
from deqlab.nn import DenseDEQBlock, MultiScaleNeuralODE

__all__ = ["mnist_dense", "FirstScale"]


class FirstScale(nn.Module):
    """Applies ``module`` to a tensor, or to the only entry of a one-scale list state (the neural-ODE
    baseline of a dense model keeps its state as a one-element list)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, z: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        if not isinstance(z, Tensor):
            if len(z) != 1:
                raise ValueError(f"FirstScale: expected a one-scale state, got {len(z)} scales")
            z = z[0]
        return self.module(z)


def mnist_dense(model_type: ModelType = "skip", solver: SolverKind = "discrete", *, jac_reg: bool = False,
                num_classes: int = 10, width: int = 128, in_features: int = 784, tol: float = 5e-3,
                max_steps: int = 50, mode: str = "rel_deq_default", backward_max_steps: int = 15,
                detach_skip_target: Optional[bool] = None) -> PaperNetwork:
    """MNIST dense: ``Flatten → Dense(784→128, relu) → DEQ → Dense(128→10)``.

    DEQ map ``f(z, x) = relu(W1 z) + relu(W2 x)`` (no biases); Skip predictor ``Dense(128→128, relu)``;
    abstol = reltol = 5e-3, 50 steps; GMRES adjoint with the forward tolerance and at most
    ``min(max_steps, 15)`` VJPs. ``neural_ode``: the same map integrated on ``t ∈ [0, 1]`` with a
    one-scale state. ``detach_skip_target``: see :class:`deqlab.nn.MapGuess`
    (``None``: detached for ``skip``, coupled for ``skip_reg``).
    """
    solver_obj = make_solver(solver, mode=mode, tol=tol, max_steps=max_steps)
    stem = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU())
    head = nn.Linear(width, num_classes)
    if model_type == "neural_ode":
        check_neural_ode(solver_obj, jac_reg)
        deq = MultiScaleNeuralODE([DenseDEQBlock(width)], [[None]], None, "tsit5", [(width,)],
                                  abstol=tol, reltol=tol)
        head = FirstScale(head)
    else:
        shortcut = nn.Sequential(nn.Linear(width, width), nn.ReLU())
        deq = make_deq(model_type, DenseDEQBlock(width), solver_obj, shortcut=shortcut,
                       backward=make_backward(tol, min(max_steps, backward_max_steps)), jac_reg=jac_reg,
                       detach_skip_target=detach_skip_target)
    return PaperNetwork(stem, deq, head, model_type=model_type, solver_kind=solver)
