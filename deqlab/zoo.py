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

from typing import Any, ClassVar, Dict, Literal, Optional, Tuple, Union

from torch import Tensor, nn

from deqlab.lightning.config import DEQTrainingConfig
from deqlab.lightning.module import DEQLightningModule
from deqlab.nn.implicit import BackwardMode
from deqlab.solvers.protocols import Solver

__all__ = [
    "DEQClassifier", "DigitsDEQ", "MNISTDenseDEQ", "DenseDEQClassifier", "build_solver", "build_backward",
    "dense_deq_layer", "DIGITS_TRAINING", "MNIST_TRAINING",
]

ModelType = Literal["vanilla", "skip", "skip_reg"]
SolverName = Literal["lbroyden", "broyden", "anderson", "fixed_point", "newton_krylov", "tsit5"]
BackwardName = Literal["gmres", "anderson", "fixed_point", "broyden", "lbroyden"]
TerminationModeName = Literal[
    "abs", "abs_norm", "rel", "rel_norm", "norm",
    "abs_deq_default", "rel_deq_default", "abs_deq_best", "rel_deq_best",
]

#: DigitsDEQ's training defaults (λ_skip = 1.0 for Skip variants is filled in by the model).
DIGITS_TRAINING = DEQTrainingConfig(lr=3e-3, weight_decay=1e-5)
#: The paper's MNIST-dense protocol (λ_skip = 5.0 for Skip variants, λ_jac = 1.0 with Jacobian
#: regularization are filled in by the model unless set).
MNIST_TRAINING = DEQTrainingConfig(optimizer="adamw", lr=1e-3, betas=(0.9, 0.999), weight_decay=2.5e-6,
                                   scheduler="cosine", eta_min=1e-6)

#: The pre-object solver keywords, kept as aliases (see `DenseDEQClassifier.__init__`).
_LEGACY_SOLVER_KEYS = ("termination_mode", "abstol", "reltol", "max_steps")
_LEGACY_BACKWARD_KEYS = ("backward_solver", "backward_tol", "backward_max_steps")


class DEQClassifier(DEQLightningModule):
    """Any network that follows the paper-model contract, trained as a classifier.

    ``network(x)`` must return ``(logits, solution)`` (``solution``: a ``DeepEquilibriumSolution``, a list
    of them, or ``None``); an optional ``network.explicit_forward(x)`` returns the u0-only logits of Skip
    models (or ``None``). The networks of `deqlab.models` follow it.

    Args:
        network: the model (stem → DEQ layer(s) → head). Not recorded in ``hparams`` (its weights are in the
            state dict): rebuild it for ``DEQClassifier.load_from_checkpoint(path, network=...)``.
        **kwargs: training settings, passed to [`DEQLightningModule`][deqlab.lightning.DEQLightningModule]
            ([`DEQTrainingConfig`][deqlab.lightning.DEQTrainingConfig] fields, flat, or ``training=DEQTrainingConfig(...)``;
            [`deqlab.models.paper_settings`][deqlab.models.paper_settings] gives the paper's).

    Raises:
        TypeError: when a keyword is not a training setting (see [`DEQLightningModule`][deqlab.lightning.DEQLightningModule]).

    Examples:
        >>> import torch
        >>> from deqlab.models import build_model
        >>> from deqlab.zoo import DEQClassifier
        >>> model = DEQClassifier(build_model("mnist", "dense", width=16), lr=3e-3)
        >>> logits, solution = model(torch.randn(2, 1, 28, 28))
        >>> logits.shape, model.explicit_forward(torch.randn(2, 1, 28, 28)).shape
        (torch.Size([2, 10]), torch.Size([2, 10]))
        >>> dict(model.hparams)  # the network is not a hyperparameter
        {'lr': 0.003}
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
) -> Solver:
    """A deqlab solver from a name (the string shorthand of the zoo's ``solver`` argument): ``tsit5`` →
    ``ContinuousDEQSolver`` (integrate to the steady state), anything else → ``DiscreteDEQSolver(name)``.
    The defaults are the paper's (5e-3, 50 steps).

    Args:
        name: ``lbroyden``, ``broyden``, ``anderson``, ``fixed_point``, ``newton_krylov`` (discrete
            solvers) or ``tsit5`` (the continuous DEQ). No default: the zoo models pass theirs
            (``lbroyden``).
        mode: termination mode of the solve (see `deqlab.solvers.termination`). Default
            ``rel_deq_default``, the paper's: stop when ``||f(z) - z|| / ||f(z)||`` is below ``reltol``
            (or, after a patience window, stalls near it).
        abstol: absolute termination tolerance (and the ODE step ``abstol`` for ``tsit5``, so the
            integration is as accurate as the stopping test). Default 5e-3, the paper's.
        reltol: relative termination tolerance (and the ODE step ``reltol`` for ``tsit5``). Default 5e-3,
            the paper's.
        max_steps: iteration budget (solver steps; stepper calls, accepted or rejected, for ``tsit5``).
            Default 50, the paper's MNIST budget.

    Returns:
        A ``ContinuousDEQSolver`` for ``tsit5``, else a ``DiscreteDEQSolver``; pass it as a layer's or
            a zoo model's ``solver``.

    Raises:
        ValueError: from the solver for an unknown ``name`` or ``mode``.

    Examples:
        >>> from deqlab.zoo import build_solver
        >>> build_solver("anderson", max_steps=20)
        DiscreteDEQSolver(Anderson(...), mode='rel_deq_default', abstol_termination=0.005, reltol_termination=0.005, ..., max_steps=20)
        >>> type(build_solver("tsit5")).__name__
        'ContinuousDEQSolver'
    """
    if name == "tsit5":
        from deqlab.solvers import ContinuousDEQSolver

        return ContinuousDEQSolver(
            "tsit5",
            mode=mode,
            ode_abstol=abstol,
            ode_reltol=reltol,
            abstol_termination=abstol,
            reltol_termination=reltol,
            max_steps=max_steps,
        )
    from deqlab.solvers import DiscreteDEQSolver

    return DiscreteDEQSolver(
        name, mode=mode, abstol_termination=abstol, reltol_termination=reltol, max_steps=max_steps
    )


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
    from deqlab.nn import ImplicitBackward

    budget = {k: v for k, v in (("tol", tol), ("max_steps", max_steps)) if v is not None}
    return ImplicitBackward(name, **budget)


def dense_deq_layer(
    model_type: ModelType, width: int, solver: Any, *, jacobian_regularization: bool = False,
    backward: Any = None,
) -> nn.Module:
    """The DEQ layer over ``f(z, x) = relu(W1 z) + relu(W2 x)`` for ``model_type``; the Skip predictor is
    ``Dense(width→width, relu)`` as in the paper's MNIST model.

    Args:
        model_type: ``vanilla`` (``DeepEquilibriumNetwork``, u0 = 0), ``skip`` (``SkipDeepEquilibriumNetwork``
            with the dense predictor) or ``skip_reg`` (``SkipDeepEquilibriumNetwork(shortcut=None)``,
            u0 = f(0, x)).
        width: state (and injection) width: the layer maps ``(B, width)`` to ``(B, width)``.
        solver: the forward solver object (e.g. from [`build_solver`][deqlab.zoo.build_solver]).
        jacobian_regularization: compute the Hutchinson Jacobian term on ``solution.jacobian_loss``.
            Default ``False``: it adds a VJP (and its backward) to every forward, and is only needed
            when it is trained on.
        backward: the backward mode. Default ``None``: the layer's default ([`deqlab.nn.ImplicitBackward`][deqlab.nn.ImplicitBackward]),
            so this layer differentiates like a hand-built one.

    Returns:
        The DEQ layer: ``layer(x) -> (z_star, solution)``.

    Raises:
        ValueError: when ``model_type`` is not ``vanilla``, ``skip`` or ``skip_reg``.

    Examples:
        >>> import torch
        >>> from deqlab.zoo import build_solver, dense_deq_layer
        >>> layer = dense_deq_layer("vanilla", 8, build_solver("anderson"))
        >>> z, solution = layer(torch.randn(3, 8))
        >>> type(layer).__name__, z.shape
        ('DeepEquilibriumNetwork', torch.Size([3, 8]))
    """
    from deqlab.nn import DeepEquilibriumNetwork, DenseDEQBlock, SkipDeepEquilibriumNetwork

    if model_type not in ("vanilla", "skip", "skip_reg"):
        raise ValueError(f"model_type must be 'vanilla', 'skip' or 'skip_reg', got {model_type!r}")
    block = DenseDEQBlock(width)
    if model_type == "vanilla":
        return DeepEquilibriumNetwork(block, solver, backward=backward, jacobian_regularization=jacobian_regularization)
    shortcut = nn.Sequential(nn.Linear(width, width), nn.ReLU()) if model_type == "skip" else None
    return SkipDeepEquilibriumNetwork(block, solver, shortcut=shortcut, backward=backward,
                                      jacobian_regularization=jacobian_regularization)


def _resolve_solver_and_backward(
    solver: Union[Solver, str, None], backward: Union[BackwardMode, str, None], legacy: Dict[str, Any],
    default_max_steps: int, owner: str,
) -> Tuple[Solver, BackwardMode]:
    """Solver and backward objects from what the caller gave: objects are used as they are; a name or
    ``None`` builds the zoo default ([`build_solver`][deqlab.zoo.build_solver], [`build_backward`][deqlab.zoo.build_backward]). The old flat keywords
    (``abstol``, ``max_steps``, ``backward_tol``, ...) are aliases for the name form only."""
    solver_kw = {k: legacy[k] for k in _LEGACY_SOLVER_KEYS if k in legacy}
    backward_kw = {k: legacy[k] for k in _LEGACY_BACKWARD_KEYS if k in legacy}
    if solver_kw and not (solver is None or isinstance(solver, str)):
        raise ValueError(f"{owner}: pass {', '.join(solver_kw)} only with a solver name, not with a solver object "
                         f"(set them on the object: {solver!r})")
    if backward_kw and not (backward is None or isinstance(backward, str)):
        raise ValueError(f"{owner}: pass {', '.join(backward_kw)} only without a backward object")
    if backward_kw.get("backward_solver") is not None and backward is not None:
        raise ValueError(f"{owner}: pass backward or backward_solver, not both")
    if solver is None or isinstance(solver, str):
        solver = build_solver(
            solver or "lbroyden",  # type: ignore[arg-type]
            mode=solver_kw.get("termination_mode", "rel_deq_default"),
            abstol=solver_kw.get("abstol", 5e-3),
            reltol=solver_kw.get("reltol", 5e-3),
            max_steps=solver_kw.get("max_steps", default_max_steps),
        )
    if backward is None or isinstance(backward, str):
        backward = build_backward(
            backward or backward_kw.get("backward_solver", "gmres"),  # type: ignore[arg-type]
            tol=backward_kw.get("backward_tol"), max_steps=backward_kw.get("backward_max_steps"),
        )
    return solver, backward


class DenseDEQClassifier(DEQLightningModule):
    """``flatten → Linear(in→width) + relu → dense DEQ → Linear(width→classes)``: the MNIST-dense shape.

    Args:
        in_features: flattened input size (784 for MNIST, 64 for the 8×8 digits). Default 784: MNIST, the
            paper's dense experiment.
        width: state width of the DEQ. Default 128, the paper's.
        model_type: ``vanilla``, ``skip`` or ``skip_reg``. Default ``skip``, the paper's proposed model.
        solver: the forward solver: any [`Solver`][deqlab.solvers.Solver] object (in a config:
            ``class_path: deqlab.solvers.DiscreteDEQSolver`` with its ``init_args``), or a name
            (``lbroyden``, ..., ``tsit5`` = continuous DEQ) for [`build_solver`][deqlab.zoo.build_solver] with the paper's
            tolerances (5e-3) and ``default_max_steps``; ``None`` (default): ``lbroyden``, the paper's
            discrete solver.
        backward: the backward mode: a [`BackwardMode`][deqlab.nn.BackwardMode] object (``ImplicitBackward``,
            ``JacobianFreeBackward``, ``PhantomGradient``), or the name of the adjoint solver for
            [`build_backward`][deqlab.zoo.build_backward]; ``None`` (default): ``ImplicitBackward()``'s default, the paper's GMRES
            adjoint to the forward's termination tolerance within at most 15 VJPs (the same as a hand-built
            layer).
        jacobian_regularization: compute the Hutchinson Jacobian term (weighted by ``jacobian_loss_weight``).
            Default ``False``: the term adds a VJP (and its backward) to every forward.
        **kwargs: training settings, passed to [`DEQLightningModule`][deqlab.lightning.DEQLightningModule] (``training=`` or flat field
            names). The old solver keywords ``termination_mode``, ``abstol``, ``reltol``, ``max_steps``,
            ``backward_solver``, ``backward_tol``, ``backward_max_steps`` still work with a solver *name*.

    Raises:
        ValueError: when ``model_type`` is unknown, or an old solver keyword comes with a solver (or
            backward) object instead of a name.
        TypeError: when a keyword is neither a training setting nor an old solver keyword.

    Examples:
        >>> import torch
        >>> from deqlab.zoo import DenseDEQClassifier
        >>> model = DenseDEQClassifier(in_features=10, width=8, model_type="skip_reg", num_classes=3)
        >>> logits, solution = model(torch.randn(2, 10))
        >>> logits.shape
        torch.Size([2, 3])
        >>> DenseDEQClassifier(in_features=10, width=8, solver="fixed_point", max_steps=10).deq.solver
        DiscreteDEQSolver(FixedPointIteration(...), ..., max_steps=10)
    """

    #: iteration budget of a solver built from a name
    default_max_steps: ClassVar[int] = 50

    def __init__(
        self,
        in_features: int = 784,
        width: int = 128,
        model_type: ModelType = "skip",
        solver: Union[Solver, SolverName, None] = None,
        backward: Union[BackwardMode, BackwardName, None] = None,
        jacobian_regularization: bool = False,
        **kwargs: Any,
    ) -> None:
        legacy = {k: kwargs.pop(k) for k in (*_LEGACY_SOLVER_KEYS, *_LEGACY_BACKWARD_KEYS) if k in kwargs}
        super().__init__(**kwargs)  # the base records this model's constructor arguments as hparams
        num_classes = self.deq_config.num_classes or 10
        self.in_features = in_features
        self.model_type = model_type
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU())
        solver_obj, backward_obj = _resolve_solver_and_backward(
            solver, backward, legacy, self.default_max_steps, type(self).__name__)
        self.deq = dense_deq_layer(model_type, width, solver_obj, jacobian_regularization=jacobian_regularization,
                                   backward=backward_obj)
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
    predictor Dense(128→128, relu); limited-memory Broyden, abstol = reltol = 5e-3, 50 steps; GMRES adjoint
    within 15 VJPs; [`MNIST_TRAINING`][deqlab.zoo.MNIST_TRAINING] (AdamW lr 1e-3, betas (0.9, 0.999), weight decay 2.5e-6, cosine
    to 1e-6 over all steps); λ_skip = 5.0 for Skip variants (0 for vanilla) and λ_jac = 1.0 with
    ``jacobian_regularization`` (0 without) unless ``skip_loss_weight`` / ``jacobian_loss_weight`` are set.
    ``in_features`` and ``width`` are fixed (784, 128): they are the paper's model.

    Args:
        model_type: ``vanilla``, ``skip`` or ``skip_reg``. Default ``skip``, the paper's proposed model.
        solver: a solver object or name, as in [`DenseDEQClassifier`][deqlab.zoo.DenseDEQClassifier]. Default ``None``: limited-memory
            Broyden with the paper's 5e-3 tolerances and 50 steps.
        backward: a backward mode or adjoint-solver name, as in [`DenseDEQClassifier`][deqlab.zoo.DenseDEQClassifier]. Default
            ``None``: the paper's GMRES adjoint within 15 VJPs.
        jacobian_regularization: compute the Hutchinson Jacobian term. Default ``False``, the paper's
            "Skip DEQ" rows; ``True`` gives the "+ Jac. Reg." rows (and λ_jac = 1.0).
        training: the training settings. Default [`MNIST_TRAINING`][deqlab.zoo.MNIST_TRAINING], the paper's MNIST protocol
            (``None`` means the same).
        **kwargs: passed to [`DenseDEQClassifier`][deqlab.zoo.DenseDEQClassifier]: flat training settings applied on top of
            ``training`` (``lr=...``) and the old solver keywords.

    Raises:
        ValueError: as [`DenseDEQClassifier`][deqlab.zoo.DenseDEQClassifier] (unknown ``model_type``, old solver keywords with objects).
        TypeError: when a keyword is not a training setting.

    Examples:
        >>> from deqlab.models import count_parameters
        >>> from deqlab.zoo import MNISTDenseDEQ
        >>> model = MNISTDenseDEQ(model_type="vanilla", jacobian_regularization=True)
        >>> model.deq_config.skip_loss_weight, model.deq_config.jacobian_loss_weight, model.deq_config.lr
        (0.0, 1.0, 0.001)
        >>> count_parameters(model), count_parameters(MNISTDenseDEQ())  # the skip predictor adds 16.5k
        (134538, 151050)
    """

    def __init__(
        self,
        model_type: ModelType = "skip",
        solver: Union[Solver, SolverName, None] = None,
        backward: Union[BackwardMode, BackwardName, None] = None,
        jacobian_regularization: bool = False,
        training: Optional[DEQTrainingConfig] = MNIST_TRAINING,
        **kwargs: Any,
    ) -> None:
        # None is this model's defaults too: jsonargparse (the CLI) passes None when no training key is
        # given (it takes DEQLightningModule's default for a parameter it finds in both signatures).
        training = MNIST_TRAINING if training is None else training
        super().__init__(in_features=784, width=128, model_type=model_type, solver=solver, backward=backward,
                         jacobian_regularization=jacobian_regularization, training=training, **kwargs)
        self.deq_config = self.deq_config.with_default_weights(
            skip_loss_weight=5.0 if model_type != "vanilla" else 0.0,
            jacobian_loss_weight=1.0 if jacobian_regularization else 0.0,
        )


class DigitsDEQ(DenseDEQClassifier):
    """A small dense DEQ for scikit-learn's 8×8 digits (the demo and test model): trains in seconds on a CPU.

    ``flatten → Linear(64→width) + relu → dense DEQ → Linear(width→10)``; accepts ``(B, 1, 8, 8)`` or
    ``(B, 64)`` inputs. Solver by name: 30 steps. Training defaults [`DIGITS_TRAINING`][deqlab.zoo.DIGITS_TRAINING] (lr 3e-3,
    weight decay 1e-5) with λ_skip = 1.0 for Skip variants unless ``skip_loss_weight`` is set. Arguments
    as [`DenseDEQClassifier`][deqlab.zoo.DenseDEQClassifier], with ``in_features`` fixed to 64.

    Args:
        model_type: ``vanilla``, ``skip`` or ``skip_reg``. Default ``skip``, the paper's proposed model.
        width: state width of the DEQ. Default 64: as wide as the input, enough for the digits and fast
            on a CPU.
        solver: a solver object or name, as in [`DenseDEQClassifier`][deqlab.zoo.DenseDEQClassifier]. Default ``None``:
            limited-memory Broyden, 5e-3 tolerances, 30 steps (the small map converges well within them).
        backward: a backward mode or adjoint-solver name, as in [`DenseDEQClassifier`][deqlab.zoo.DenseDEQClassifier]. Default
            ``None``: the GMRES adjoint within 15 VJPs.
        jacobian_regularization: compute the Hutchinson Jacobian term. Default ``False``: it adds a VJP
            (and its backward) to every forward.
        training: the training settings (``None``: the same default). Default [`DIGITS_TRAINING`][deqlab.zoo.DIGITS_TRAINING] (lr 3e-3, weight decay 1e-5),
            tuned for the small dataset.
        **kwargs: passed to [`DenseDEQClassifier`][deqlab.zoo.DenseDEQClassifier]: flat training settings applied on top of
            ``training`` (``lr=...``) and the old solver keywords.

    Raises:
        ValueError: as [`DenseDEQClassifier`][deqlab.zoo.DenseDEQClassifier] (unknown ``model_type``, old solver keywords with objects).
        TypeError: when a keyword is not a training setting.

    Examples:
        >>> import torch
        >>> from deqlab.zoo import DigitsDEQ
        >>> model = DigitsDEQ(width=16)
        >>> logits, solution = model(torch.randn(8, 1, 8, 8))
        >>> logits.shape, model.explicit_forward(torch.randn(8, 64)).shape
        (torch.Size([8, 10]), torch.Size([8, 10]))
        >>> model.deq_config.lr, model.deq_config.skip_loss_weight, model.deq.solver.max_steps
        (0.003, 1.0, 30)

        Train it with ``pl.Trainer(max_epochs=5).fit(model, deqlab.data.DigitsDataModule())``.
    """

    default_max_steps: ClassVar[int] = 30

    def __init__(
        self,
        model_type: ModelType = "skip",
        width: int = 64,
        solver: Union[Solver, SolverName, None] = None,
        backward: Union[BackwardMode, BackwardName, None] = None,
        jacobian_regularization: bool = False,
        training: Optional[DEQTrainingConfig] = DIGITS_TRAINING,
        **kwargs: Any,
    ) -> None:
        # None is this model's defaults too: jsonargparse (the CLI) passes None when no training key is
        # given (it takes DEQLightningModule's default for a parameter it finds in both signatures).
        training = DIGITS_TRAINING if training is None else training
        super().__init__(in_features=64, width=width, model_type=model_type, solver=solver, backward=backward,
                         jacobian_regularization=jacobian_regularization, training=training, **kwargs)
        self.deq_config = self.deq_config.with_default_weights(
            skip_loss_weight=1.0 if model_type != "vanilla" else 0.0)
