"""Ready-made Lightning models that the experiment configs name.

Why a zoo: ``deqlab fit --config experiments/mnist_dense.yaml`` and a Python user writing
``deqlab.zoo.MNISTDenseDEQ(model_type="skip")`` must train the *same* class, so the paper's
architectures live here once, as ``DEQLightningModule`` subclasses with typed hyperparameters.

Every model is ``stem → DEQ layer → head``; ``model_type`` chooses the DEQ layer:

* ``vanilla``: ``DeepEquilibriumNetwork`` (solve from u0 = 0);
* ``skip``: ``SkipDeepEquilibriumNetwork`` with an explicit shortcut network predicting u0;
* ``skip_reg``: ``SkipDeepEquilibriumNetwork(shortcut=None)``: u0 = f(0, x), no extra parameters.

Skip models also predict from u0 alone (``explicit_forward``), logged as explicit accuracy/time.

One definition of each part, whichever door a user comes in by: the networks, solvers and backward modes
are built by `deqlab.models` (`build_solver`, `build_backward` and `dense_deq_layer` here *are* those
builders, and ``MNISTDenseDEQ``'s network is ``deqlab.models.mnist.dense_network``'s), and the paper's
MNIST training protocol is read from [`deqlab.models.paper_settings`][deqlab.models.paper_settings]. Each model class states its
training defaults once, as ``default_training``; a partial ``training`` block changes only what it names.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Literal, Optional, Protocol, Tuple, Union, runtime_checkable

from torch import Tensor, nn

from deqlab._compat import warn_renamed
from deqlab.lightning.module import DEQLightningModule
from deqlab.models._build import BackwardName, PaperNetwork, SolverName, build_backward, build_solver
from deqlab.models.mnist import MNIST_DENSE, dense_deq, dense_network
from deqlab.models.settings import TRAINING_KEYS, paper_settings
from deqlab.nn.implicit import BackwardMode
from deqlab.solvers.protocols import Solver
from deqlab.spec import model_kind
from deqlab.spec.training import DEQTrainingConfig, TrainingArg

__all__ = [
    "DEQClassifier",
    "DigitsDEQ",
    "MNISTDenseDEQ",
    "DenseDEQClassifier",
    "ExplicitPredictor",
    "build_solver",
    "build_backward",
    "dense_deq_layer",
    "DIGITS_TRAINING",
    "MNIST_TRAINING",
]

ModelType = Literal["vanilla", "skip", "skip_reg"]

#: The loss weights depend on the model type; a model fills them (``with_default_weights``), the
#: training protocols below leave them unset.
_LOSS_WEIGHTS = ("skip_loss_weight", "jacobian_loss_weight")


def _paper_training(experiment: str, arch: str) -> DEQTrainingConfig:
    """The model-type-independent training settings of a paper experiment (``paper_settings`` minus the
    loss weights and the run keys)."""
    settings = paper_settings(experiment, arch)
    return DEQTrainingConfig(**{k: v for k, v in settings.items() if k in TRAINING_KEYS and k not in _LOSS_WEIGHTS})


#: DigitsDEQ's training defaults (``DigitsDEQ.default_training``); λ_skip = 1.0 for Skip variants is
#: filled in by the model.
DIGITS_TRAINING = DEQTrainingConfig(lr=3e-3, weight_decay=1e-5)
#: The paper's MNIST-dense protocol (``MNISTDenseDEQ.default_training``), read from
#: ``paper_settings("mnist", "dense")``: the paper's stated protocol, Adam at a constant lr 1e-3, betas
#: (0.9, 0.999), no weight decay. λ_skip (0.01 for Skip variants) and λ_jac (1.0 with Jacobian
#: regularization) are filled in by the model unless set. The January-2022 code's AdamW + cosine and
#: λ_skip = 5 are ``paper_settings("mnist", "dense", protocol="v1")``.
MNIST_TRAINING = _paper_training("mnist", "dense")

#: The pre-object solver keywords, deprecated aliases (see `DenseDEQClassifier.__init__`): each warns
#: ``DeprecationWarning`` naming its spelling in the object form.
_LEGACY_SOLVER_KEYS = ("termination_mode", "abstol", "reltol", "max_steps")
_LEGACY_BACKWARD_KEYS = ("backward_solver", "backward_tol", "backward_max_steps")
_LEGACY_NEW = {
    "termination_mode": "solver=build_solver(name, mode=...)",
    "abstol": "solver=build_solver(name, abstol_termination=...)",
    "reltol": "solver=build_solver(name, reltol_termination=...)",
    "max_steps": "solver=build_solver(name, max_steps=...)",
    "backward_solver": "backward=build_backward(name)",
    "backward_tol": "backward=build_backward(name, tol=...)",
    "backward_max_steps": "backward=build_backward(name, max_steps=...)",
}


@runtime_checkable
class ExplicitPredictor(Protocol):
    """A network that can also predict from its initial guess alone (the Skip models' explicit prediction).

    [`DEQClassifier`][deqlab.zoo.DEQClassifier] logs explicit accuracy and time for a network that has this member and
    none for one that does not; the networks of `deqlab.models` all have it (returning ``None`` where u0
    carries no information). A structural type: nothing needs to inherit from it.

    Members:
        explicit_forward(x): the logits of ``head(u0)`` (no solve), or ``None`` when the model has no
            informative u0 (vanilla, neural ODE).

    Raises:
        TypeError: when instantiated: a protocol describes networks, it is not one.

    Examples:
        >>> from deqlab.models import build_model
        >>> from deqlab.zoo import ExplicitPredictor
        >>> isinstance(build_model("mnist", "dense", width=8), ExplicitPredictor)
        True
        >>> import torch
        >>> isinstance(torch.nn.Linear(2, 2), ExplicitPredictor)
        False
    """

    def explicit_forward(self, x: Tensor) -> Optional[Tensor]:
        """The u0-only prediction for ``x``, or ``None``."""
        ...


class DEQClassifier(DEQLightningModule):
    """Any network that follows the paper-model contract, trained as a classifier.

    ``network(x)`` must return ``(logits, solution)`` (``solution``: a ``DeepEquilibriumSolution``, a list
    of them, or ``None``). A network that is also an [`ExplicitPredictor`][deqlab.zoo.ExplicitPredictor] (an
    ``explicit_forward(x)`` returning the u0-only logits of Skip models, or ``None``) gets its explicit
    accuracy logged. The networks of `deqlab.models` follow both.

    Args:
        network: the model (stem → DEQ layer(s) → head). Not recorded in ``hparams`` (its weights are in the
            state dict): rebuild it for ``DEQClassifier.load_from_checkpoint(path, network=...)``.
        **kwargs: training settings, passed to [`DEQLightningModule`][deqlab.lightning.DEQLightningModule]
            ([`DEQTrainingConfig`][deqlab.spec.DEQTrainingConfig] fields, flat, or ``training=``;
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
        if not isinstance(self.network, ExplicitPredictor):
            return None  # a network without a u0-only prediction
        return self.network.explicit_forward(x)


def dense_deq_layer(
    model_type: ModelType,
    width: int,
    solver: Any,
    *,
    jacobian_regularization: bool = False,
    backward: Any = None,
) -> nn.Module:
    """The DEQ layer over ``f(z, x) = relu(W1 z) + relu(W2 x)`` for ``model_type``; the Skip predictor is
    ``Dense(width→width, relu)`` as in the paper's MNIST model (built by ``deqlab.models.mnist.dense_deq``,
    the layer of `deqlab.models`' dense network).

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
    return dense_deq(model_type, width, solver, backward=backward, jacobian_regularization=jacobian_regularization)


def _resolve_solver_and_backward(
    solver: Union[Solver, str, None],
    backward: Union[BackwardMode, str, None],
    legacy: Dict[str, Any],
    default_max_steps: int,
    owner: str,
) -> Tuple[Solver, BackwardMode]:
    """Solver and backward objects from what the caller gave: objects are used as they are; a name or
    ``None`` builds the zoo default ([`build_solver`][deqlab.zoo.build_solver],
    [`build_backward`][deqlab.zoo.build_backward]). The old flat keywords (``abstol``, ``max_steps``,
    ``backward_tol``, ...) are aliases for the name form only."""
    solver_kw = {k: legacy[k] for k in _LEGACY_SOLVER_KEYS if k in legacy}
    backward_kw = {k: legacy[k] for k in _LEGACY_BACKWARD_KEYS if k in legacy}
    for key in (*solver_kw, *backward_kw):
        warn_renamed(owner, f"{key}=", _LEGACY_NEW[key], stacklevel=5, why="pass the solver or backward object")
    if solver_kw and not (solver is None or isinstance(solver, str)):
        raise ValueError(
            f"{owner}: pass {', '.join(solver_kw)} only with a solver name, not with a solver object "
            f"(set them on the object: {solver!r})"
        )
    if backward_kw and not (backward is None or isinstance(backward, str)):
        raise ValueError(f"{owner}: pass {', '.join(backward_kw)} only without a backward object")
    if backward_kw.get("backward_solver") is not None and backward is not None:
        raise ValueError(f"{owner}: pass backward or backward_solver, not both")
    if solver is None or isinstance(solver, str):
        solver = build_solver(
            solver or "lbroyden",  # type: ignore[arg-type]
            mode=solver_kw.get("termination_mode", "rel_deq_default"),
            abstol_termination=solver_kw.get("abstol"),  # the old keywords named the termination tolerances
            reltol_termination=solver_kw.get("reltol"),
            max_steps=solver_kw.get("max_steps", default_max_steps),
        )
    if backward is None or isinstance(backward, str):
        backward = build_backward(
            backward or backward_kw.get("backward_solver", "gmres"),  # type: ignore[arg-type]
            tol=backward_kw.get("backward_tol"),
            max_steps=backward_kw.get("backward_max_steps"),
        )
    return solver, backward


class DenseDEQClassifier(DEQLightningModule):
    """``flatten → Linear(in→width) + relu → dense DEQ → Linear(width→classes)``: the MNIST-dense shape.

    The network is ``deqlab.models.mnist.dense_network``'s (its ``stem``, ``deq`` and ``head`` are this
    module's), so this class and [`deqlab.models.build_model`][deqlab.models.build_model]``("mnist", "dense")`` are one model.

    Class attributes:
        default_training: the training settings this class starts from (a partial ``training`` changes
            only what it names). Here [`DEQTrainingConfig`][deqlab.spec.DEQTrainingConfig]'s defaults.
        default_max_steps: iteration budget of a solver built from a name. Here 50, the paper's.
        skip_loss_default: λ_skip of the Skip variants when ``skip_loss_weight`` is unset (vanilla: 0,
            as u0 = 0 has nothing to learn); ``None`` leaves it unset (counts as 0). Here ``None``.
        jacobian_loss_default: λ_jac with ``jacobian_regularization=True`` when ``jacobian_loss_weight``
            is unset (without it: 0); ``None`` leaves it unset. Here ``None``.

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
        training: the training settings: a mapping of some fields (a config file's ``training:`` block)
            applied over ``default_training``, a complete [`DEQTrainingConfig`][deqlab.spec.DEQTrainingConfig] used as given, or
            ``None`` (default): ``default_training``.
        **kwargs: flat training settings applied on top of ``training`` (``lr=...``, see
            [`DEQLightningModule`][deqlab.lightning.DEQLightningModule]). The old solver keywords ``termination_mode``, ``abstol``,
            ``reltol`` (the termination tolerances), ``max_steps``, ``backward_solver``, ``backward_tol``,
            ``backward_max_steps`` still work with a solver *name*, warning ``DeprecationWarning``.

    Raises:
        ValueError: when ``model_type`` is unknown, or an old solver keyword comes with a solver (or
            backward) object instead of a name.
        TypeError: when a keyword is neither a training setting nor an old solver keyword.

    Examples:
        >>> import torch
        >>> from deqlab.zoo import DenseDEQClassifier, build_solver
        >>> model = DenseDEQClassifier(in_features=10, width=8, model_type="skip_reg", num_classes=3)
        >>> logits, solution = model(torch.randn(2, 10))
        >>> logits.shape
        torch.Size([2, 3])
        >>> DenseDEQClassifier(in_features=10, width=8, solver=build_solver("fixed_point", max_steps=10)).deq.solver
        DiscreteDEQSolver(FixedPointIteration(...), ..., max_steps=10)
    """

    default_max_steps: ClassVar[int] = MNIST_DENSE.max_steps
    skip_loss_default: ClassVar[Optional[float]] = None
    jacobian_loss_default: ClassVar[Optional[float]] = None

    def __init__(
        self,
        in_features: int = 784,
        width: int = 128,
        model_type: ModelType = "skip",
        solver: Union[Solver, SolverName, None] = None,
        backward: Union[BackwardMode, BackwardName, None] = None,
        jacobian_regularization: bool = False,
        training: TrainingArg = None,
        **kwargs: Any,
    ) -> None:
        legacy = {k: kwargs.pop(k) for k in (*_LEGACY_SOLVER_KEYS, *_LEGACY_BACKWARD_KEYS) if k in kwargs}
        super().__init__(training=training, **kwargs)  # the base records this model's constructor arguments
        self.deq_config = self.deq_config.with_default_weights(
            **self._loss_weight_defaults(model_type, jacobian_regularization)
        )
        self.in_features = in_features
        self.kind = model_kind(model_type, deq_only=True)
        solver_obj, backward_obj = _resolve_solver_and_backward(
            solver, backward, legacy, self.default_max_steps, type(self).__name__
        )
        network = dense_network(
            self.kind,
            solver_obj,
            backward=backward_obj,
            jacobian_regularization=jacobian_regularization,
            num_classes=self.deq_config.num_classes or 10,
            width=width,
            in_features=in_features,
        )
        # the network's parts are this module's own (state-dict keys stem.*, deq.*, head.*)
        self.stem, self.deq, self.head = network.stem, network.deq, network.head

    @property
    def model_type(self) -> str:
        """The model type's name (``self.kind.name``)."""
        return self.kind.name

    def _loss_weight_defaults(self, model_type: str, jacobian_regularization: bool) -> Dict[str, float]:
        fill: Dict[str, float] = {}
        if self.skip_loss_default is not None:
            fill["skip_loss_weight"] = self.skip_loss_default if model_kind(model_type).learns_guess else 0.0
        if self.jacobian_loss_default is not None:
            fill["jacobian_loss_weight"] = self.jacobian_loss_default if jacobian_regularization else 0.0
        return fill

    def _checked(self, x: Tensor) -> Tensor:
        if x[0].numel() != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects inputs with {self.in_features} features per sample, got shape "
                f"{tuple(x.shape)}; set in_features or use a matching data module"
            )
        return x

    # The network's own forward (deqlab.models.PaperNetwork's, over this module's stem / deq / head / kind):
    # one implementation of "stem, DEQ, head" and of the explicit prediction, whichever door a user took.
    def forward(self, x: Tensor) -> Tuple[Tensor, Any]:
        return PaperNetwork.forward(self, self._checked(x))  # type: ignore[arg-type]

    def explicit_forward(self, x: Tensor) -> Optional[Tensor]:
        return PaperNetwork.explicit_forward(self, self._checked(x))  # type: ignore[arg-type]


class MNISTDenseDEQ(DenseDEQClassifier):
    """The paper's MNIST dense model with its training protocol as defaults.

    Dense(784→128, relu) → DEQ with f(z, x) = relu(W1 z) + relu(W2 x) (no biases) → Dense(128→10); skip
    predictor Dense(128→128, relu) (the network of ``deqlab.models.mnist.mnist_dense``); limited-memory
    Broyden, 5e-3 termination tolerances, 50 steps; GMRES adjoint within 15 VJPs. ``default_training`` is
    [`MNIST_TRAINING`][deqlab.zoo.MNIST_TRAINING] (the paper's stated protocol: Adam at a constant lr 1e-3, no weight decay,
    from [`deqlab.models.paper_settings`][deqlab.models.paper_settings]); λ_skip = 0.01 for Skip variants (0 for vanilla)
    and λ_jac = 1.0 with ``jacobian_regularization`` (0 without), the paper's, unless
    ``skip_loss_weight`` / ``jacobian_loss_weight`` are set. ``in_features`` and ``width`` are fixed (784,
    128): they are the paper's model.

    Args:
        model_type: ``vanilla``, ``skip`` or ``skip_reg``. Default ``skip``, the paper's proposed model.
        solver: a solver object or name, as in [`DenseDEQClassifier`][deqlab.zoo.DenseDEQClassifier]. Default ``None``: limited-memory
            Broyden with the paper's 5e-3 tolerances and 50 steps.
        backward: a backward mode or adjoint-solver name, as in [`DenseDEQClassifier`][deqlab.zoo.DenseDEQClassifier]. Default
            ``None``: the paper's GMRES adjoint within 15 VJPs.
        jacobian_regularization: compute the Hutchinson Jacobian term. Default ``False``, the paper's
            "Skip DEQ" rows; ``True`` gives the "+ Jac. Reg." rows (and λ_jac = 1.0).
        **kwargs: passed to [`DenseDEQClassifier`][deqlab.zoo.DenseDEQClassifier]: ``training`` (a partial block over
            [`MNIST_TRAINING`][deqlab.zoo.MNIST_TRAINING]), flat training settings (``lr=...``) and the old solver keywords.

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
        >>> MNISTDenseDEQ(training={"weight_decay": 1e-4}).deq_config.optimizer  # a partial block keeps the rest
        'adam'
    """

    default_training: ClassVar[DEQTrainingConfig] = MNIST_TRAINING
    skip_loss_default: ClassVar[Optional[float]] = paper_settings("mnist", "dense", "skip")["skip_loss_weight"]
    jacobian_loss_default: ClassVar[Optional[float]] = paper_settings("mnist", "dense", jacobian_regularization=True)[
        "jacobian_loss_weight"
    ]

    def __init__(
        self,
        model_type: ModelType = "skip",
        solver: Union[Solver, SolverName, None] = None,
        backward: Union[BackwardMode, BackwardName, None] = None,
        jacobian_regularization: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            in_features=784,
            width=128,
            model_type=model_type,
            solver=solver,
            backward=backward,
            jacobian_regularization=jacobian_regularization,
            **kwargs,
        )


class DigitsDEQ(DenseDEQClassifier):
    """A small dense DEQ for scikit-learn's 8×8 digits (the demo and test model): trains in seconds on a CPU.

    ``flatten → Linear(64→width) + relu → dense DEQ → Linear(width→10)``; accepts ``(B, 1, 8, 8)`` or
    ``(B, 64)`` inputs. Solver by name: 30 steps. ``default_training`` is [`DIGITS_TRAINING`][deqlab.zoo.DIGITS_TRAINING] (lr
    3e-3, weight decay 1e-5, tuned for the small dataset), with λ_skip = 1.0 for Skip variants unless
    ``skip_loss_weight`` is set. Arguments as [`DenseDEQClassifier`][deqlab.zoo.DenseDEQClassifier], with ``in_features`` fixed
    to 64.

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
        **kwargs: passed to [`DenseDEQClassifier`][deqlab.zoo.DenseDEQClassifier]: ``training`` (a partial block over
            [`DIGITS_TRAINING`][deqlab.zoo.DIGITS_TRAINING]), flat training settings (``lr=...``) and the old solver keywords.

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
        >>> DigitsDEQ(width=16, training={"lr": 0.01}).deq_config.weight_decay  # a partial block keeps the rest
        1e-05

        Train it with ``pl.Trainer(max_epochs=5).fit(model, deqlab.data.DigitsDataModule())``.
    """

    default_training: ClassVar[DEQTrainingConfig] = DIGITS_TRAINING
    default_max_steps: ClassVar[int] = 30
    skip_loss_default: ClassVar[Optional[float]] = 1.0

    def __init__(
        self,
        model_type: ModelType = "skip",
        width: int = 64,
        solver: Union[Solver, SolverName, None] = None,
        backward: Union[BackwardMode, BackwardName, None] = None,
        jacobian_regularization: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            in_features=64,
            width=width,
            model_type=model_type,
            solver=solver,
            backward=backward,
            jacobian_regularization=jacobian_regularization,
            **kwargs,
        )
