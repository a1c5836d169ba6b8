"""``DEQLightningModule``: the training step every deqlab model shares.

A subclass builds its network in ``__init__`` and implements ``forward(x) -> (output, solution)``; this
base class composes the loss (task + λ_skip·skip + λ_jac·Jacobian + the subclass's own terms), builds
optimizer and schedule from typed hyperparameters, and logs what a DEQ researcher needs from each step:
loss parts, accuracy, forward NFE, residuals, convergence, forward wall time, and explicit (u0-only)
accuracy for Skip models.

Everything that acts *around* the step is a Lightning callback the module attaches from
``configure_callbacks`` (`deqlab.lightning.policies`), so that no override of a module hook can switch it
off: the pretraining schedule, the non-finite guard, the backward's statistics, phase timing, the HParams
tab, checkpoint integrity, exact resume and the figures. The step talks to them through one attribute,
``pending_step`` (`deqlab.lightning._pending.PendingStep`).

Scalar names are grouped for TensorBoard: ``train/``, ``val/``, ``test/`` (loss, accuracy),
``solver/`` (NFE, residuals, convergence), ``time/`` (wall time), ``hp/`` (HParams-tab metrics).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple, cast

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from deqlab.lightning._optim import build_optimizer, build_scheduler
from deqlab.lightning._pending import PendingStep
from deqlab.lightning._stats import StepRecord, split_forward_output, summarize
from deqlab.lightning.checkpoint import check_checkpoint_file, damage_reported_by_name
from deqlab.lightning.hparams import init_arguments, records_init_arguments, save_init_arguments
from deqlab.lightning.layers import find_deq_layers
from deqlab.lightning.losses import RESERVED_LOSS_NAMES, checked_extra_terms, correction_task_loss
from deqlab.lightning.nonfinite import NonFiniteGuard
from deqlab.lightning.policies import deqlab_callbacks, missing_callbacks, warn_if_detached
from deqlab.lightning.solver_stats import log_solver_summary
from deqlab.lightning.timing import PhaseTimer
from deqlab.nn import DeepEquilibriumSolution, DEQLayer
from deqlab.spec.training import DEQTrainingConfig, TrainingArg

__all__ = ["DEQLightningModule", "RESERVED_LOSS_NAMES", "find_deq_layers"]

_STAGES: Tuple[str, ...] = ("train", "val", "test")

#: names that moved out of this module (each warns ``DeprecationWarning`` naming its new home)
_MOVED = {
    "CHECKPOINT_KEY": ("deqlab.lightning.resume", "CHECKPOINT_KEY"),
    "HPARAM_METRICS": ("deqlab.lightning.hparams", "HPARAM_METRICS"),
    "NonFiniteBatchError": ("deqlab.lightning.nonfinite", "NonFiniteBatchError"),
    "NonFiniteBatchWarning": ("deqlab.lightning.nonfinite", "NonFiniteBatchWarning"),
}


def __getattr__(name: str) -> Any:
    from deqlab._compat import moved_attribute

    return moved_attribute(__name__, name, _MOVED)


class DEQLightningModule(pl.LightningModule):
    """Base class for DEQ models trained with Lightning.

    Subclass contract:

    * build the network in ``__init__`` (typed arguments, forward the rest with ``**kwargs`` to
      ``super().__init__``; the base records the most-derived constructor's arguments as ``hparams``);
    * implement ``forward(x) -> (output, solution)`` where ``solution`` is the DEQ layer's
      ``DeepEquilibriumSolution`` (or a list of them, or ``None`` for a model without a DEQ);
    * optionally implement ``explicit_forward(x) -> output`` (the u0-only prediction of Skip models),
      ``task_loss(output, target)`` (cross-entropy by default) and ``extra_losses(...)`` (own loss terms);
    * with a DEQ layer that samples states (``sample_states`` / ``sample_at``), implement
      ``state_output(state) -> output`` (e.g. ``self.head(state)``): the task term is then the fixed-point
      correction loss over the states' outputs, weighted by the class attributes ``correction_weight``
      (``"exp"``) and ``correction_gamma`` (0.8), and each state's loss is logged as ``{stage}/state_loss_{i}``.

    Lightning hooks may be overridden freely, with or without ``super()``: the policies around the step are
    callbacks (`deqlab.lightning.policies.deqlab_callbacks`). A ``configure_callbacks`` override returns
    ``[*super().configure_callbacks(), ...]``; without them the first training step warns `PolicyWarning`.

    Class attributes:
        default_training: the settings this class starts from (a [`DEQTrainingConfig`][deqlab.spec.DEQTrainingConfig]; here all
            its field defaults). A subclass sets its own once (the zoo's ``DigitsDEQ.default_training``);
            a partial ``training`` and the flat keywords are applied over it.

    Args:
        training: the training settings (see [`DEQTrainingConfig`][deqlab.spec.DEQTrainingConfig] for every field, its
            default and its meaning): a mapping of *some* fields (``{"lr": 0.01}``, or a config file's
            ``training:`` block) changes only those over ``default_training``; a complete
            ``DEQTrainingConfig`` is used as given; ``None`` (default): ``default_training``. Keyword-only,
            so a subclass's own positional arguments never collide with it.
        **overrides: the same settings as flat keywords (``lr=3e-3, scheduler="none"``), applied on top of
            ``training`` (so one field can be changed without restating the rest). A name that is not a
            field of [`DEQTrainingConfig`][deqlab.spec.DEQTrainingConfig] raises ``TypeError``.

    Raises:
        TypeError: when an ``overrides`` name is not a [`DEQTrainingConfig`][deqlab.spec.DEQTrainingConfig] field (a misspelt
            setting must not be silently ignored), or ``training`` is neither a config nor a mapping.
        ValueError: when the resulting settings are invalid (see [`DEQTrainingConfig`][deqlab.spec.DEQTrainingConfig]).

    Examples:
        A subclass builds its network and returns ``(output, solution)``; the base does the rest:

        >>> import torch
        >>> from torch import nn
        >>> from deqlab import DeepEquilibriumNetwork, DiscreteDEQSolver
        >>> from deqlab.nn import DenseDEQBlock
        >>> from deqlab.lightning import DEQLightningModule
        >>> class TinyDEQ(DEQLightningModule):
        ...     def __init__(self, width: int = 8, **kwargs):
        ...         super().__init__(**kwargs)
        ...         self.stem = nn.Linear(64, width)
        ...         self.deq = DeepEquilibriumNetwork(DenseDEQBlock(width), DiscreteDEQSolver("anderson"))
        ...         self.head = nn.Linear(width, 10)
        ...     def forward(self, x):
        ...         z, solution = self.deq(self.stem(x))
        ...         return self.head(z), solution
        >>> model = TinyDEQ(lr=3e-3, scheduler="none")
        >>> dict(model.hparams), model.deq_config.lr
        ({'width': 8, 'lr': 0.003, 'scheduler': 'none'}, 0.003)
        >>> logits, solution = model(torch.randn(4, 64))
        >>> logits.shape
        torch.Size([4, 10])

        ``pl.Trainer(max_epochs=1).fit(model, datamodule)`` then trains it with the logging described above.
    """

    default_training: ClassVar[DEQTrainingConfig] = DEQTrainingConfig()
    #: weights of the fixed-point correction loss (see deqlab.nn.fixed_point_correction_loss)
    correction_weight: ClassVar[str] = "exp"
    correction_gamma: ClassVar[float] = 0.8

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # each subclass's own __init__ lets its outermost call record its arguments (deqlab.lightning.hparams)
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = records_init_arguments(cls.__dict__["__init__"])  # type: ignore[method-assign]

    def __init__(self, *, training: TrainingArg = None, **overrides: Any) -> None:
        super().__init__()
        arguments = init_arguments(self)  # None when this class itself is built
        save_init_arguments(self, arguments if arguments is not None else {"training": training, **overrides})
        self.deq_config = DEQTrainingConfig.build(training, defaults=self.default_training, **overrides)
        self.metrics = _accuracy_metrics(self.deq_config.num_classes)
        self._timer = PhaseTimer()  # the forward's; the other phases are PhaseTiming's
        #: the running training step, for the callbacks that act after its backward (NonFiniteGuard, BackwardStats)
        self.pending_step: Optional[PendingStep] = None
        self._checked_trainer: Optional[int] = None  # id of the Trainer whose callbacks and settings were checked

    def hparams_for_logging(self) -> Dict[str, Any]:
        """Constructor arguments plus the effective training settings (what the HParams tab shows)."""
        merged: Dict[str, Any] = {
            k: v for k, v in dict(self.hparams).items() if not str(k).startswith("_") and k != "training"
        }
        merged.update(self.deq_config.as_flat_dict())
        return merged

    # ------------------------------------------------------------------ subclass hooks
    def forward(self, x: Tensor) -> Tuple[Tensor, Any]:  # pragma: no cover - abstract
        raise NotImplementedError(
            f"{type(self).__name__} must implement forward(x) -> (output, solution), returning the DEQ layer's "
            "DeepEquilibriumSolution (or None) next to the output"
        )

    def explicit_forward(self, x: Tensor) -> Optional[Tensor]:
        """The prediction from u0 alone (no solve). Skip models override this; ``None`` means unsupported."""
        return None

    def task_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """The data term of the loss; cross-entropy by default. Must be a batch *mean* (DDP relies on it)."""
        return F.cross_entropy(output, target)

    def extra_losses(
        self, batch: Any, output: Tensor, solutions: List[DeepEquilibriumSolution], stage: str
    ) -> Mapping[str, Tensor]:
        """The researcher's own loss terms, by name; none by default.

        Called every training, validation and test step after the forward, with the batch as the loader
        gave it, the model output, the list of DEQ solution records of this step (empty for a model
        without a DEQ layer) and the stage (``"train"``, ``"val"``, ``"test"``). Each returned term must
        be a scalar tensor (a batch mean, so DDP gradients stay exact); it is added to the loss with the
        weight ``extra_loss_weights[name]`` of [`DEQTrainingConfig`][deqlab.spec.DEQTrainingConfig] (1.0 when absent) and logged
        unweighted as ``{stage}/{name}``. Names the module logs itself (``loss``, ``skip_loss``, ...,
        ``RESERVED_LOSS_NAMES``) are refused.
        """
        return {}

    def state_output(self, state: Any) -> Tensor:
        """The output decoded from one sampled state (the head applied to it), for the fixed-point correction
        loss of a layer built with ``sample_states`` / ``sample_at``. No default: the head is the model's."""
        raise NotImplementedError(
            f"{type(self).__name__}: a DEQ layer samples states (sample_states / sample_at), so "
            "the task loss is the fixed-point correction loss; implement state_output(state) "
            "-> output (e.g. return self.head(state))"
        )

    def unpack_batch(self, batch: Any) -> Tuple[Tensor, Tensor]:
        """``(inputs, targets)`` from a batch; override for dict batches."""
        if isinstance(batch, dict):
            return batch["x"], batch["y"]
        if isinstance(batch, (list, tuple)) and len(batch) >= 2:
            return batch[0], batch[1]
        raise TypeError(
            f"expected a batch (inputs, targets) or a dict with 'x' and 'y', got {type(batch).__name__}; "
            "override unpack_batch for other layouts"
        )

    # ------------------------------------------------------------------ DEQ layers
    def deq_layers(self) -> List[nn.Module]:
        """The DEQ layers of this model (see [`find_deq_layers`][deqlab.lightning.find_deq_layers])."""
        return find_deq_layers(self)

    def set_fixed_depth(self, depth: int) -> None:
        """Run every DEQ layer as ``depth`` unrolled steps (``0``: back to the solver)."""
        layers = self.deq_layers()
        if depth and not layers:
            raise RuntimeError(
                f"{type(self).__name__} has no DEQ layer (no submodule implementing deqlab.nn.DEQLayer: fixed_depth, "
                f"fixed_depth_mode and jacobian_regularization) to run {depth} unrolled steps; set pretrain_steps=0"
            )
        for layer in cast(List[DEQLayer], layers):  # what find_deq_layers finds
            layer.fixed_depth = int(depth)

    def is_pretraining(self, step: Optional[int] = None) -> bool:
        """Whether global step ``step`` (default: the current one) is in the pretraining phase."""
        step = self.global_step if step is None else step
        return step < self.deq_config.pretrain_steps

    # ------------------------------------------------------------------ the step
    def _forward_checked(self, x: Tensor) -> Tuple[Tensor, List[DeepEquilibriumSolution]]:
        """``self(x)`` with the contract checked: ``(output, solution)``, solution a record, list or None.
        Every caller of the forward (the steps, ``predict_step``, the figure callback) goes through here."""
        return split_forward_output(self(x), owner=type(self).__name__)

    def _shared_step(self, batch: Any, stage: str, batch_idx: int = 0) -> Dict[str, Any]:
        cfg = self.deq_config
        x, y = self.unpack_batch(batch)
        batch_size = int(x.shape[0]) if torch.is_tensor(x) else None
        guard = NonFiniteGuard.of(self._attached_trainer()) if stage == "train" else None
        x_used = guard.stand_in(x) if guard is not None else x  # a NaN input runs on a finite copy, then is dropped
        timer_key = "forward" if stage == "train" else f"{stage}_forward"
        self._timer.start(timer_key, self.device)
        output, solutions = self._forward_checked(x_used)
        forward_time = self._timer.stop(timer_key, self.device)
        summary = summarize(solutions, output)

        task, parts = correction_task_loss(
            type(self).__name__,
            self.task_loss,
            self.state_output,
            output,
            solutions,
            y,
            self.correction_weight,
            self.correction_gamma,
        )
        loss = (
            task
            + cfg.weight("skip_loss_weight") * summary.skip_loss
            + cfg.weight("jacobian_loss_weight") * summary.jacobian_loss
        )
        extras = checked_extra_terms(
            type(self).__name__, self.extra_losses(batch, output, solutions, stage), cfg.extra_loss_weights, stage
        )
        for value, weight in extras.values():
            loss = loss + weight * value
        unconverged = summary.unconverged_fraction
        record = StepRecord(
            stage,
            batch_idx,
            nfe=summary.nfe,
            forward_time=forward_time,
            abs_residual_mean=None if summary.abs_residual_mean is None else float(summary.abs_residual_mean),
            status_counts=summary.status_counts,
            unconverged_fraction=None if unconverged is None else float(unconverged),
        )

        log: Callable[..., None] = self.log
        step: Optional[PendingStep] = None
        if stage == "train":
            # training losses and accuracy wait until the guard judged the batch (a skipped one logs none of them)
            step = self.pending_step = PendingStep(
                record, solutions, stand_in=x_used is not x, awaits_verdict=guard is not None
            )
            log = partial(_log_when_trained, step, self.log)
        kw = self._log_kwargs(stage, batch_size)
        log(f"{stage}/loss", loss.detach(), prog_bar=True, **kw)
        log(f"{stage}/task_loss", task.detach(), **kw)
        log(f"{stage}/skip_loss", summary.skip_loss.detach(), **kw)
        log(f"{stage}/jacobian_loss", summary.jacobian_loss.detach(), **kw)
        for i, part in enumerate(parts or ()):
            log(f"{stage}/state_loss_{i}", part.detach(), **kw)
        for name, (value, _) in extras.items():
            log(f"{stage}/{name}", value.detach(), **kw)
        accuracy = partial(self._log_accuracy, output, y, stage, batch_size)  # updates the metric: held as well
        if step is not None:
            step.when_trained(accuracy)
        else:
            accuracy()
        if cfg.log_solver_stats and solutions and x_used is x:
            log_solver_summary(self, summary, stage, **kw)  # a real solve's status, also when the batch is skipped
        if cfg.log_timing and forward_time is not None:
            self.log(f"time/{timer_key}", forward_time, **kw)
        if stage == "train":
            epoch_kw = dict(on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True)
            log("train/loss_epoch", loss.detach(), **epoch_kw)
            if cfg.log_solver_stats and solutions:
                log("solver/train_nfe_epoch", float(summary.nfe), **epoch_kw)
        else:
            self._log_explicit(x, y, stage, batch_size)
        if stage == "val":
            self.log("hp/val_loss", loss.detach(), **kw)
            if solutions:
                self.log("hp/val_nfe", float(summary.nfe), **kw)
        return {"loss": loss, "deq": record}

    @staticmethod
    def _log_kwargs(stage: str, batch_size: Optional[int]) -> Dict[str, Any]:
        """Training scalars per step (exact names); validation/test scalars per epoch, synced across ranks."""
        if stage == "train":
            return dict(on_step=True, on_epoch=False, batch_size=batch_size)
        return dict(on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True)

    def _log_accuracy(self, output: Tensor, y: Tensor, stage: str, batch_size: Optional[int]) -> None:
        if f"{stage}_accuracy" not in self.metrics or output.dim() != 2:
            return
        preds = output.detach()
        acc = cast(MulticlassAccuracy, self.metrics[f"{stage}_accuracy"])  # _accuracy_metrics' (as below)
        batch_acc = acc(preds, y)
        self.log(
            f"{stage}/accuracy", acc, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=batch_size
        )
        if stage == "train":
            self.log(
                "train/batch_accuracy", batch_acc, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size
            )
        if f"{stage}_top5_accuracy" in self.metrics:
            top5 = cast(MulticlassAccuracy, self.metrics[f"{stage}_top5_accuracy"])
            top5(preds, y)
            self.log(f"{stage}/top5_accuracy", top5, on_step=False, on_epoch=True, batch_size=batch_size)

    def _log_explicit(self, x: Tensor, y: Tensor, stage: str, batch_size: Optional[int]) -> None:
        self._timer.start("explicit", self.device)
        out = self.explicit_forward(x)
        elapsed = self._timer.stop("explicit", self.device)
        if out is None:
            return
        key = f"{stage}_explicit_accuracy"
        if key in self.metrics and out.dim() == 2:
            metric = cast(MulticlassAccuracy, self.metrics[key])
            metric(out.detach(), y)
            self.log(f"{stage}/explicit_accuracy", metric, on_step=False, on_epoch=True, batch_size=batch_size)
        if self.deq_config.log_timing and elapsed is not None:
            self.log(
                f"{stage}/explicit_time", elapsed, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True
            )

    def training_step(self, batch: Any, batch_idx: int) -> Dict[str, Any]:
        """``{"loss": loss, "deq": StepRecord}``; callbacks read ``outputs["deq"]``."""
        self._check_trainer()
        return self._shared_step(batch, "train", batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> Dict[str, Any]:
        return self._shared_step(batch, "val", batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> Dict[str, Any]:
        return self._shared_step(batch, "test", batch_idx)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """The model output for a batch of inputs (``x``, ``(x, ...)`` or ``{"x": ...}``), the forward
        contract checked as in training (a logits-only ``forward`` raises instead of returning row 0)."""
        if isinstance(batch, dict):
            x = batch["x"]
        else:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
        output, _ = self._forward_checked(x)
        return output

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Drop the step's solution records; an override without ``super()`` only keeps them until the next step."""
        self.pending_step = None

    # ------------------------------------------------------------------ checks, checkpoints, optimisation
    def _attached_trainer(self) -> Optional["pl.Trainer"]:
        """The Trainer this module is attached to; ``None`` outside one (Lightning's ``trainer`` raises then)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    def _check_trainer(self) -> None:
        """Once per Trainer, at the first training step: deqlab's callbacks are attached (`warn_if_detached`)
        and a Jacobian weight has a DEQ layer that computes the term."""
        trainer = self._attached_trainer()
        if trainer is None or self._checked_trainer == id(trainer):
            return
        self._checked_trainer = id(trainer)
        self._check_jacobian_setting()
        warn_if_detached(type(self).__name__, trainer, self.deq_config)

    def _check_jacobian_setting(self) -> None:
        weight = self.deq_config.weight("jacobian_loss_weight")
        if weight <= 0:
            return
        layers = self.deq_layers()
        if not any(layer.jacobian_regularization for layer in layers):
            raise ValueError(
                f"jacobian_loss_weight={weight} but no DEQ layer of {type(self).__name__} computes the Jacobian term "
                f"({len(layers)} DEQ layer(s), none built with jacobian_regularization=True), so the term would "
                "silently add 0: build the layer with jacobian_regularization=True or set jacobian_loss_weight=0"
            )

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's ``load_from_checkpoint``, after `check_checkpoint_file` on the file, with a failed read
        reported by name (`damage_reported_by_name`)."""
        check_checkpoint_file(checkpoint_path)
        with damage_reported_by_name(checkpoint_path):
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def configure_optimizers(self) -> Any:
        cfg = self.deq_config
        optimizer = build_optimizer(
            self.parameters(),
            cfg.optimizer,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            betas=cfg.betas,
        )
        total: Any = cfg.scheduler_steps
        trainer = self._attached_trainer()
        if cfg.scheduler == "cosine" and total is None and trainer is not None:
            # asked at the first step, not now: asking now sets the data up before a checkpoint's loader
            # positions are restored, and Lightning then drops them (see CosineToTrainingEnd)
            total = lambda: trainer.estimated_stepping_batches  # noqa: E731
        scheduler = build_scheduler(
            optimizer,
            cfg.scheduler,
            total_steps=total,
            eta_min=cfg.eta_min,
            milestones=cfg.step_milestones,
            gamma=cfg.step_gamma,
        )
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def configure_callbacks(self) -> List[pl.Callback]:
        """deqlab's callbacks for this model's settings (`deqlab.lightning.policies.deqlab_callbacks`): the
        pretraining schedule, the non-finite guard, the backward's statistics, timing, the HParams tab,
        checkpoint integrity, exact resume and the figures. A callback of one of these types given to the
        Trainer takes precedence (one instance each). A subclass that returns its own callbacks returns
        ``[*super().configure_callbacks(), ...]``; without deqlab's, its first training step warns
        `PolicyWarning`."""
        return missing_callbacks(self._attached_trainer(), deqlab_callbacks(self.deq_config))


def _log_when_trained(step: PendingStep, log: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    step.when_trained(partial(log, *args, **kwargs))


def _accuracy_metrics(num_classes: Optional[int]) -> nn.ModuleDict:
    """Top-1 accuracy per stage (top-5 as well for more than ten classes, the explicit path's in evaluation)."""
    metrics = nn.ModuleDict()
    if num_classes is None:
        return metrics
    for stage in _STAGES:
        metrics[f"{stage}_accuracy"] = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        if num_classes > 10:
            metrics[f"{stage}_top5_accuracy"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        if stage != "train":
            metrics[f"{stage}_explicit_accuracy"] = MulticlassAccuracy(num_classes, top_k=1, average="micro")
    return metrics
