"""``DEQLightningModule``: the training loop every deqlab model shares.

A subclass builds its network in ``__init__`` and implements ``forward(x) -> (output, solution)``; this
base class composes the loss (task + λ_skip·skip + λ_jac·Jacobian), runs the pretraining schedule
(unrolled depth ``d`` for the first steps), builds optimizer and schedule from typed hyperparameters,
and logs what a DEQ researcher needs: loss parts, accuracy, forward/backward NFE, residuals,
convergence, per-phase wall time, and explicit (u0-only) accuracy for Skip models.

Scalar names are grouped for TensorBoard: ``train/``, ``val/``, ``test/`` (loss, accuracy),
``solver/`` (NFE, residuals, convergence), ``time/`` (wall time), ``hp/`` (HParams-tab metrics).
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from deqlab.lightning._optim import OptimizerName, SchedulerName, build_optimizer, build_scheduler
from deqlab.lightning._stats import SolutionSummary, as_solution_list, summarize
from deqlab.lightning._timing import PhaseTimer

log = logging.getLogger(__name__)


@rank_zero_only
def _info(message: str) -> None:
    log.info(message)

Stage = Literal["train", "val", "test"]
_STAGES: Tuple[str, ...] = ("train", "val", "test")

#: Metric names written to TensorBoard's HParams tab (placeholders at fit start, updated per validation).
HPARAM_METRICS: Tuple[str, ...] = ("hp/val_accuracy", "hp/val_loss", "hp/val_nfe")


@dataclass(frozen=True)
class DEQTrainingConfig:
    """The base-class hyperparameters, kept apart from ``hparams`` so subclasses may edit ``hparams``."""

    num_classes: Optional[int]
    optimizer: str
    lr: float
    weight_decay: float
    momentum: float
    nesterov: bool
    betas: Tuple[float, float]
    scheduler: str
    scheduler_steps: Optional[int]
    eta_min: float
    step_milestones: Tuple[int, ...]
    step_gamma: float
    skip_loss_weight: float
    jacobian_loss_weight: float
    pretrain_steps: int
    pretrain_depth: int
    log_solver_stats: bool
    log_timing: bool
    log_figures: bool
    log_hparams_metrics: bool


def find_deq_layers(module: nn.Module) -> List[nn.Module]:
    """Every submodule that is a DEQ layer: an instance of deqlab's DEQ base class or, for layers from
    elsewhere, any module with an integer ``fixed_depth`` attribute (the switch pretraining uses)."""
    base = _deq_base_classes()
    found = []
    for m in module.modules():
        if m is module:
            continue
        if (base and isinstance(m, base)) or isinstance(getattr(m, "fixed_depth", None), int):
            found.append(m)
    return found


def _deq_base_classes() -> Tuple[type, ...]:
    try:
        import deqlab.nn as dnn
    except Exception:  # pragma: no cover - deqlab.nn is part of the package
        return ()
    names = ("DEQBase", "BaseDeepEquilibriumNetwork", "DeepEquilibriumNetwork")
    return tuple(c for c in (getattr(dnn, n, None) for n in names) if isinstance(c, type))


class DEQLightningModule(pl.LightningModule):
    """Base class for DEQ models trained with Lightning.

    Subclass contract:

    * build the network in ``__init__`` (typed arguments, forward the rest with ``**kwargs`` to
      ``super().__init__``; the base already calls ``save_hyperparameters()`` so the subclass's arguments
      are recorded too, calling it again is harmless);
    * implement ``forward(x) -> (output, solution)`` where ``solution`` is the DEQ layer's
      ``DeepEquilibriumSolution`` (or a list of them, or ``None`` for a model without a DEQ);
    * optionally implement ``explicit_forward(x) -> output`` (the u0-only prediction of Skip models)
      and ``task_loss(output, target)`` (cross-entropy by default).

    Args:
        num_classes: classes of the task; enables top-1 accuracy (and top-5 when > 10). ``None`` for
            non-classification tasks (then override ``task_loss``).
        optimizer: ``adam``, ``adamw`` or ``sgd``.
        lr: initial learning rate.
        weight_decay: decoupled for AdamW, L2 for Adam/SGD.
        momentum: SGD momentum (ignored by Adam/AdamW).
        nesterov: SGD Nesterov momentum.
        betas: Adam/AdamW betas.
        scheduler: ``cosine`` (to ``eta_min`` over ``scheduler_steps``), ``step`` (× ``step_gamma`` at
            ``step_milestones``) or ``none``; stepped every optimizer step.
        scheduler_steps: cosine period in optimizer steps; default: the Trainer's estimated total steps.
        eta_min: final learning rate of the cosine schedule.
        step_milestones: optimizer steps at which the ``step`` schedule decays.
        step_gamma: decay factor of the ``step`` schedule.
        skip_loss_weight: λ_skip, weight of ``mean|u0 - z*|`` (Skip / Skip Reg. models).
        jacobian_loss_weight: λ_jac, weight of the Hutchinson Jacobian estimate (the DEQ layer must be
            built with ``jacobian_regularization=True`` for the term to be non-zero).
        pretrain_steps: for global steps ``< pretrain_steps`` every DEQ layer runs ``pretrain_depth``
            unrolled steps instead of the solver (validation and test always use the solver).
        pretrain_depth: unrolled depth during pretraining (the paper uses 5).
        log_solver_stats: log NFE, residuals and convergence under ``solver/``.
        log_timing: log forward/backward/optimizer wall time under ``time/``.
        log_figures: add the NFE-histogram and convergence-figure callbacks (``configure_callbacks``).
        log_hparams_metrics: write hyperparameters with ``hp/`` metrics to TensorBoard's HParams tab.
    """

    def __init__(
        self,
        *,
        num_classes: Optional[int] = 10,
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        nesterov: bool = False,
        betas: Tuple[float, float] = (0.9, 0.999),
        scheduler: SchedulerName = "cosine",
        scheduler_steps: Optional[int] = None,
        eta_min: float = 1e-6,
        step_milestones: Sequence[int] = (),
        step_gamma: float = 0.1,
        skip_loss_weight: float = 0.0,
        jacobian_loss_weight: float = 0.0,
        pretrain_steps: int = 0,
        pretrain_depth: int = 5,
        log_solver_stats: bool = True,
        log_timing: bool = True,
        log_figures: bool = True,
        log_hparams_metrics: bool = True,
    ) -> None:
        super().__init__()
        if pretrain_steps < 0 or pretrain_depth < 1:
            raise ValueError(
                f"pretrain_steps must be >= 0 and pretrain_depth >= 1, got {pretrain_steps} and {pretrain_depth}"
            )
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (or None for non-classification tasks), got {num_classes}")
        self._save_constructor_hparams()
        self.deq_config = DEQTrainingConfig(
            num_classes=num_classes,
            optimizer=optimizer,
            lr=float(lr),
            weight_decay=float(weight_decay),
            momentum=float(momentum),
            nesterov=bool(nesterov),
            betas=(float(betas[0]), float(betas[1])),
            scheduler=scheduler,
            scheduler_steps=scheduler_steps,
            eta_min=float(eta_min),
            step_milestones=tuple(int(m) for m in step_milestones),
            step_gamma=float(step_gamma),
            skip_loss_weight=float(skip_loss_weight),
            jacobian_loss_weight=float(jacobian_loss_weight),
            pretrain_steps=int(pretrain_steps),
            pretrain_depth=int(pretrain_depth),
            log_solver_stats=log_solver_stats,
            log_timing=log_timing,
            log_figures=log_figures,
            log_hparams_metrics=log_hparams_metrics,
        )
        self.metrics = nn.ModuleDict()
        if num_classes is not None:
            for stage in _STAGES:
                self.metrics[f"{stage}_accuracy"] = MulticlassAccuracy(num_classes, top_k=1, average="micro")
                if num_classes > 10:
                    self.metrics[f"{stage}_top5_accuracy"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
                if stage != "train":
                    self.metrics[f"{stage}_explicit_accuracy"] = MulticlassAccuracy(
                        num_classes, top_k=1, average="micro"
                    )
        self._timer = PhaseTimer()
        self._pending: List[Any] = []  # solutions of the current training step, for the backward NFE
        self._depth: Optional[int] = None  # fixed depth currently applied by the pretraining schedule
        self._saved_depths: Optional[List[int]] = None
        self._epoch_start: Optional[float] = None
        #: The numbers of the last step (``stage``, ``nfe``, ``backward_nfe``, ...), read by callbacks.
        self.last_step_stats: Dict[str, Any] = {}

    def _save_constructor_hparams(self) -> None:
        """Record the arguments of the *most-derived* constructor as ``hparams``.

        Why not Lightning's plain ``save_hyperparameters()`` here: it merges the arguments of every
        ``__init__`` in the chain, so an intermediate class's arguments (``in_features`` that a subclass
        fixes) would be passed twice when ``load_from_checkpoint`` rebuilds the model. The outermost
        constructor's arguments (``**kwargs`` included) rebuild it exactly; the effective base-class
        settings are in ``deq_config`` and go to TensorBoard's HParams tab as well.
        """
        frame = inspect.currentframe()
        outer = None
        f = frame.f_back if frame is not None else None  # skip this helper's own frame
        while f is not None and f.f_code.co_name == "__init__" and f.f_locals.get("self") is self:
            outer = f
            f = f.f_back
        if outer is None:  # pragma: no cover - only when called outside __init__
            return
        # Lightning collects the arguments of ``outer`` (``**kwargs`` merged), or, when LightningCLI built the
        # model, takes the CLI's resolved arguments plus the class path it needs to rebuild from a checkpoint.
        self.save_hyperparameters(frame=outer)
        del frame, f, outer

    def hparams_for_logging(self) -> Dict[str, Any]:
        """Constructor arguments plus the effective base-class settings (what the HParams tab shows)."""
        merged: Dict[str, Any] = {k: v for k, v in dataclasses.asdict(self.deq_config).items()}
        merged.update({k: v for k, v in dict(self.hparams).items() if not str(k).startswith("_")})
        merged.update({k: getattr(self.deq_config, k) for k in ("skip_loss_weight", "jacobian_loss_weight")})
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

    # ------------------------------------------------------------------ DEQ layers & pretraining
    def deq_layers(self) -> List[nn.Module]:
        """The DEQ layers of this model (see :func:`find_deq_layers`)."""
        return find_deq_layers(self)

    def set_fixed_depth(self, depth: int) -> None:
        """Run every DEQ layer as ``depth`` unrolled steps (``0``: back to the solver)."""
        layers = self.deq_layers()
        if depth and not layers:
            raise RuntimeError(
                f"pretrain_steps={self.deq_config.pretrain_steps} but {type(self).__name__} has no DEQ layer "
                "(no submodule with a fixed_depth attribute); set pretrain_steps=0"
            )
        for layer in layers:
            layer.fixed_depth = int(depth)

    def is_pretraining(self, step: Optional[int] = None) -> bool:
        step = self.global_step if step is None else step
        return step < self.deq_config.pretrain_steps

    def _apply_pretraining_schedule(self) -> None:
        cfg = self.deq_config
        if cfg.pretrain_steps == 0 and self._depth is None:
            return
        pretraining = self.is_pretraining()
        depth = cfg.pretrain_depth if pretraining else 0
        if depth != self._depth:
            self.set_fixed_depth(depth)
            if pretraining:
                _info(
                    f"deqlab: pretraining: DEQ layers run {depth} unrolled steps until global step {cfg.pretrain_steps}"
                )
            elif self._depth is not None:
                _info(f"deqlab: pretraining finished at global step {self.global_step}; DEQ layers use the solver")
            self._depth = depth
        self.log("train/pretraining", float(pretraining), on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ shared step
    def _shared_step(self, batch: Any, stage: str) -> Tensor:
        cfg = self.deq_config
        x, y = self.unpack_batch(batch)
        batch_size = int(x.shape[0]) if torch.is_tensor(x) else None
        timer_key = "forward" if stage == "train" else f"{stage}_forward"
        self._timer.start(timer_key, self.device)
        output, solution = self(x)
        forward_time = self._timer.stop(timer_key, self.device)
        solutions = as_solution_list(solution)
        summary = summarize(solutions, output)

        task = self.task_loss(output, y)
        loss = task + cfg.skip_loss_weight * summary.skip_loss + cfg.jacobian_loss_weight * summary.jacobian_loss

        kw = self._log_kwargs(stage, batch_size)
        self.log(f"{stage}/loss", loss.detach(), prog_bar=True, **kw)
        self.log(f"{stage}/task_loss", task.detach(), **kw)
        self.log(f"{stage}/skip_loss", summary.skip_loss.detach(), **kw)
        self.log(f"{stage}/jacobian_loss", summary.jacobian_loss.detach(), **kw)
        self._log_accuracy(output, y, stage, batch_size)
        if cfg.log_solver_stats and solutions:
            self._log_solver(summary, stage, kw)
        if cfg.log_timing and forward_time is not None:
            self.log(f"time/{timer_key}", forward_time, **kw)
        if stage == "train":
            epoch_kw = dict(on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True)
            self.log("train/loss_epoch", loss.detach(), **epoch_kw)
            if cfg.log_solver_stats and solutions:
                self.log("solver/train_nfe_epoch", float(summary.nfe), **epoch_kw)
        else:
            self._log_explicit(x, y, stage, batch_size)
        if stage == "val":
            self.log("hp/val_loss", loss.detach(), **kw)
            if solutions:
                self.log("hp/val_nfe", float(summary.nfe), **kw)

        self.last_step_stats = {
            "stage": stage,
            "nfe": summary.nfe,
            "backward_nfe": None,
            "residual_mean": None if summary.residual_mean is None else float(summary.residual_mean),
            "forward_time": forward_time,
        }
        if stage == "train":
            self._pending = solutions
        return loss

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
        acc = self.metrics[f"{stage}_accuracy"]
        batch_acc = acc(preds, y)
        self.log(f"{stage}/accuracy", acc, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=batch_size)
        if stage == "train":
            self.log("train/batch_accuracy", batch_acc, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        if f"{stage}_top5_accuracy" in self.metrics:
            top5 = self.metrics[f"{stage}_top5_accuracy"]
            top5(preds, y)
            self.log(f"{stage}/top5_accuracy", top5, on_step=False, on_epoch=True, batch_size=batch_size)

    def _log_solver(self, s: SolutionSummary, stage: str, kw: Dict[str, Any]) -> None:
        self.log(f"solver/{stage}_nfe", float(s.nfe), prog_bar=True, **kw)
        if s.residual_mean is not None:
            self.log(f"solver/{stage}_residual_mean", s.residual_mean, **kw)
            self.log(f"solver/{stage}_residual_max", s.residual_max, **{**kw, "reduce_fx": "max"})
        if s.converged_fraction is not None:
            self.log(f"solver/{stage}_converged", s.converged_fraction, **kw)

    def _log_explicit(self, x: Tensor, y: Tensor, stage: str, batch_size: Optional[int]) -> None:
        self._timer.start("explicit", self.device)
        out = self.explicit_forward(x)
        elapsed = self._timer.stop("explicit", self.device)
        if out is None:
            return
        key = f"{stage}_explicit_accuracy"
        if key in self.metrics and out.dim() == 2:
            metric = self.metrics[key]
            metric(out.detach(), y)
            self.log(f"{stage}/explicit_accuracy", metric, on_step=False, on_epoch=True, batch_size=batch_size)
        if self.deq_config.log_timing and elapsed is not None:
            self.log(f"{stage}/explicit_time", elapsed, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x)[0]

    # ------------------------------------------------------------------ training hooks
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._apply_pretraining_schedule()

    def on_before_backward(self, loss: Tensor) -> None:
        self._timer.start("backward", self.device)

    def on_after_backward(self) -> None:
        elapsed = self._timer.stop("backward", self.device)
        if self.deq_config.log_timing and elapsed is not None:
            self.log("time/backward", elapsed, on_step=True, on_epoch=False)
        if self._pending:
            bnfe = float(sum(getattr(s, "backward_nfe", 0) for s in self._pending))
            self.last_step_stats["backward_nfe"] = bnfe
            if self.deq_config.log_solver_stats:
                self.log("solver/train_backward_nfe", bnfe, on_step=True, on_epoch=False, prog_bar=True)
                self.log("solver/train_backward_nfe_epoch", bnfe, on_step=False, on_epoch=True, sync_dist=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._timer.start("optimizer", self.device)

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Optional[Any] = None,
    ) -> None:
        # The closure (forward + backward) runs inside optimizer.step; on_before_optimizer_step fires after
        # it, so the "optimizer" phase below is the parameter update alone.
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        elapsed = self._timer.stop("optimizer", self.device)
        if self.deq_config.log_timing and elapsed is not None:
            self.log("time/optimizer", elapsed, on_step=True, on_epoch=False)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._pending = []  # drop the graph references held for the backward NFE

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        if self._epoch_start is not None and self.deq_config.log_timing:
            self.log("time/train_epoch", time.perf_counter() - self._epoch_start, on_step=False, on_epoch=True, sync_dist=True)

    # ------------------------------------------------------------------ evaluation hooks
    def _solver_mode_for_eval(self) -> None:
        """Validation and test always run the solver, also during pretraining."""
        layers = self.deq_layers()
        self._saved_depths = [int(getattr(m, "fixed_depth", 0)) for m in layers]
        for m in layers:
            m.fixed_depth = 0

    def _restore_depths(self) -> None:
        if self._saved_depths is not None:
            for m, d in zip(self.deq_layers(), self._saved_depths):
                m.fixed_depth = d
            self._saved_depths = None

    def on_validation_epoch_start(self) -> None:
        self._solver_mode_for_eval()

    def on_validation_epoch_end(self) -> None:
        self._restore_depths()
        if self.trainer.sanity_checking:
            return
        acc = self.metrics["val_accuracy"] if "val_accuracy" in self.metrics else None
        if acc is not None and getattr(acc, "update_count", getattr(acc, "_update_count", 0)) > 0:
            self.log("hp/val_accuracy", acc.compute(), on_step=False, on_epoch=True)

    def on_test_epoch_start(self) -> None:
        self._solver_mode_for_eval()

    def on_test_epoch_end(self) -> None:
        self._restore_depths()

    def on_fit_start(self) -> None:
        if not self.deq_config.log_hparams_metrics:
            return
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(self.hparams_for_logging(), {name: 0.0 for name in HPARAM_METRICS})

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self) -> Any:
        cfg = self.deq_config
        optimizer = build_optimizer(
            self.parameters(),
            cfg.optimizer,  # type: ignore[arg-type]
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            betas=cfg.betas,
        )
        total = cfg.scheduler_steps
        if cfg.scheduler == "cosine" and total is None:
            total = self.trainer.estimated_stepping_batches if self._trainer is not None else None
        scheduler = build_scheduler(
            optimizer,
            cfg.scheduler,  # type: ignore[arg-type]
            total_steps=total,
            eta_min=cfg.eta_min,
            milestones=cfg.step_milestones,
            gamma=cfg.step_gamma,
        )
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def configure_callbacks(self) -> List[pl.Callback]:
        if not self.deq_config.log_figures:
            return []
        from deqlab.lightning.callbacks import ConvergenceFigure, NFEHistogram

        # Callbacks of these types given to the Trainer (e.g. with other settings) take precedence.
        existing = {type(c) for c in self.trainer.callbacks} if self._trainer is not None else set()
        return [cb for cb in (NFEHistogram(), ConvergenceFigure()) if type(cb) not in existing]
