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
    baseline of a dense model keeps its state as a one-element list).

    Args:
        module: the module to apply (the dense model's head).

    Examples:
        >>> import torch
        >>> from deqlab.models.mnist import FirstScale
        >>> head = FirstScale(torch.nn.Linear(3, 2))
        >>> head(torch.randn(4, 3)).shape, head([torch.randn(4, 3)]).shape
        (torch.Size([4, 2]), torch.Size([4, 2]))
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, z: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        """``module(z)``, or ``module(z[0])`` for a one-scale list; a longer list raises ``ValueError``."""
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
    one-scale state. The defaults are the paper's MNIST dense model.

    Args:
        model_type: ``vanilla``, ``skip``, ``skip_reg`` or ``neural_ode``. Default ``skip``, the paper's
            proposed model.
        solver: ``continuous`` (Tsit5) or ``discrete`` (limited-memory Broyden). Default ``discrete``, as
            [`deqlab.models.build_model`][deqlab.models.build_model]'s.
        jac_reg: compute the Hutchinson Jacobian term. Default ``False``: it adds a VJP to every forward.
        num_classes: classifier outputs. Default 10, MNIST's digits.
        width: state width of the DEQ. Default 128, the paper's.
        in_features: flattened input size. Default 784 (28×28 MNIST images).
        tol: forward tolerance (abs = rel), also the adjoint's. Default 5e-3, the paper's.
        max_steps: forward step budget. Default 50, the paper's.
        mode: termination mode. Default ``rel_deq_default``, the paper's.
        backward_max_steps: VJP budget of the GMRES adjoint (capped at ``max_steps``). Default 15, the
            paper's.
        detach_skip_target: whether the skip loss treats z* as a detached target; see
            [`deqlab.nn.MapGuess`][deqlab.nn.MapGuess]. Default ``None``: the layer's default, detached for ``skip``,
            coupled for ``skip_reg``.

    Returns:
        The network, a [`PaperNetwork`][deqlab.models.PaperNetwork].

    Raises:
        ValueError: for an unknown ``solver``, or ``neural_ode`` with the discrete solver or ``jac_reg``.

    Examples:
        >>> import torch
        >>> from deqlab.models import count_parameters
        >>> from deqlab.models.mnist import mnist_dense
        >>> net = mnist_dense("neural_ode", "continuous", width=16)
        >>> logits, solution = net(torch.randn(2, 784))
        >>> logits.shape, count_parameters(net)
        (torch.Size([2, 10]), 13242)
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
