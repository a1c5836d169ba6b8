"""``DEQTrainingConfig``: the one definition of the training settings of [`DEQLightningModule`][deqlab.lightning.DEQLightningModule].

Part of the typed experiment spec (`deqlab.spec`), below the Lightning layer: the Lightning-free paper
models (`deqlab.models.paper_settings`) and paper_repro name these fields without importing Lightning.

Why a dataclass: the fields, their types, their defaults and their documentation are written once, here.
``DEQLightningModule(training=DEQTrainingConfig(lr=3e-3))`` takes it as a complete typed object; a
mapping of *some* fields (``training={"lr": 3e-3}``, or a LightningCLI config's nested ``training:``
block, type-checked key by key through ``DEQTrainingSettings``) and the flat keywords
``DEQLightningModule(lr=3e-3)`` are applied over the model's own defaults (``default_training``) and
checked against the same fields (`DEQTrainingConfig.build`), so an unknown or misspelt name raises
instead of being ignored.

Lightning-free: this module imports only the standard library.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Mapping, Optional, Tuple, Union

from typing_extensions import TypedDict

__all__ = [
    "DEQTrainingConfig",
    "DEQTrainingSettings",
    "NonFinitePolicy",
    "OptimizerName",
    "SchedulerName",
    "TrainingArg",
]

NonFinitePolicy = Literal["skip", "raise"]
#: the optimizers and learning-rate schedules `deqlab.lightning` builds from these names
OptimizerName = Literal["adam", "adamw", "sgd"]
SchedulerName = Literal["cosine", "step", "none"]


@dataclass(frozen=True)
class DEQTrainingConfig:
    """Optimisation, loss weights, pretraining, non-finite policy and logging of a DEQ training run.

    Frozen, so one config can be shared by several models and stored in a checkpoint without being changed
    behind their back; derive a variant with `build` (or ``dataclasses.replace``). Numbers are
    normalised on construction (floats for rates and weights, tuples for ``betas`` / ``step_milestones``).
    The defaults are the paper's v1 protocol where it has one; a model class starts from its own
    ``default_training`` (the zoo's ``MNISTDenseDEQ.default_training`` is ``deqlab.zoo.MNIST_TRAINING``,
    ``DigitsDEQ.default_training`` is ``deqlab.zoo.DIGITS_TRAINING``), and a partial ``training``
    mapping changes only the fields it names.

    Attributes:
        num_classes: classes of the task; enables top-1 accuracy (and top-5 when > 10). ``None`` for
            non-classification tasks (then override ``task_loss``). Default 10: MNIST, SVHN, CIFAR-10 and
            the digits all have ten.
        optimizer: ``adam``, ``adamw`` or ``sgd``. Default ``adamw``, the paper's v1 optimizer.
        lr: initial learning rate. Default 1e-3, the paper's Adam(W) rate.
        weight_decay: decoupled for AdamW, L2 for Adam/SGD. Default 0.0: no regularisation unless asked
            for (the paper's MNIST value, 2.5e-6, is in the zoo's ``MNIST_TRAINING``).
        momentum: SGD momentum (ignored by Adam/AdamW). Default 0.9, the usual SGD value (ImageNet's).
        nesterov: SGD Nesterov momentum. Default ``False``: plain momentum; the ImageNet protocol sets it.
        betas: Adam/AdamW betas. Default ``(0.9, 0.999)``, Adam's standard values, as in the paper.
        scheduler: ``cosine`` (to ``eta_min`` over ``scheduler_steps``), ``step`` (× ``step_gamma`` at
            ``step_milestones``) or ``none``; stepped every optimizer step. Default ``cosine``, the
            paper's schedule everywhere but ImageNet.
        scheduler_steps: cosine period in optimizer steps; ``None`` (default): the Trainer's estimated
            total steps, so the rate reaches ``eta_min`` exactly when training ends.
        eta_min: final learning rate of the cosine schedule. Default 1e-6, the paper's v1 value.
        step_milestones: optimizer steps at which the ``step`` schedule decays. Default ``()``: no decay.
        step_gamma: decay factor of the ``step`` schedule. Default 0.1, the usual tenfold decay (ImageNet's).
        skip_loss_weight: λ_skip, weight of ``mean|u0 - z*|`` (Skip / Skip Reg. models). ``None``
            (default): the model's default (0 for the base class; the zoo models set the paper's values).
        jacobian_loss_weight: λ_jac, weight of the Hutchinson Jacobian estimate. ``None`` (default): the
            model's default (0 for the base class). A value > 0 needs a DEQ layer built with
            ``jacobian_regularization=True``; ``fit`` raises otherwise (the term would silently be 0).
        extra_loss_weights: weights of the terms returned by `DEQLightningModule.extra_losses`, by
            name; a term without an entry has weight 1.0, an entry without a term raises. Default ``{}``:
            every extra term counts fully.
        pretrain_steps: for global steps ``< pretrain_steps`` every DEQ layer runs ``pretrain_depth``
            unrolled steps instead of the solver (validation and test always use the solver). Default 0:
            no pretraining, as in the paper's v1 experiments (the v2+ CIFAR-10 small config uses 3000).
        pretrain_depth: unrolled depth during pretraining. Default 5, the paper's value.
        on_nonfinite: what a training batch with a non-finite loss or gradient, or a solve that ended
            ``nonfinite``, does: ``skip`` (default) leaves the weights untouched, counts the batch
            (``train/skipped_batches``), warns once and training continues (one bad batch should not end
            a long run); ``raise`` stops at once.
        log_solver_stats: log NFE, residuals, convergence and solver status counts under ``solver/``.
            Default ``True``: they are what a DEQ run is judged by, and cost no extra forward.
        log_timing: log forward/backward/optimizer wall time under ``time/``. Default ``True``: the
            phases are timed for the step record anyway, so logging them costs nothing extra.
        log_figures: add the NFE-histogram and convergence-figure callbacks (``configure_callbacks``).
            Default ``True``; the figure costs one forward per validation epoch.
        log_hparams_metrics: write hyperparameters with ``hp/`` metrics to TensorBoard's HParams tab.
            Default ``True``, so runs can be compared side by side.

    Raises:
        ValueError: when ``lr`` < 0 (0 is allowed, as torch's optimizers allow it: the weights stay
            fixed), ``weight_decay`` or ``eta_min`` < 0, ``momentum`` or a beta outside [0, 1),
            ``step_gamma`` not > 0, ``scheduler_steps`` < 1, an unknown ``optimizer`` or ``scheduler``,
            ``pretrain_steps`` < 0 or ``pretrain_depth`` < 1, ``num_classes`` < 2,
            ``on_nonfinite`` is not ``skip`` or ``raise``, a loss weight is negative or not finite, or an
            ``extra_loss_weights`` entry is not finite.

    Examples:
        >>> from deqlab.spec import DEQTrainingConfig
        >>> cfg = DEQTrainingConfig(lr=3e-3, scheduler="none")
        >>> cfg.lr, cfg.optimizer, cfg.weight("skip_loss_weight")
        (0.003, 'adamw', 0.0)
        >>> DEQTrainingConfig.build(cfg, weight_decay=1e-4).weight_decay
        0.0001
        >>> DEQTrainingConfig.build(cfg, learning_rate=1e-3)
        Traceback (most recent call last):
        ...
        TypeError: unknown training setting(s) 'learning_rate'; valid names: ...
    """

    num_classes: Optional[int] = 10
    optimizer: OptimizerName = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    betas: Tuple[float, float] = (0.9, 0.999)
    scheduler: SchedulerName = "cosine"
    scheduler_steps: Optional[int] = None
    eta_min: float = 1e-6
    step_milestones: Tuple[int, ...] = ()
    step_gamma: float = 0.1
    skip_loss_weight: Optional[float] = None
    jacobian_loss_weight: Optional[float] = None
    extra_loss_weights: Dict[str, float] = field(default_factory=dict)
    pretrain_steps: int = 0
    pretrain_depth: int = 5
    on_nonfinite: NonFinitePolicy = "skip"
    log_solver_stats: bool = True
    log_timing: bool = True
    log_figures: bool = True
    log_hparams_metrics: bool = True

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.pretrain_steps < 0 or self.pretrain_depth < 1:
            raise ValueError(
                f"pretrain_steps must be >= 0 and pretrain_depth >= 1, got {self.pretrain_steps} and {self.pretrain_depth}"
            )
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (or None for non-classification tasks), got {self.num_classes}")
        if self.on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {self.on_nonfinite!r}")
        for name in ("lr", "weight_decay", "momentum", "eta_min", "step_gamma"):
            put(name, float(getattr(self, name)))
        # optimizer and schedule values are checked here, when the model is built (before any data is set
        # up), not by torch when the optimizer is made at the start of fit
        checks = (
            ("lr", self.lr >= 0, "a finite number >= 0"),
            ("weight_decay", self.weight_decay >= 0, "a finite number >= 0"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("eta_min", self.eta_min >= 0, "a finite number >= 0"),
            ("step_gamma", self.step_gamma > 0, "a finite number > 0"),
        )
        for name, ok, what in checks:
            if not (ok and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)}")
        if len(self.betas) != 2 or not all(0 <= float(b) < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.scheduler_steps is not None and (
            isinstance(self.scheduler_steps, bool) or int(self.scheduler_steps) < 1
        ):
            raise ValueError(
                f"scheduler_steps must be an int >= 1 (or None: the Trainer's total), got {self.scheduler_steps}"
            )
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adam', 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.scheduler not in ("cosine", "step", "none"):
            raise ValueError(f"scheduler must be 'cosine', 'step' or 'none', got {self.scheduler!r}")
        for name in ("skip_loss_weight", "jacobian_loss_weight"):
            value = getattr(self, name)
            if value is not None:
                value = float(value)
                if not math.isfinite(value) or value < 0:
                    raise ValueError(f"{name} must be a finite number >= 0, got {value}")
                put(name, value)
        weights = {str(k): float(v) for k, v in dict(self.extra_loss_weights).items()}
        bad = [k for k, v in weights.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"extra_loss_weights must be finite, got {', '.join(f'{k}={weights[k]}' for k in bad)}")
        put("extra_loss_weights", weights)
        put("betas", (float(self.betas[0]), float(self.betas[1])))
        put("step_milestones", tuple(int(m) for m in self.step_milestones))
        put("pretrain_steps", int(self.pretrain_steps))
        put("pretrain_depth", int(self.pretrain_depth))

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def build(
        cls, base: "TrainingArg" = None, *, defaults: Optional["DEQTrainingConfig"] = None, **overrides: Any
    ) -> "DEQTrainingConfig":
        """The effective settings: ``base`` over ``defaults``, then the flat keyword ``overrides``.

        A ``DEQTrainingConfig`` ``base`` is complete and used as given. A mapping ``base`` (a config
        file's ``training:`` block, a checkpoint's stored settings) names only the fields it changes:
        the others keep ``defaults``, so ``training: {lr: 0.01}`` on a zoo model keeps that model's
        weight decay. ``None`` means ``defaults``.

        Args:
            base: a complete config, a mapping of some field names, or ``None``. Default ``None``.
            defaults: what a mapping (or ``None``) is applied over. Default ``None``: the field defaults
                of this class. Keyword-only; [`DEQLightningModule`][deqlab.lightning.DEQLightningModule] passes its
                class's ``default_training``.
            **overrides: single fields applied last (``lr=3e-3``).

        Returns:
            The merged, validated config (``base`` itself when there is nothing to apply).

        Raises:
            TypeError: naming every key of ``base`` or ``overrides`` that is not a field (a misspelt
                setting must not be silently ignored), or when ``base`` is neither a
                ``DEQTrainingConfig``, a mapping nor ``None``.
            ValueError: when the merged settings are invalid (see the class).

        Examples:
            >>> from deqlab.spec import DEQTrainingConfig
            >>> mine = DEQTrainingConfig(lr=3e-3, weight_decay=1e-5)
            >>> DEQTrainingConfig.build({"lr": 0.01}, defaults=mine).weight_decay  # a mapping is partial
            1e-05
            >>> DEQTrainingConfig.build(DEQTrainingConfig(lr=0.01), defaults=mine).weight_decay  # an object is not
            0.0
        """
        if defaults is None:
            defaults = cls()
        if base is None:
            base = defaults
        elif isinstance(base, Mapping):
            cls._check_names(base, "training")
            base = dataclasses.replace(defaults, **dict(base))
        if not isinstance(base, cls):
            raise TypeError(
                f"training must be a {cls.__name__} or a mapping of its fields, got {type(base).__name__}: {base!r}"
            )
        cls._check_names(overrides, "training setting")
        return dataclasses.replace(base, **overrides) if overrides else base

    @classmethod
    def _check_names(cls, names: Mapping[str, Any], what: str) -> None:
        unknown = sorted(set(names) - set(cls.field_names()))
        if unknown:
            raise TypeError(
                f"unknown {what}(s) {', '.join(repr(u) for u in unknown)}; valid names: "
                f"{', '.join(cls.field_names())} (or model-specific constructor arguments)"
            )

    def as_dict(self) -> Dict[str, Any]:
        """Field name → value, plain data (lists for tuples), as checkpoints store it."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        out["step_milestones"] = list(self.step_milestones)
        return out

    def with_default_weights(self, **defaults: float) -> "DEQTrainingConfig":
        """Fill loss weights that are still ``None`` (``skip_loss_weight``, ``jacobian_loss_weight``) with
        a model's defaults; weights already set are kept. Models call this after ``super().__init__``."""
        unknown = sorted(set(defaults) - {"skip_loss_weight", "jacobian_loss_weight"})
        if unknown:
            raise TypeError(f"with_default_weights: not a loss weight: {', '.join(unknown)}")
        fill: Dict[str, Any] = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **fill) if fill else self

    def weight(self, name: Literal["skip_loss_weight", "jacobian_loss_weight"]) -> float:
        """The effective weight: ``None`` (no model default given) counts as 0."""
        value = getattr(self, name)
        return 0.0 if value is None else float(value)

    def as_flat_dict(self) -> Dict[str, Any]:
        """Field name → value with effective loss weights (what the HParams tab shows)."""
        out = dataclasses.asdict(self)
        out["skip_loss_weight"] = self.weight("skip_loss_weight")
        out["jacobian_loss_weight"] = self.weight("jacobian_loss_weight")
        for name, w in out.pop("extra_loss_weights").items():
            out[f"extra_loss_weight/{name}"] = w
        return out


def _settings_type() -> Any:
    hints = typing.get_type_hints(DEQTrainingConfig)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(DEQTrainingConfig)}
    return TypedDict("DEQTrainingSettings", fields, total=False)  # type: ignore[operator]


#: Some fields of [`DEQTrainingConfig`][deqlab.spec.DEQTrainingConfig], by name, each optional and typed as the field
#: (generated from the dataclass, so the names and types are written once). It is the type of a partial
#: ``training`` block: LightningCLI checks every key and value of ``training: {lr: 0.01}`` against it
#: and passes the block on as a mapping, which the model applies over its ``default_training``.
DEQTrainingSettings = _settings_type()
DEQTrainingSettings.__module__ = __name__
DEQTrainingSettings.__doc__ = (
    "Some DEQTrainingConfig fields by name, each optional and typed as the field: a partial training block "
    "(``{'lr': 0.01}``) that a model applies over its ``default_training``."
)

# (DEQTrainingSettings is built at import time, so a type checker cannot see it: to mypy it is Any below)

#: What a ``training=`` argument accepts: a partial mapping (tried first, so a config block stays
#: partial), a complete [`DEQTrainingConfig`][deqlab.spec.DEQTrainingConfig], or ``None`` (the model's defaults).
TrainingArg = Union[DEQTrainingSettings, DEQTrainingConfig, None]  # type: ignore[valid-type]
