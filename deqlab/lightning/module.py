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

import contextlib
import inspect
import logging
import time
import warnings
from functools import partial
from typing import Any, Callable, ClassVar, Dict, List, Literal, Mapping, Optional, Tuple

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from deqlab.lightning._optim import build_optimizer, build_scheduler
from deqlab.lightning._stats import STATUSES, SolutionSummary, StepRecord, split_forward_output, summarize
from deqlab.lightning._timing import PhaseTimer
from deqlab.lightning.checkpoint import check_checkpoint_file, damage_reported_by_name
from deqlab.spec.training import DEQTrainingConfig, TrainingArg
from deqlab.lightning.resume import CHECKPOINT_KEY as _CHECKPOINT_KEY
from deqlab.lightning.resume import CheckpointIntegrity, ExactResume, ResumeWarning
from deqlab.nn.protocols import DEQLayer
from deqlab.nn.solution import DeepEquilibriumSolution

log = logging.getLogger(__name__)


@rank_zero_only
def _info(message: str) -> None:
    log.info(message)

Stage = Literal["train", "val", "test"]
_STAGES: Tuple[str, ...] = ("train", "val", "test")

#: Metric names written to TensorBoard's HParams tab (placeholders at fit start, updated per validation).
HPARAM_METRICS: Tuple[str, ...] = ("hp/val_accuracy", "hp/val_loss", "hp/val_nfe")

#: Key of deqlab's own entry in a Lightning checkpoint (written by `ExactResume`).
CHECKPOINT_KEY = _CHECKPOINT_KEY


class NonFiniteBatchWarning(UserWarning):
    """Warned (once per run) when the non-finite policy ``on_nonfinite="skip"`` drops a training batch.

    Its own class so that a test or a script can filter it (``warnings.simplefilter("error",
    NonFiniteBatchWarning)``) without touching other warnings.

    Examples:
        >>> import warnings
        >>> from deqlab.lightning.module import NonFiniteBatchWarning
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warnings.warn("batch 3 skipped", NonFiniteBatchWarning)
        >>> caught[0].category.__name__
        'NonFiniteBatchWarning'
    """


class NonFiniteBatchError(FloatingPointError):
    """Raised under ``on_nonfinite="raise"`` for a training batch with a non-finite loss, gradient or solve.

    A ``FloatingPointError``, the built-in class for numerical failures; the message names the batch, the
    solver status and where the non-finite values first appear.

    Examples:
        >>> from deqlab.lightning.module import NonFiniteBatchError
        >>> issubclass(NonFiniteBatchError, FloatingPointError)
        True
    """


#: Names under ``train/`` etc. that the module logs itself; ``extra_losses`` may not reuse them.
RESERVED_LOSS_NAMES = frozenset({
    "loss", "task_loss", "skip_loss", "jacobian_loss", "accuracy", "batch_accuracy", "top5_accuracy",
    "explicit_accuracy", "explicit_time", "loss_epoch", "pretraining", "skipped_batches",
})


def find_deq_layers(module: nn.Module) -> List[nn.Module]:
    """The outermost submodules (not ``module`` itself) that implement the [`deqlab.nn.DEQLayer`][deqlab.nn.DEQLayer]
    protocol: a settable ``fixed_depth``, a ``fixed_depth_mode(depth)`` context manager and a
    ``jacobian_regularization`` flag. deqlab's layers and any researcher's layer with those members are
    found and driven the same way.

    Why outermost only: a layer that wraps another DEQ layer owns it. Its ``fixed_depth_mode`` drives the
    inner layer and its ``jacobian_regularization`` reports the inner term, so driving both would switch
    the inner layer twice and check a flag the wrapper already answers for. The search does not descend
    into a DEQ layer.

    The module uses this to run the pretraining schedule and the Jacobian-setting check; it is public so
    that a script can do the same to a plain ``nn.Module``.

    Args:
        module: the network to search (any ``nn.Module``; a DEQ layer nested at any depth is found).

    Returns:
        The DEQ layers in ``module.modules()`` order (registration order, depth first), none of them
            inside another; an empty list for a network without one.

    Examples:
        >>> from deqlab.lightning import find_deq_layers
        >>> from deqlab.zoo import DigitsDEQ
        >>> [type(m).__name__ for m in find_deq_layers(DigitsDEQ(width=8))]
        ['SkipDeepEquilibriumNetwork']
        >>> import torch
        >>> find_deq_layers(torch.nn.Linear(2, 2))
        []
    """
    found: List[nn.Module] = []

    def visit(parent: nn.Module) -> None:
        for child in parent.children():
            if isinstance(child, DEQLayer):
                if all(child is not m for m in found):  # a layer registered twice is one layer
                    found.append(child)
            else:
                visit(child)

    visit(module)
    return found


class DEQLightningModule(pl.LightningModule):
    """Base class for DEQ models trained with Lightning.

    Subclass contract:

    * build the network in ``__init__`` (typed arguments, forward the rest with ``**kwargs`` to
      ``super().__init__``; the base records the most-derived constructor's arguments as ``hparams``);
    * implement ``forward(x) -> (output, solution)`` where ``solution`` is the DEQ layer's
      ``DeepEquilibriumSolution`` (or a list of them, or ``None`` for a model without a DEQ);
    * optionally implement ``explicit_forward(x) -> output`` (the u0-only prediction of Skip models),
      ``task_loss(output, target)`` (cross-entropy by default) and ``extra_losses(...)`` (own loss terms).

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

    def __init__(self, *, training: TrainingArg = None, **overrides: Any) -> None:
        super().__init__()
        self._save_constructor_hparams()
        self.deq_config = DEQTrainingConfig.build(training, defaults=self.default_training, **overrides)
        num_classes = self.deq_config.num_classes
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
        self._pending: List[DeepEquilibriumSolution] = []  # solutions of the current training step
        self._record: Optional[StepRecord] = None  # record of the current training step
        self._depth: Optional[int] = None  # fixed depth currently applied by the pretraining schedule
        self._eval_depths: Optional[contextlib.ExitStack] = None
        self._epoch_start: Optional[float] = None
        self._batch_input: Optional[Tensor] = None  # the training input, for the non-finite diagnosis
        self._input_nonfinite = 0  # samples of the training input with NaN/Inf
        self._skipped_batches = 0
        self._warned_nonfinite = False
        self._batch_idx = 0  # index of the current training batch
        self._backward_loss: Optional[Tensor] = None  # the loss of the running backward (on_before_backward)
        self._train_logs: List[Callable[[], None]] = []  # training logs held until the backward judged the batch
        self._buffer_owners: Optional[List[Tuple[nn.Module, str]]] = None  # (module, name) of every buffer
        self._buffer_snapshot: List[Tuple[nn.Module, str, Tensor]] = []  # buffers before this batch's forward
        self._window_start: Optional[int] = None  # first batch of the current gradient-accumulation window
        self._window_bad: List[str] = []  # the window's non-finite batches ("batch 3 (solver status: ...)")
        self._window_message: Optional[str] = None  # full description of the window's first non-finite batch
        self._policies_checked: Optional[int] = None  # id of the Trainer whose callbacks were checked

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
        # nn.Module arguments (a DEQClassifier's network) are in the state dict already; as hparams they would
        # be pickled into every checkpoint and written weight by weight into hparams.yaml. Pass them again to
        # load_from_checkpoint (``DEQClassifier.load_from_checkpoint(path, network=...)``).
        modules = [k for k, v in outer.f_locals.items() if k != "self" and isinstance(v, nn.Module)]
        self.save_hyperparameters(ignore=modules, frame=outer)
        del frame, f, outer
        # a checkpoint must stay loadable with torch.load(weights_only=True): keep the config as plain data
        if isinstance(self.hparams.get("training"), DEQTrainingConfig):
            self.hparams["training"] = self.hparams["training"].as_dict()

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
        unweighted as ``{stage}/{name}``. Names the module logs itself (``loss``, ``skip_loss``, ...) are
        refused.
        """
        return {}

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
        """The DEQ layers of this model (see [`find_deq_layers`][deqlab.lightning.find_deq_layers])."""
        return find_deq_layers(self)

    def set_fixed_depth(self, depth: int) -> None:
        """Run every DEQ layer as ``depth`` unrolled steps (``0``: back to the solver)."""
        layers = self.deq_layers()
        if depth and not layers:
            raise RuntimeError(
                f"pretrain_steps={self.deq_config.pretrain_steps} but {type(self).__name__} has no DEQ layer "
                "(no submodule implementing deqlab.nn.DEQLayer: fixed_depth, fixed_depth_mode and "
                "jacobian_regularization); set pretrain_steps=0"
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
    def _forward_checked(self, x: Tensor) -> Tuple[Tensor, List[DeepEquilibriumSolution]]:
        """``self(x)`` with the contract checked: ``(output, solution)``, solution a record, list or None.
        Every caller of the forward (the steps, ``predict_step``, the figure callback) goes through here."""
        return split_forward_output(self(x), owner=type(self).__name__)

    def _extra_terms(self, batch: Any, output: Tensor, solutions: List[DeepEquilibriumSolution],
                     stage: str) -> Dict[str, Tuple[Tensor, float]]:
        terms = self.extra_losses(batch, output, solutions, stage)
        if not terms:
            terms = {}
        if not isinstance(terms, Mapping):
            raise TypeError(f"{type(self).__name__}.extra_losses must return a mapping name -> scalar tensor, "
                            f"got {type(terms).__name__}")
        weights = self.deq_config.extra_loss_weights
        out: Dict[str, Tuple[Tensor, float]] = {}
        for name, value in terms.items():
            if name in RESERVED_LOSS_NAMES or "/" in str(name):
                raise ValueError(f"extra_losses: the name {name!r} is reserved or contains '/'; pick another")
            if not (torch.is_tensor(value) and value.numel() == 1):
                raise TypeError(f"extra_losses: term {name!r} must be a scalar tensor (a batch mean), got "
                                f"{type(value).__name__}{tuple(value.shape) if torch.is_tensor(value) else ''}")
            out[str(name)] = (value.reshape(()), float(weights.get(name, 1.0)))
        if stage == "train":
            orphans = sorted(set(weights) - set(out))
            if orphans:
                raise ValueError(
                    f"extra_loss_weights names {', '.join(map(repr, orphans))} but {type(self).__name__}.extra_losses "
                    f"returned {sorted(out) or 'no terms'} in this training step; fix the name or drop the weight"
                )
        return out

    def _shared_step(self, batch: Any, stage: str, batch_idx: int = 0) -> Dict[str, Any]:
        cfg = self.deq_config
        x, y = self.unpack_batch(batch)
        batch_size = int(x.shape[0]) if torch.is_tensor(x) else None
        x_used = x
        if stage == "train":
            self._batch_input = x if torch.is_tensor(x) else None
            self._input_nonfinite = _nonfinite_samples(x)
            if self._input_nonfinite:
                # Still run forward and backward (every DDP rank must take part in the gradient all-reduce),
                # on a finite stand-in whose update the non-finite guard then drops; the model never sees
                # the NaN, so nothing downstream of the data (a Skip shortcut, the solver) is blamed for it.
                x_used = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        timer_key = "forward" if stage == "train" else f"{stage}_forward"
        self._timer.start(timer_key, self.device)
        output, solutions = self._forward_checked(x_used)
        forward_time = self._timer.stop(timer_key, self.device)
        summary = summarize(solutions, output)

        task = self.task_loss(output, y)
        loss = (task + cfg.weight("skip_loss_weight") * summary.skip_loss
                + cfg.weight("jacobian_loss_weight") * summary.jacobian_loss)
        extras = self._extra_terms(batch, output, solutions, stage)
        for value, weight in extras.values():
            loss = loss + weight * value

        kw = self._log_kwargs(stage, batch_size)
        # training losses and accuracy are logged once the backward has judged the batch (a skipped batch
        # logs none of them, see _judge_backward); evaluation logs at once
        log = self._log_if_trained if stage == "train" else self.log
        log(f"{stage}/loss", loss.detach(), prog_bar=True, **kw)
        log(f"{stage}/task_loss", task.detach(), **kw)
        log(f"{stage}/skip_loss", summary.skip_loss.detach(), **kw)
        log(f"{stage}/jacobian_loss", summary.jacobian_loss.detach(), **kw)
        for name, (value, _) in extras.items():
            log(f"{stage}/{name}", value.detach(), **kw)
        if stage == "train":
            self._train_logs.append(partial(self._log_accuracy, output, y, stage, batch_size))
        else:
            self._log_accuracy(output, y, stage, batch_size)
        if cfg.log_solver_stats and solutions and not (stage == "train" and self._input_nonfinite):
            self._log_solver(summary, stage, kw)  # a real solve's status, also when the batch is skipped
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

        unconverged = summary.unconverged_fraction
        record = StepRecord(
            stage=stage,
            batch_idx=batch_idx,
            nfe=summary.nfe,
            residual_mean=None if summary.residual_mean is None else float(summary.residual_mean),
            forward_time=forward_time,
            status_counts=summary.status_counts,
            unconverged_fraction=None if unconverged is None else float(unconverged),
        )
        if stage == "train":
            self._pending = solutions
            self._record = record
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
        if s.reference_nfe is not None:  # the paper's count, beside ours (deqlab.solvers.counting)
            self.log(f"solver/{stage}_reference_nfe", s.reference_nfe, **kw)
        if s.residual_mean is not None:
            self.log(f"solver/{stage}_residual_mean", s.residual_mean, **kw)
            self.log(f"solver/{stage}_residual_max", s.residual_max, **{**kw, "reduce_fx": "max"})
        if s.converged_fraction is not None:
            self.log(f"solver/{stage}_converged", s.converged_fraction, **kw)
            self.log(f"solver/{stage}_unconverged", s.unconverged_fraction, **kw)
        if s.stalled_fraction is not None:  # among the unconverged: stopped by the patience rule near tol
            self.log(f"solver/{stage}_stalled", s.stalled_fraction, **kw)
        for status in STATUSES:  # solves per status (a diverging model shows solver/train_status_diverged)
            self.log(f"solver/{stage}_status_{status}", float(s.status_counts.get(status, 0)),
                     **{**kw, "reduce_fx": "sum"} if stage != "train" else kw)

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

    def training_step(self, batch: Any, batch_idx: int) -> Dict[str, Any]:
        """``{"loss": loss, "deq": StepRecord}``; callbacks read ``outputs["deq"]``."""
        self._check_policies_attached()
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

    # ------------------------------------------------------------------ training hooks
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._apply_pretraining_schedule()
        self._batch_idx = batch_idx
        if self._window_start is None:
            self._window_start = batch_idx
        self._snapshot_buffers()

    def on_before_backward(self, loss: Tensor) -> None:
        self._backward_loss = loss
        self._timer.start("backward", self.device)

    def on_after_backward(self) -> None:
        """Judge the batch that was just back-propagated (`_judge_backward`), then log what it did.

        Subclasses that override this hook (or ``on_before_backward``) must call ``super()``: the
        non-finite policy runs here, after every backward, so that each micro-batch of a
        gradient-accumulation window and each ``manual_backward`` is checked.
        """
        elapsed = self._timer.stop("backward", self.device)
        if self.deq_config.log_timing and elapsed is not None:
            self.log("time/backward", elapsed, on_step=True, on_epoch=False)
        bnfe, unconverged = None, None
        if self._pending:
            # the backward fills the records: solution.backward_nfe (and backward_converged where available)
            bnfe = float(sum(s.backward_nfe for s in self._pending))
            unconverged = _backward_unconverged_fraction(self._pending)
            if self._record is not None:
                self._record.backward_nfe = bnfe
                self._record.backward_unconverged_fraction = unconverged
        loss, self._backward_loss = self._backward_loss, None
        skipped = self._judge_backward(loss)
        logs, self._train_logs = self._train_logs, []
        if not skipped:
            for emit in logs:
                emit()
        if bnfe is not None and self.deq_config.log_solver_stats and not self._input_nonfinite:
            self.log("solver/train_backward_nfe", bnfe, on_step=True, on_epoch=False, prog_bar=True)
            if not skipped:
                self.log("solver/train_backward_nfe_epoch", bnfe, on_step=False, on_epoch=True, sync_dist=True)
            if unconverged is not None:
                self.log("solver/train_backward_unconverged", unconverged, on_step=True, on_epoch=False)
        self.log("train/skipped_batches", float(self._skipped_batches), on_step=True, on_epoch=False)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._timer.start("optimizer", self.device)

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Optional[Any] = None,
    ) -> None:
        # The closure (forward + backward of the window's last batch) runs inside optimizer.step;
        # on_before_optimizer_step fires after it, so the "optimizer" phase below is the parameter update
        # alone. Every backward was judged in on_after_backward; a window with a non-finite batch leaves
        # every gradient None here, so the optimizer leaves every weight (and its moment estimates) untouched.
        def guarded_closure() -> Any:
            loss = optimizer_closure() if optimizer_closure is not None else None
            # None tells Lightning's loss scaler (16-mixed) that the step is skipped: it neither unscales nor
            # steps (with every gradient None its step would fail: "No inf checks were recorded")
            return None if self._close_window(batch_idx) else loss

        super().optimizer_step(epoch, batch_idx, optimizer, guarded_closure)
        elapsed = self._timer.stop("optimizer", self.device)
        if self.deq_config.log_timing and elapsed is not None:
            self.log("time/optimizer", elapsed, on_step=True, on_epoch=False)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._pending = []  # drop the graph references held for the backward NFE
        self._record = None
        self._batch_input = None
        self._input_nonfinite = 0
        self._train_logs = []  # a batch without a backward was never judged: nothing to log for it
        self._buffer_snapshot = []

    # ------------------------------------------------------------------ non-finite batches
    def _log_if_trained(self, *args: Any, **kwargs: Any) -> None:
        """``self.log`` for a training scalar, held until `_judge_backward` found the batch finite."""
        self._train_logs.append(partial(self.log, *args, **kwargs))

    def _snapshot_buffers(self) -> None:
        """Copy the buffers (BatchNorm running statistics, ...) before the forward of a training batch, so a
        skipped batch can put them back: the forward updates them before the batch is judged. The owners
        are listed once per epoch (the module walk costs more than the copies); a model without buffers
        (DigitsDEQ) copies nothing."""
        if self._buffer_owners is None:
            self._buffer_owners = [(m, n) for m in self.modules() for n, b in m._buffers.items() if b is not None]
        self._buffer_snapshot = [(m, n, m._buffers[n].detach().clone()) for m, n in self._buffer_owners
                                 if m._buffers.get(n) is not None]

    def _restore_buffers(self) -> None:
        with torch.no_grad():
            for owner, attr, saved in self._buffer_snapshot:
                current = owner._buffers.get(attr)
                if current is not None and current.shape == saved.shape and current.dtype == saved.dtype:
                    current.copy_(saved)
                else:  # the forward replaced the buffer: put the old tensor back
                    owner._buffers[attr] = saved

    def _nonfinite_reasons(self, loss: Any) -> List[str]:
        """Why the batch just back-propagated is non-finite (empty when it is fine)."""
        reasons: List[str] = []
        if self._input_nonfinite:
            reasons.append(f"the input has NaN/Inf in {self._input_nonfinite} sample(s)")
        if torch.is_tensor(loss) and not bool(torch.isfinite(loss.detach()).all()):
            reasons.append(f"loss = {float(loss.detach().float().mean())}")
        # within an accumulation window the gradients are sums, but an earlier bad batch already set them to
        # None (below), so a non-finite gradient here was made by this batch. Under a loss scaler (16-mixed)
        # a non-finite gradient is the scaler's overflow signal: it skips that step and lowers its scale, so
        # the gradients are left to it (clearing them would hide the overflow and the scale would never fall).
        grads = [] if self._loss_scaler_active() else [(n, p.grad) for n, p in self.named_parameters()
                                                       if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for _, g in grads]).all()):
            bad = [n for n, g in grads if not bool(torch.isfinite(g).all())]
            reasons.append(f"non-finite gradient in {len(bad)} parameter(s), e.g. {', '.join(bad[:3])}")
        counts = self._record.status_counts if self._record is not None else {}
        if counts.get("nonfinite", 0):
            reasons.append(f"{counts['nonfinite']} solve(s) ended nonfinite")
        return reasons

    def _loss_scaler_active(self) -> bool:
        """Whether Lightning's mixed-precision plugin scales the loss (``precision="16-mixed"``)."""
        if self._trainer is None:
            return False
        plugin = self._trainer.precision_plugin
        return isinstance(plugin, MixedPrecision) and plugin.scaler is not None

    def _judge_backward(self, loss: Any) -> bool:
        """The ``on_nonfinite`` policy (see [`DEQTrainingConfig`][deqlab.spec.DEQTrainingConfig]) for the batch just back-propagated.

        Runs after every backward: each micro-batch of a gradient-accumulation window and each
        ``manual_backward``. A batch is bad when its input, loss or any gradient is non-finite, or any of
        its solves ended ``nonfinite``. Under DDP the decision is all-reduced (any rank bad → every rank
        treats the batch as bad), so the replicas never drift apart and ``raise`` stops every rank together.
        ``raise`` raises `NonFiniteBatchError` at once. ``skip`` sets every gradient to ``None``, puts the
        buffers (BatchNorm running statistics) back as they were before the batch, counts it in
        ``train/skipped_batches`` and marks the window, whose optimizer step `_close_window` then drops
        (under manual optimisation at once). Both messages name the batch, the solver status and where the
        non-finite values first appear (the input batch, the initial guess, the solve, the loss).

        Returns:
            Whether the batch was skipped.
        """
        reasons = self._nonfinite_reasons(loss)
        local_bad = bool(reasons)
        strategy = self._trainer.strategy if self._trainer is not None else None
        any_bad = strategy.reduce_boolean_decision(local_bad, all=False) if strategy is not None else local_bad
        if not any_bad:
            return False
        if not local_bad:
            reasons.append("another DDP rank's batch was non-finite (all ranks skip together)")
        counts = self._record.status_counts if self._record is not None else {}
        status = ", ".join(f"{k}={v}" for k, v in counts.items() if v) or "no DEQ solve"
        message = (f"non-finite training batch {self._batch_idx} (epoch {self.current_epoch}, global step "
                   f"{self.global_step}): {'; '.join(reasons)}; solver status: {status}; {self._nonfinite_source()}")
        if self.deq_config.on_nonfinite == "raise":
            raise NonFiniteBatchError(f"{message}. (on_nonfinite='skip' drops such batches and trains on.)")
        self._drop_gradients()
        self._restore_buffers()
        self._skipped_batches += 1
        if self._record is not None:
            self._record.skipped = True
        self._window_bad.append(f"batch {self._batch_idx} (solver status: {status})")
        if self._window_message is None:
            self._window_message = message
        if not self.automatic_optimization:
            self._close_window(self._batch_idx)
        return True

    def _drop_gradients(self) -> None:
        """Make the coming optimizer step a no-op for every parameter.

        Gradients become ``None`` (the optimizer then leaves each weight and its moment estimates alone).
        Under manual optimisation with a loss scaler (16-mixed) they become ``inf`` instead: the user's
        ``opt.step()`` goes through the scaler, which refuses a step without any gradient but skips one with
        non-finite gradients, as it does for its own overflows (it also halves its scale, which regrows).
        """
        overflow = not self.automatic_optimization and self._loss_scaler_active()
        for p in self.parameters():
            p.grad = torch.full_like(p, float("inf")) if overflow and p.requires_grad else None

    def _close_window(self, batch_idx: int) -> bool:
        """Before the optimizer step that ends a window (``batch_idx`` its last batch): drop the window's
        update when any of its batches was non-finite, and warn once per run naming those batches.

        Returns:
            Whether the window's update is dropped.
        """
        bad, message, start = self._window_bad, self._window_message, self._window_start
        self._window_bad, self._window_message, self._window_start = [], None, None
        if not bad:
            return False
        self._drop_gradients()
        if self._record is not None:
            self._record.skipped = True  # this step's update is dropped, whichever batch of the window was bad
        if self._warned_nonfinite:
            return True
        self._warned_nonfinite = True
        window = ""
        if start is not None and start != batch_idx:
            window = (f" With gradient accumulation the optimizer step of batches {start}-{batch_idx} is dropped "
                      f"as a whole; its non-finite batches: {', '.join(bad)}.")
        warnings.warn(f"deqlab: skipped the update of {message}.{window} Weights are unchanged; further skipped "
                      "batches are counted in train/skipped_batches without another warning (on_nonfinite='raise' "
                      "stops instead).", NonFiniteBatchWarning, stacklevel=2)
        return True

    def _nonfinite_source(self) -> str:
        """Where the non-finite values first appear, in data-flow order, so that a NaN pixel is blamed on
        the data and not on the shortcut or the solver downstream of it."""
        x = self._batch_input
        if self._input_nonfinite and x is not None:
            bad = (~torch.isfinite(x.detach())).reshape(x.shape[0], -1).any(dim=1)
            idx = bad.nonzero().flatten().tolist()
            return (f"source: the input batch itself has NaN/Inf in {len(idx)} sample(s) (indices {idx[:8]}): the "
                    "data, not the model, produced them (the model ran on a zero-filled copy whose update is dropped)")
        for i, sol in enumerate(self._pending):
            if sol.u0 is not None and not all(bool(torch.isfinite(t.detach()).all()) for t in _parts(sol.u0)):
                return f"source: DEQ layer {i}'s initial guess u0 is non-finite for a finite input"
        for i, sol in enumerate(self._pending):
            if not all(bool(torch.isfinite(t.detach()).all()) for t in _parts(sol.z_star)):
                return f"source: DEQ layer {i}'s solve returned a non-finite z* from a finite input and u0"
        return "source: the input, u0 and z* are finite; the loss or the backward produced the non-finite values"

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()
        self._window_bad, self._window_message, self._window_start = [], None, None  # windows end with the epoch
        self._buffer_owners = None  # listed again at the first batch (a model may have changed between fits)

    def on_train_epoch_end(self) -> None:
        if self._epoch_start is not None and self.deq_config.log_timing:
            self.log("time/train_epoch", time.perf_counter() - self._epoch_start, on_step=False, on_epoch=True, sync_dist=True)

    # ------------------------------------------------------------------ evaluation hooks
    def _solver_mode_for_eval(self) -> None:
        """Validation and test always run the solver, also during pretraining: every DEQ layer enters
        ``fixed_depth_mode(0)`` until the evaluation epoch ends (the protocol restores its depth)."""
        self._restore_depths()
        stack = contextlib.ExitStack()
        for layer in self.deq_layers():
            stack.enter_context(layer.fixed_depth_mode(0))
        self._eval_depths = stack

    def _restore_depths(self) -> None:
        if self._eval_depths is not None:
            self._eval_depths.close()
            self._eval_depths = None

    def on_validation_epoch_start(self) -> None:
        self._solver_mode_for_eval()

    def on_validation_epoch_end(self) -> None:
        self._restore_depths()
        if self.trainer.sanity_checking:
            return
        acc = self.metrics["val_accuracy"] if "val_accuracy" in self.metrics else None
        if acc is not None and acc.update_count > 0:
            self.log("hp/val_accuracy", acc.compute(), on_step=False, on_epoch=True)

    def on_test_epoch_start(self) -> None:
        self._solver_mode_for_eval()

    def on_test_epoch_end(self) -> None:
        self._restore_depths()

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Lightning's ``load_from_checkpoint``, after `check_checkpoint_file` on the file, with a failed read
        reported by name (`damage_reported_by_name`)."""
        check_checkpoint_file(checkpoint_path)
        with damage_reported_by_name(checkpoint_path):
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

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

    def on_fit_start(self) -> None:
        self._check_jacobian_setting()
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
            cfg.optimizer,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            betas=cfg.betas,
        )
        total: Any = cfg.scheduler_steps
        if cfg.scheduler == "cosine" and total is None and self._trainer is not None:
            # asked at the first step, not now: asking now sets the data up before a checkpoint's loader
            # positions are restored, and Lightning then drops them (see CosineToTrainingEnd)
            trainer = self._trainer
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
        """deqlab's checkpoint policies, `CheckpointIntegrity` and `ExactResume` (always), and the figure
        callbacks when ``log_figures``. A subclass that returns its own callbacks should return
        ``[*super().configure_callbacks(), ...]``: without the policies its checkpoints lack deqlab's entry and a
        resumed run is not exact (the first training step warns). A callback of one of these types given to
        the Trainer takes precedence (one instance each)."""
        from deqlab.lightning.callbacks import ConvergenceFigure, NFEHistogram

        existing = list(self.trainer.callbacks) if self._trainer is not None else []
        ours: List[pl.Callback] = [CheckpointIntegrity(), ExactResume()]
        if self.deq_config.log_figures:
            ours += [NFEHistogram(), ConvergenceFigure()]
        return [cb for cb in ours if not any(isinstance(c, type(cb)) for c in existing)]

    def _check_policies_attached(self) -> None:
        """Warn once per Trainer when deqlab's checkpoint policies are not among its callbacks (a
        ``configure_callbacks`` override that does not return ``super().configure_callbacks()``)."""
        trainer = self._trainer
        if trainer is None or self._policies_checked == id(trainer):
            return
        self._policies_checked = id(trainer)
        missing = [cls.__name__ for cls in (ExactResume, CheckpointIntegrity)
                   if not any(isinstance(c, cls) for c in trainer.callbacks)]
        if missing:
            warnings.warn(
                f"deqlab: {type(self).__name__} trains without deqlab's {' and '.join(missing)} callback(s): its "
                "configure_callbacks does not return super().configure_callbacks(). Its checkpoints then lack deqlab's "
                "entry (RNG states, loader position) and a run resumed from them differs from an uninterrupted one. "
                "Return [*super().configure_callbacks(), ...] or pass deqlab.lightning.ExactResume() and "
                "CheckpointIntegrity() to the Trainer.", ResumeWarning, stacklevel=2)


def _backward_unconverged_fraction(solutions: List[DeepEquilibriumSolution]) -> Optional[float]:
    """Fraction of samples whose adjoint solve did not converge, over the records that say so.

    ``backward_converged`` is filled by the backward (``None`` until one ran, and for backward modes
    without a solve); a bool covers the layer's whole batch, a tensor is per sample.
    """
    flags: List[Tensor] = []
    for s in solutions:
        conv = s.backward_converged
        if conv is None:
            continue
        n = int(s.residual.numel()) if s.residual is not None else 1
        flags.append(conv.detach().reshape(-1).float() if torch.is_tensor(conv)
                     else torch.full((n,), float(bool(conv))))
    if not flags:
        return None
    return float(1.0 - torch.cat(flags).mean())


def _parts(state: Any) -> List[Tensor]:
    return list(state) if isinstance(state, (list, tuple)) else [state]


def _nonfinite_samples(x: Any) -> int:
    """Samples of a floating-point input batch with a NaN/Inf entry (0 for other inputs)."""
    if not (torch.is_tensor(x) and x.is_floating_point() and x.dim() >= 1 and x.shape[0] > 0):
        return 0
    return int((~torch.isfinite(x.detach())).reshape(x.shape[0], -1).any(dim=1).sum())
