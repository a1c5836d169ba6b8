"""The paper's MNIST models (v1 experiments): the dense DEQ and the 2-scale convolutional MDEQ."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union, cast

from torch import Tensor, nn

from deqlab._compat import renamed
from deqlab.models._build import PaperNetwork, build_backward, build_solver, check_fields, check_neural_ode, make_deq
from deqlab.nn import BackwardMode, DenseDEQBlock, MultiScaleNeuralODE
from deqlab.spec import PAPER_TOL, BackwardSpec, ModelKind, ModelType, ODESolverName, SolverKind, SolverSpec, model_kind

__all__ = ["mnist_dense", "dense_network", "dense_deq", "FirstScale", "DenseConfig", "MNIST_DENSE"]


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


@dataclass(frozen=True)
class DenseConfig:
    """The dense DEQ model of the paper's MNIST experiment, and its solve: the defaults, written once.

    ``Flatten → Dense(in_features→width, relu) → DEQ over f(z, x) = relu(W1 z) + relu(W2 x) →
    Dense(width→num_classes)``; the Skip predictor is ``Dense(width→width, relu)``.
    [`mnist_dense`][deqlab.models.mnist.mnist_dense] builds from `MNIST_DENSE` (keyword overrides replace fields),
    the zoo's ``MNISTDenseDEQ`` solves with its `solver_spec`.

    Attributes:
        width: state (and injection) width. 128, the paper's.
        in_features: flattened input size. 784 (28×28 MNIST).
        num_classes: classifier outputs. 10.
        tol: forward termination tolerance (abs = rel; also the ODE step tolerance, and, through the layer,
            the adjoint's). 5e-3, the paper's.
        max_steps: forward step budget. 50, the paper's.
        backward_max_steps: VJP budget of the GMRES adjoint. 15, the paper's.
        mode: termination mode. ``rel_deq_default``.
        ode_solver: the continuous solver's integrator: ``tsit5`` (the paper's MNIST table) or ``vcab3``.
        reference_counting: the convention of ``solution.reference_nfe``. ``fastdeq``: the paper's MNIST
            table was counted by the January-2022 code (`deqlab.solvers.counting`).
        batch_wide: one termination test over the whole batch (the 2022 code's; ``protocol="v1"``).
        reapply_map: return ``f(z_T, x)`` as z* (the 2022 code's).
        vanilla_penalty: a vanilla model's skip loss is ``mean |z*|`` (the 2022 code's).
        detach_skip_target: see [`deqlab.nn.MapGuess`][deqlab.nn.MapGuess]; ``None``: the layer's default.
        compile_solver: each forward-solver iteration, and each Arnoldi step of the GMRES adjoint, as one
            compiled graph (`SolverSpec.compile`, `BackwardSpec.compile`;
            `docs/performance.md`). ``False``.
        solver_check_every: the forward solver's host checks every ``k`` steps (`SolverSpec.check_every`;
            with ``compile_solver``, the ``k`` steps one graph). 1.
        cuda_graphs: on CUDA, the forward solver's ``solver_check_every`` steps replayed as one CUDA graph
            (`SolverSpec.cuda_graphs`). ``False``.

    Examples:
        >>> from deqlab.models.mnist import MNIST_DENSE
        >>> MNIST_DENSE.solver_spec("continuous").ode_solver, MNIST_DENSE.backward_spec().max_steps
        ('tsit5', 15)
    """

    width: int = 128
    in_features: int = 784
    num_classes: int = 10
    tol: float = PAPER_TOL
    max_steps: int = 50
    backward_max_steps: int = 15
    mode: str = "rel_deq_default"
    ode_solver: str = "tsit5"
    reference_counting: str = "fastdeq"
    batch_wide: bool = False
    reapply_map: bool = False
    vanilla_penalty: bool = False
    detach_skip_target: Optional[bool] = None
    compile_solver: bool = False
    solver_check_every: int = 1
    cuda_graphs: bool = False

    def solver_spec(self, kind: SolverKind) -> SolverSpec:
        """The forward solve for the solver ``kind`` (``continuous``: ``ode_solver``; ``discrete``:
        limited-memory Broyden)."""
        return SolverSpec(
            kind=kind,
            ode_solver=cast(ODESolverName, self.ode_solver),  # a plain string here; SolverSpec checks it
            tol=self.tol,
            max_steps=self.max_steps,
            mode=self.mode,
            reference_counting=self.reference_counting,
            batch_wide=self.batch_wide,
            compile=self.compile_solver,
            check_every=self.solver_check_every,
            cuda_graphs=self.cuda_graphs,
        )

    def backward_spec(self) -> BackwardSpec:
        """The GMRES adjoint within ``backward_max_steps`` VJPs, at the forward's tolerance."""
        return BackwardSpec(max_steps=self.backward_max_steps, compile=self.compile_solver)


#: The paper's MNIST dense model (the defaults of `mnist_dense`).
MNIST_DENSE = DenseConfig()


def dense_deq(
    model_type: Union[ModelType, ModelKind],
    width: int,
    solver: Any,
    *,
    backward: Optional[BackwardMode] = None,
    jacobian_regularization: bool = False,
    detach_skip_target: Optional[bool] = None,
    reapply_map: bool = False,
    vanilla_penalty: bool = False,
) -> nn.Module:
    """The DEQ layer over ``f(z, x) = relu(W1 z) + relu(W2 x)`` (no biases) for ``vanilla`` / ``skip`` /
    ``skip_reg``; the Skip predictor is ``Dense(width→width, relu)`` as in the paper's MNIST model. The one
    builder of this layer: [`dense_network`][deqlab.models.mnist.dense_network] and ``deqlab.zoo.dense_deq_layer`` use it.

    Args:
        model_type: ``vanilla`` (u0 = 0), ``skip`` (the dense predictor) or ``skip_reg`` (u0 = f(0, x)).
        width: state (and injection) width: the layer maps ``(B, width)`` to ``(B, width)``.
        solver: the forward solver object.
        backward: the backward mode. Default ``None``: the layer's default (``ImplicitBackward()``).
        jacobian_regularization: compute the Hutchinson Jacobian term. Default ``False``: it adds a VJP to
            every forward.
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
    kind = model_kind(model_type, deq_only=True)
    block = DenseDEQBlock(width)
    shortcut = nn.Sequential(nn.Linear(width, width), nn.ReLU()) if kind.shortcut else None
    return make_deq(
        kind,
        block,
        solver,
        shortcut=shortcut,
        backward=backward,
        jacobian_regularization=jacobian_regularization,
        detach_skip_target=detach_skip_target,
        reapply_map=reapply_map,
        vanilla_penalty=vanilla_penalty,
    )


def dense_network(
    model_type: Union[ModelType, ModelKind],
    solver: Any,
    *,
    backward: Optional[BackwardMode] = None,
    jacobian_regularization: bool = False,
    num_classes: int = 10,
    width: int = 128,
    in_features: int = 784,
    detach_skip_target: Optional[bool] = None,
    reapply_map: bool = False,
    vanilla_penalty: bool = False,
) -> PaperNetwork:
    """``Flatten → Dense(in_features→width, relu) → DEQ → Dense(width→num_classes)`` from solver objects.

    The one construction of the dense model: [`mnist_dense`][deqlab.models.mnist.mnist_dense] (a `DenseConfig`) and
    the zoo's ``DenseDEQClassifier`` / ``MNISTDenseDEQ`` (solver objects) both build it here, in this order
    (stem, DEQ map, Skip predictor, head), so the same seed gives the same weights. ``neural_ode``: the same
    map integrated on ``t ∈ [0, 1]`` with a one-scale state (needs a ``ContinuousDEQSolver``, whose ODE
    tolerances it takes).

    Args:
        model_type: ``vanilla``, ``skip``, ``skip_reg`` or ``neural_ode`` (or its `deqlab.spec.ModelKind`).
        solver: the forward solver object.
        backward: the backward mode (not used by ``neural_ode``). Default ``None``: the layer's default.
        jacobian_regularization: compute the Hutchinson Jacobian term. Default ``False``: it adds a VJP to
            every forward.
        num_classes: classifier outputs. Default 10, MNIST's digits.
        width: state width of the DEQ. Default 128, the paper's.
        in_features: flattened input size. Default 784 (28×28 MNIST images).
        detach_skip_target: see [`deqlab.nn.MapGuess`][deqlab.nn.MapGuess]. Default ``None``: the layer's default.
        reapply_map: see [`dense_deq`][deqlab.models.mnist.dense_deq]. Default ``False``.
        vanilla_penalty: see [`dense_deq`][deqlab.models.mnist.dense_deq]. Default ``False``.

    Returns:
        The network, a [`PaperNetwork`][deqlab.models.PaperNetwork] (``solver_kind`` from the solver's type).

    Raises:
        ValueError: for an unknown ``model_type``, or ``neural_ode`` with a discrete solver or Jacobian
            regularization.

    Examples:
        >>> import torch
        >>> from deqlab.models.mnist import dense_network
        >>> from deqlab.solvers import DiscreteDEQSolver
        >>> net = dense_network("vanilla", DiscreteDEQSolver("anderson"), width=16, in_features=64)
        >>> logits, solution = net(torch.randn(2, 64))
        >>> logits.shape, net.solver_kind
        (torch.Size([2, 10]), 'discrete')
    """
    from deqlab.solvers import ContinuousDEQSolver

    kind = model_kind(model_type)
    solver_kind: SolverKind = "continuous" if isinstance(solver, ContinuousDEQSolver) else "discrete"
    stem = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU())
    if not kind.is_deq:
        check_neural_ode(solver, jacobian_regularization)
        deq: nn.Module = MultiScaleNeuralODE(
            [DenseDEQBlock(width)],
            [[None]],
            None,
            "tsit5",
            [(width,)],
            ode_abstol=solver.ode_abstol,
            ode_reltol=solver.ode_reltol,
        )
        head: nn.Module = FirstScale(nn.Linear(width, num_classes))
    else:
        deq = dense_deq(
            kind,
            width,
            solver,
            backward=backward,
            jacobian_regularization=jacobian_regularization,
            detach_skip_target=detach_skip_target,
            reapply_map=reapply_map,
            vanilla_penalty=vanilla_penalty,
        )
        head = nn.Linear(width, num_classes)
    return PaperNetwork(stem, deq, head, model_type=kind, solver_kind=solver_kind)


def mnist_dense(
    model_type: Union[ModelType, ModelKind] = "skip",
    solver: SolverKind = "discrete",
    *,
    jacobian_regularization: Optional[bool] = None,
    jac_reg: Optional[bool] = None,
    **overrides: Any,
) -> PaperNetwork:
    """MNIST dense: ``Flatten → Dense(784→128, relu) → DEQ → Dense(128→10)``, from `MNIST_DENSE`.

    DEQ map ``f(z, x) = relu(W1 z) + relu(W2 x)`` (no biases); Skip predictor ``Dense(128→128, relu)``;
    abstol = reltol = 5e-3, 50 steps; GMRES adjoint at the forward tolerance within 15 VJPs.
    ``neural_ode``: the same map integrated on ``t ∈ [0, 1]`` with a one-scale state. Built by
    [`dense_network`][deqlab.models.mnist.dense_network], as the zoo's ``MNISTDenseDEQ`` is.

    Args:
        model_type: ``vanilla``, ``skip``, ``skip_reg`` or ``neural_ode``. Default ``skip``, the paper's
            proposed model.
        solver: ``continuous`` (``ode_solver``, Tsit5 by default) or ``discrete`` (limited-memory Broyden).
            Default ``discrete``, as [`deqlab.models.build_model`][deqlab.models.build_model]'s.
        jacobian_regularization: compute the Hutchinson Jacobian term. Default ``None``: ``False`` (it adds
            a VJP to every forward).
        jac_reg: deprecated old name of ``jacobian_regularization`` (warns ``DeprecationWarning``).
        **overrides: fields of `DenseConfig` to change (``width``, ``tol``, ``max_steps``, ``mode``,
            ``backward_max_steps``, ``ode_solver``, ``reference_counting``, ``batch_wide``, ``reapply_map``,
            ``vanilla_penalty``, ``detach_skip_target``, ``num_classes``, ``in_features``).

    Returns:
        The network, a [`PaperNetwork`][deqlab.models.PaperNetwork].

    Raises:
        TypeError: for an ``overrides`` name that is not a `DenseConfig` field.
        ValueError: for an unknown ``solver``, or ``neural_ode`` with the discrete solver or Jacobian
            regularization.

    Examples:
        >>> import torch
        >>> from deqlab.models import count_parameters
        >>> from deqlab.models.mnist import mnist_dense
        >>> net = mnist_dense("neural_ode", "continuous", width=16)
        >>> logits, solution = net(torch.randn(2, 784))
        >>> logits.shape, count_parameters(net)
        (torch.Size([2, 10]), 13242)
    """
    jr = bool(renamed("mnist_dense", "jacobian_regularization", jacobian_regularization, "jac_reg", jac_reg, False))
    check_fields("mnist_dense", overrides, [f.name for f in dataclasses.fields(DenseConfig)])
    cfg = dataclasses.replace(MNIST_DENSE, **overrides)
    kind = model_kind(model_type)
    solver_obj = build_solver(cfg.solver_spec(solver))
    backward = build_backward(cfg.backward_spec()) if kind.is_deq else None
    return dense_network(
        kind,
        solver_obj,
        backward=backward,
        jacobian_regularization=jr,
        num_classes=cfg.num_classes,
        width=cfg.width,
        in_features=cfg.in_features,
        detach_skip_target=cfg.detach_skip_target,
        reapply_map=cfg.reapply_map,
        vanilla_penalty=cfg.vanilla_penalty,
    )


mnist_dense.config = MNIST_DENSE  # type: ignore[attr-defined]  # the defaults, readable without building a network
