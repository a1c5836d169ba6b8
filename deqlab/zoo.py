"""Ready-made Lightning models that the experiment configs name.

Why a zoo: ``deqlab fit --config experiments/mnist_dense.yaml`` and a Python user writing
``deqlab.zoo.MNISTDenseDEQ(model_type="skip")`` must train the *same* class, so the paper's
architectures live here once, as ``DEQLightningModule`` subclasses with typed hyperparameters.

Every model is ``stem → DEQ layer → head``; ``model_type`` chooses the DEQ layer:

* ``vanilla``: ``DeepEquilibriumNetwork`` (solve from u0 = 0);
* ``skip``: ``SkipDeepEquilibriumNetwork`` with an explicit shortcut network predicting u0;
* ``skip_reg``: ``SkipDeepEquilibriumNetwork(shortcut=None)``: u0 = f(0, x), no extra parameters.

Skip models also predict from u0 alone (``explicit_forward``), logged as explicit accuracy/time.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Tuple

from torch import Tensor, nn

from deqlab.lightning.module import DEQLightningModule

__all__ = ["DEQClassifier", "DigitsDEQ", "MNISTDenseDEQ", "DenseDEQClassifier", "build_solver", "dense_deq_layer"]

ModelType = Literal["vanilla", "skip", "skip_reg"]
SolverName = Literal["lbroyden", "broyden", "anderson", "fixed_point", "newton_krylov", "tsit5"]
TerminationModeName = Literal[
    "abs", "abs_norm", "rel", "rel_norm", "norm",
    "abs_deq_default", "rel_deq_default", "abs_deq_best", "rel_deq_best",
]


class DEQClassifier(DEQLightningModule):
    """Any network that follows the paper-model contract, trained as a classifier.

    ``network(x)`` must return ``(logits, solution)`` (``solution``: a ``DeepEquilibriumSolution``, a list
    of them, or ``None``); an optional ``network.explicit_forward(x)`` returns the u0-only logits of Skip
    models (or ``None``). The networks of :mod:`deqlab.models` follow it.

    Args:
        network: the model (stem → DEQ layer(s) → head).
        **kwargs: training settings of :class:`DEQLightningModule`.
    """

    def __init__(self, network: nn.Module, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.network = network

    def forward(self, x: Tensor) -> Tuple[Tensor, Any]:
        return self.network(x)

    def explicit_forward(self, x: Tensor) -> Optional[Tensor]:
        fn = getattr(self.network, "explicit_forward", None)
        return None if fn is None else fn(x)


def build_solver(
    name: SolverName,
    *,
    mode: TerminationModeName = "rel_deq_default",
    abstol: float = 5e-3,
    reltol: float = 5e-3,
    max_steps: int = 50,
) -> Any:
    """A deqlab solver from config-friendly scalars: ``tsit5`` → ``ContinuousDEQSolver`` (integrate to the
    steady state), anything else → ``DiscreteDEQSolver(name)``. ``abstol``/``reltol`` are the
    termination tolerances (and the ODE step tolerances for ``tsit5``)."""
    if name == "tsit5":
        from deqlab.solvers import ContinuousDEQSolver

        return ContinuousDEQSolver(
            "tsit5",
            mode=mode,
            abstol=abstol,
            reltol=reltol,
            abstol_termination=abstol,
            reltol_termination=reltol,
            max_steps=max_steps,
        )
    from deqlab.solvers import DiscreteDEQSolver

    return DiscreteDEQSolver(
        name, mode=mode, abstol_termination=abstol, reltol_termination=reltol, max_steps=max_steps
    )


def dense_deq_layer(
    model_type: ModelType, width: int, solver: Any, *, jacobian_regularization: bool = False,
    backward: Any = None,
) -> nn.Module:
    """The DEQ layer over ``f(z, x) = relu(W1 z) + relu(W2 x)`` for ``model_type``; the Skip predictor is
    ``Dense(width→width, relu)`` as in the paper's MNIST model. ``backward`` defaults to the layer's
    default (:class:`deqlab.nn.ImplicitBackward`)."""
    from deqlab.nn import DeepEquilibriumNetwork, DenseDEQBlock, SkipDeepEquilibriumNetwork

    if model_type not in ("vanilla", "skip", "skip_reg"):
        raise ValueError(f"model_type must be 'vanilla', 'skip' or 'skip_reg', got {model_type!r}")
    block = DenseDEQBlock(width)
    if model_type == "vanilla":
        return DeepEquilibriumNetwork(block, solver, backward=backward, jacobian_regularization=jacobian_regularization)
    shortcut = nn.Sequential(nn.Linear(width, width), nn.ReLU()) if model_type == "skip" else None
    return SkipDeepEquilibriumNetwork(block, solver, shortcut=shortcut, backward=backward,
                                      jacobian_regularization=jacobian_regularization)


class DenseDEQClassifier(DEQLightningModule):
    """``flatten → Linear(in→width) + relu → dense DEQ → Linear(width→classes)``: the MNIST-dense shape.

    Args:
        in_features: flattened input size (784 for MNIST, 64 for the 8×8 digits).
        width: state width of the DEQ (128 in the paper).
        model_type: ``vanilla``, ``skip`` or ``skip_reg``.
        solver: forward solver name (``tsit5`` = continuous DEQ).
        termination_mode: the solver's stop rule (see ``deqlab.solvers.termination``).
        abstol, reltol: termination tolerances.
        max_steps: solver iteration budget.
        jacobian_regularization: compute the Hutchinson Jacobian term (weighted by ``jacobian_loss_weight``).
        backward_solver: solver of the implicit backward's adjoint system (GMRES in the paper).
        backward_tol: its relative tolerance; ``None`` uses the forward ``reltol``, as the paper does.
        backward_max_steps: its VJP budget (the paper: at most ``min(maxiters, 15)``).
        **kwargs: training hyperparameters of :class:`DEQLightningModule` (optimizer, lr, schedule, λ's, ...).
    """

    def __init__(
        self,
        in_features: int = 784,
        width: int = 128,
        model_type: ModelType = "skip",
        solver: SolverName = "lbroyden",
        termination_mode: TerminationModeName = "rel_deq_default",
        abstol: float = 5e-3,
        reltol: float = 5e-3,
        max_steps: int = 50,
        jacobian_regularization: bool = False,
        backward_solver: Literal["gmres", "anderson", "fixed_point", "broyden"] = "gmres",
        backward_tol: Optional[float] = None,
        backward_max_steps: int = 15,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # the base records this model's constructor arguments as hparams
        num_classes = self.deq_config.num_classes or 10
        self.in_features = in_features
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU())
        solver_obj = build_solver(solver, mode=termination_mode, abstol=abstol, reltol=reltol, max_steps=max_steps)
        self.model_type = model_type
        from deqlab.nn import ImplicitBackward

        backward = ImplicitBackward(backward_solver, tol=reltol if backward_tol is None else backward_tol,
                                    max_steps=min(max_steps, backward_max_steps))
        self.deq = dense_deq_layer(model_type, width, solver_obj, jacobian_regularization=jacobian_regularization,
                                   backward=backward)
        self.head = nn.Linear(width, num_classes)

    def _embed(self, x: Tensor) -> Tensor:
        if x[0].numel() != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects inputs with {self.in_features} features per sample, got shape "
                f"{tuple(x.shape)}; set in_features or use a matching data module"
            )
        return self.stem(x)

    def forward(self, x: Tensor) -> Tuple[Tensor, Any]:
        z, solution = self.deq(self._embed(x))
        return self.head(z), solution

    def explicit_forward(self, x: Tensor) -> Optional[Tensor]:
        if self.model_type == "vanilla":
            return None  # u0 = 0 carries no information
        return self.head(self.deq.explicit(self._embed(x)))


class MNISTDenseDEQ(DenseDEQClassifier):
    """The paper's MNIST dense model with its training protocol as defaults.

    Dense(784→128, relu) → DEQ with f(z, x) = relu(W1 z) + relu(W2 x) (no biases) → Dense(128→10); skip
    predictor Dense(128→128, relu); limited-memory Broyden, abstol = reltol = 5e-3, 50 steps; λ_skip = 5.0
    (Skip variants), λ_jac = 1.0 when ``jacobian_regularization``; AdamW lr 1e-3, betas (0.9, 0.999),
    weight decay 2.5e-6, cosine to 1e-6 over all steps.
    """

    def __init__(
        self,
        model_type: ModelType = "skip",
        solver: SolverName = "lbroyden",
        termination_mode: TerminationModeName = "rel_deq_default",
        abstol: float = 5e-3,
        reltol: float = 5e-3,
        max_steps: int = 50,
        jacobian_regularization: bool = False,
        skip_loss_weight: Optional[float] = None,
        jacobian_loss_weight: Optional[float] = None,
        optimizer: Literal["adam", "adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 2.5e-6,
        eta_min: float = 1e-6,
        **kwargs: Any,
    ) -> None:
        """``skip_loss_weight``/``jacobian_loss_weight`` default (``None``) to the paper's 5.0 for Skip
        variants (0 for vanilla) and 1.0 with Jacobian regularization (0 without)."""
        if skip_loss_weight is None:
            skip_loss_weight = 5.0 if model_type != "vanilla" else 0.0
        if jacobian_loss_weight is None:
            jacobian_loss_weight = 1.0 if jacobian_regularization else 0.0
        super().__init__(
            in_features=784,
            width=128,
            model_type=model_type,
            solver=solver,
            termination_mode=termination_mode,
            abstol=abstol,
            reltol=reltol,
            max_steps=max_steps,
            jacobian_regularization=jacobian_regularization,
            skip_loss_weight=skip_loss_weight,
            jacobian_loss_weight=jacobian_loss_weight,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            eta_min=eta_min,
            **kwargs,
        )


class DigitsDEQ(DenseDEQClassifier):
    """A small dense DEQ for scikit-learn's 8×8 digits (the demo and test model): trains in seconds on a CPU.

    ``flatten → Linear(64→width) + relu → dense DEQ → Linear(width→10)``; accepts ``(B, 1, 8, 8)`` or
    ``(B, 64)`` inputs.
    """

    def __init__(
        self,
        model_type: ModelType = "skip",
        width: int = 64,
        solver: SolverName = "lbroyden",
        termination_mode: TerminationModeName = "rel_deq_default",
        abstol: float = 5e-3,
        reltol: float = 5e-3,
        max_steps: int = 30,
        jacobian_regularization: bool = False,
        skip_loss_weight: float = 1.0,
        lr: float = 3e-3,
        weight_decay: float = 1e-5,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            in_features=64,
            width=width,
            model_type=model_type,
            solver=solver,
            termination_mode=termination_mode,
            abstol=abstol,
            reltol=reltol,
            max_steps=max_steps,
            jacobian_regularization=jacobian_regularization,
            skip_loss_weight=skip_loss_weight if model_type != "vanilla" else 0.0,
            lr=lr,
            weight_decay=weight_decay,
            **kwargs,
        )
