"""The paper's MNIST models (v1 experiments): the dense DEQ and the 2-scale convolutional MDEQ."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from torch import Tensor, nn

from deqlab.models._build import (
    ModelType,
    PaperNetwork,
    SolverKind,
    check_choice,
    check_neural_ode,
    make_backward,
    make_deq,
    make_solver,
)
from deqlab.nn import BackwardMode, DenseDEQBlock, MultiScaleNeuralODE

__all__ = ["mnist_dense", "dense_network", "dense_deq", "FirstScale"]


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


def dense_deq(model_type: ModelType, width: int, solver: Any, *, backward: Optional[BackwardMode] = None,
              jac_reg: bool = False, detach_skip_target: Optional[bool] = None, reapply_map: bool = False,
              vanilla_penalty: bool = False) -> nn.Module:
    """The DEQ layer over ``f(z, x) = relu(W1 z) + relu(W2 x)`` (no biases) for ``vanilla`` / ``skip`` /
    ``skip_reg``; the Skip predictor is ``Dense(width→width, relu)`` as in the paper's MNIST model. The one
    builder of this layer: [`dense_network`][deqlab.models.mnist.dense_network] and ``deqlab.zoo.dense_deq_layer`` use it.

    Args:
        model_type: ``vanilla`` (u0 = 0), ``skip`` (the dense predictor) or ``skip_reg`` (u0 = f(0, x)).
        width: state (and injection) width: the layer maps ``(B, width)`` to ``(B, width)``.
        solver: the forward solver object.
        backward: the backward mode. Default ``None``: the layer's default (``ImplicitBackward()``).
        jac_reg: compute the Hutchinson Jacobian term. Default ``False``: it adds a VJP to every forward.
        detach_skip_target: see [`deqlab.nn.MapGuess`][deqlab.nn.MapGuess]. Default ``None``: the layer's default.
        reapply_map: return ``f(z_T, x)`` (the January-2022 code's z*). Default ``False``.
        vanilla_penalty: a vanilla layer's skip loss is ``mean |z*|`` (the January-2022 code's). Default
            ``False``.

    Returns:
        The DEQ layer: ``layer(x) -> (z_star, solution)``.

    Raises:
        ValueError: when ``model_type`` is not ``vanilla``, ``skip`` or ``skip_reg``.

    Examples:
        >>> import torch
        >>> from deqlab.models.mnist import dense_deq
        >>> from deqlab.solvers import DiscreteDEQSolver
        >>> layer = dense_deq("skip", 8, DiscreteDEQSolver("anderson"))
        >>> z, solution = layer(torch.randn(3, 8))
        >>> type(layer).__name__, z.shape
        ('SkipDeepEquilibriumNetwork', torch.Size([3, 8]))
    """
    check_choice("model_type", model_type, ("vanilla", "skip", "skip_reg"))
    block = DenseDEQBlock(width)
    shortcut = nn.Sequential(nn.Linear(width, width), nn.ReLU()) if model_type == "skip" else None
    return make_deq(model_type, block, solver, shortcut=shortcut, backward=backward, jac_reg=jac_reg,
                    detach_skip_target=detach_skip_target, reapply_map=reapply_map, vanilla_penalty=vanilla_penalty)


def dense_network(model_type: ModelType, solver: Any, *, backward: Optional[BackwardMode] = None,
                  jac_reg: bool = False, num_classes: int = 10, width: int = 128, in_features: int = 784,
                  detach_skip_target: Optional[bool] = None, reapply_map: bool = False,
                  vanilla_penalty: bool = False) -> PaperNetwork:
    """``Flatten → Dense(in_features→width, relu) → DEQ → Dense(width→num_classes)`` from solver objects.

    The one construction of the dense model: [`mnist_dense`][deqlab.models.mnist.mnist_dense] (solver *kinds*, the paper's
    tolerances) and the zoo's ``DenseDEQClassifier`` / ``MNISTDenseDEQ`` (solver objects or names) both
    build it here, in this order (stem, DEQ map, Skip predictor, head), so the same seed gives the same
    weights. ``neural_ode``: the same map integrated on ``t ∈ [0, 1]`` with a one-scale state (needs a
    ``ContinuousDEQSolver``, whose ODE tolerances it takes).

    Args:
        model_type: ``vanilla``, ``skip``, ``skip_reg`` or ``neural_ode``.
        solver: the forward solver object.
        backward: the backward mode (not used by ``neural_ode``). Default ``None``: the layer's default.
        jac_reg: compute the Hutchinson Jacobian term. Default ``False``: it adds a VJP to every forward.
        num_classes: classifier outputs. Default 10, MNIST's digits.
        width: state width of the DEQ. Default 128, the paper's.
        in_features: flattened input size. Default 784 (28×28 MNIST images).
        detach_skip_target: see [`deqlab.nn.MapGuess`][deqlab.nn.MapGuess]. Default ``None``: the layer's default.
        reapply_map: see [`dense_deq`][deqlab.models.mnist.dense_deq]. Default ``False``.
        vanilla_penalty: see [`dense_deq`][deqlab.models.mnist.dense_deq]. Default ``False``.

    Returns:
        The network, a [`PaperNetwork`][deqlab.models.PaperNetwork] (``solver_kind`` from the solver's type).

    Raises:
        ValueError: for an unknown ``model_type``, or ``neural_ode`` with a discrete solver or ``jac_reg``.

    Examples:
        >>> import torch
        >>> from deqlab.models.mnist import dense_network
        >>> from deqlab.solvers import DiscreteDEQSolver
        >>> net = dense_network("vanilla", DiscreteDEQSolver("anderson"), width=16, in_features=64)
        >>> logits, solution = net(torch.randn(2, 64))
        >>> logits.shape, net.solver_kind
        (torch.Size([2, 10]), 'discrete')
    """
    from deqlab.models._build import MODEL_TYPES
    from deqlab.solvers import ContinuousDEQSolver

    check_choice("model_type", model_type, MODEL_TYPES)
    kind: SolverKind = "continuous" if isinstance(solver, ContinuousDEQSolver) else "discrete"
    stem = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU())
    if model_type == "neural_ode":
        check_neural_ode(solver, jac_reg)
        deq: nn.Module = MultiScaleNeuralODE([DenseDEQBlock(width)], [[None]], None, "tsit5", [(width,)],
                                             ode_abstol=solver.ode_abstol, ode_reltol=solver.ode_reltol)
        head: nn.Module = FirstScale(nn.Linear(width, num_classes))
    else:
        deq = dense_deq(model_type, width, solver, backward=backward, jac_reg=jac_reg,
                        detach_skip_target=detach_skip_target, reapply_map=reapply_map,
                        vanilla_penalty=vanilla_penalty)
        head = nn.Linear(width, num_classes)
    return PaperNetwork(stem, deq, head, model_type=model_type, solver_kind=kind)


def mnist_dense(model_type: ModelType = "skip", solver: SolverKind = "discrete", *, jac_reg: bool = False,
                num_classes: int = 10, width: int = 128, in_features: int = 784, tol: float = 5e-3,
                max_steps: int = 50, mode: str = "rel_deq_default", backward_max_steps: int = 15,
                detach_skip_target: Optional[bool] = None, ode_solver: str = "tsit5", reapply_map: bool = False,
                vanilla_penalty: bool = False, reference_counting: str = "fastdeq",
                batch_wide: bool = False) -> PaperNetwork:
    """MNIST dense: ``Flatten → Dense(784→128, relu) → DEQ → Dense(128→10)``.

    DEQ map ``f(z, x) = relu(W1 z) + relu(W2 x)`` (no biases); Skip predictor ``Dense(128→128, relu)``;
    abstol = reltol = 5e-3, 50 steps; GMRES adjoint with the forward tolerance and at most
    ``min(max_steps, 15)`` VJPs. ``neural_ode``: the same map integrated on ``t ∈ [0, 1]`` with a
    one-scale state. The defaults are the paper's MNIST dense model. Built by
    [`dense_network`][deqlab.models.mnist.dense_network], as the zoo's ``MNISTDenseDEQ`` is.

    Args:
        model_type: ``vanilla``, ``skip``, ``skip_reg`` or ``neural_ode``. Default ``skip``, the paper's
            proposed model.
        solver: ``continuous`` (Tsit5) or ``discrete`` (limited-memory Broyden). Default ``discrete``, as
            [`deqlab.models.build_model`][deqlab.models.build_model]'s.
        jac_reg: compute the Hutchinson Jacobian term. Default ``False``: it adds a VJP to every forward.
        num_classes: classifier outputs. Default 10, MNIST's digits.
        width: state width of the DEQ. Default 128, the paper's.
        in_features: flattened input size. Default 784 (28×28 MNIST images).
        tol: forward tolerance (abs = rel, termination and ODE step), also the adjoint's. Default 5e-3, the
            paper's.
        max_steps: forward step budget. Default 50, the paper's.
        mode: termination mode. Default ``rel_deq_default``, the paper's.
        backward_max_steps: VJP budget of the GMRES adjoint (capped at ``max_steps``). Default 15, the
            paper's.
        detach_skip_target: whether the skip loss treats z* as a detached target; see
            [`deqlab.nn.MapGuess`][deqlab.nn.MapGuess]. Default ``None``: the layer's default, detached for ``skip``,
            coupled for ``skip_reg``.
        ode_solver: the continuous solver's integrator, ``tsit5`` (default: the paper's MNIST table) or
            ``vcab3`` (one evaluation per step after start-up).
        reapply_map: return ``f(z_T, x)`` as z* (the January-2022 code's; ``--protocol v1``). Default
            ``False``.
        vanilla_penalty: add the skip loss ``mean |z*|`` to vanilla models (the January-2022 code's; with
            the v1 λ_skip = 5). Default ``False``.
        reference_counting: the convention of ``solution.reference_nfe``. Default ``"fastdeq"``: the
            paper's MNIST table was counted by the January-2022 code (see `deqlab.solvers.counting`).
        batch_wide: one termination test over the whole batch, as the January-2022 code's L-Broyden and
            steady-state callback did (``--protocol v1``). Default ``False``: each sample stops on its own.

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
    solver_obj = make_solver(solver, mode=mode, tol=tol, max_steps=max_steps, ode_solver=ode_solver,  # type: ignore[arg-type]
                             reference_counting=reference_counting, batch_wide=batch_wide)
    backward = None if model_type == "neural_ode" else make_backward(tol, min(max_steps, backward_max_steps))
    return dense_network(model_type, solver_obj, backward=backward, jac_reg=jac_reg, num_classes=num_classes,
                         width=width, in_features=in_features, detach_skip_target=detach_skip_target,
                         reapply_map=reapply_map, vanilla_penalty=vanilla_penalty)
