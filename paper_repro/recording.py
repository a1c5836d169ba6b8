"""The Lightning callback that measures a run: step and phase times, per-epoch rows, progress lines.

Imports Lightning at module level; ``paper_repro.run`` imports this module only when a run starts, so
``--help``, ``--dry-run`` and ``--list-grid`` never pay for it. The columns it fills are
``paper_repro.results.EPOCH_COLUMNS``.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pytorch_lightning as pl
import torch

from paper_repro.plan import RunConfig
from paper_repro.results import EPOCH_COLUMNS, append_row, drop_unfinished_epoch_rows

__all__ = ["RunRecorder", "as_float", "median", "mean", "fmt", "hms"]


# ---------------------------------------------------------------------------------------------- numbers
def as_float(value: Any) -> Optional[float]:
    """``value`` (a tensor, a number, ``None``) as a float; ``None`` for what is missing or NaN, so an
    unmeasured quantity is an empty CSV cell rather than ``nan``."""
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def median(values: Sequence[float]) -> Optional[float]:
    """The median, ``None`` for no values (step times: robust to the first, compiling step)."""
    return statistics.median(values) if values else None


def mean(values: Sequence[float]) -> Optional[float]:
    """The mean, ``None`` for no values."""
    return statistics.fmean(values) if values else None


def fmt(v: Optional[float], spec: str = ".4f") -> str:
    """A number for a progress line; ``-`` when missing."""
    return "-" if v is None else format(v, spec)


def hms(seconds: float) -> str:
    """``H:MM:SS``, for elapsed time and ETA."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------------------------------------- callback
class RunRecorder(pl.Callback):
    """Per-step wall time and the module's logged step values, per-epoch rows for the epoch table (written by
    rank zero), and progress lines with an ETA.

    Args:
        cfg: the run.
        epochs_csv: where the epoch rows go (``None``: nowhere).
        total: optimizer steps the run will take (for the ETA).
        progress: ``lines`` prints a progress line every ``log_every`` steps; ``bar`` / ``none`` print none.
        log_every: steps between progress lines.
    """

    def __init__(self, cfg: RunConfig, epochs_csv: Optional[Path], total: int, progress: str, log_every: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.epochs_csv = epochs_csv
        self.total = total
        self.progress = progress
        self.log_every = log_every
        self.step_times: List[float] = []
        self.phase: Dict[str, List[float]] = {"forward": [], "backward": [], "optimizer": []}
        self.epoch_times: List[float] = []
        self.full_epochs = 0
        self.last_epoch: Dict[str, Any] = {}
        self._epoch: Dict[str, List[float]] = {}
        self._t0 = 0.0
        self._epoch_t0 = 0.0
        self._val_t0 = 0.0
        self._val_s = 0.0
        self._validated = False
        self._fit_t0 = 0.0
        self._fit_before = 0.0  # training seconds of earlier attempts (restored from a checkpoint)
        self._start_step = 0  # the global step this attempt started at (0, or where a checkpoint left off)
        self.resumed_epoch: Optional[int] = None  # the epoch a checkpoint resumed at, None for a fresh start

    # --- checkpointed state: what a resumed run needs to report the whole run, not its last attempt
    def state_dict(self) -> Dict[str, Any]:
        return dict(
            step_times=list(self.step_times),
            phase={k: list(v) for k, v in self.phase.items()},
            epoch_times=list(self.epoch_times),
            full_epochs=self.full_epochs,
            last_epoch=dict(self.last_epoch),
            fit_s=self.fit_seconds(),
        )

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.step_times = list(state_dict.get("step_times", []))
        self.phase.update({k: list(v) for k, v in state_dict.get("phase", {}).items()})
        self.epoch_times = list(state_dict.get("epoch_times", []))
        self.full_epochs = int(state_dict.get("full_epochs", 0))
        self.last_epoch = dict(state_dict.get("last_epoch", {}))
        self._fit_before = float(state_dict.get("fit_s", 0.0))

    def fit_seconds(self) -> float:
        """Wall seconds of training so far, over every attempt of the run (0 before training starts)."""
        return self._fit_before + (time.perf_counter() - self._fit_t0 if self._fit_t0 else 0.0)

    @staticmethod
    def _sync(module: Any) -> None:
        # CUDA runs asynchronously: without a sync the step time would be the launch time, not the work.
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    # --- steps
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._fit_t0 = time.perf_counter()
        self._start_step = int(trainer.global_step)
        if self._start_step > 0:  # restored from a checkpoint (load_state_dict ran before this hook)
            self.resumed_epoch = int(trainer.current_epoch)
            if trainer.is_global_zero and self.epochs_csv is not None:
                # an epoch the killed attempt recorded after its last checkpoint is trained again: its row goes
                drop_unfinished_epoch_rows(self.epochs_csv, self.cfg, self.resumed_epoch)
            if self.progress == "lines" and trainer.is_global_zero:
                print(
                    f"[{self.cfg.label}] resumed at epoch {self.resumed_epoch} (step {self._start_step}) after "
                    f"{hms(self._fit_before)} of training",
                    flush=True,
                )

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._epoch = {"loss": [], "accuracy": [], "nfe": [], "backward_nfe": [], "reference_nfe": []}
        self._epoch_t0 = time.perf_counter()
        self._val_s = 0.0
        self._validated = False

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._sync(pl_module)
        self.step_times.append(time.perf_counter() - self._t0)
        m = trainer.callback_metrics
        for name in self.phase:
            v = as_float(m.get(f"time/{name}"))
            if v is not None:
                self.phase[name].append(v)
        for key, metric in (
            ("loss", "train/loss"),
            ("accuracy", "train/batch_accuracy"),
            ("nfe", "solver/train_nfe"),
            ("backward_nfe", "solver/train_backward_nfe"),
            ("reference_nfe", "solver/train_reference_nfe"),
        ):
            v = as_float(m.get(metric))
            if v is not None:
                self._epoch[key].append(v)
        step = trainer.global_step
        if self.progress == "lines" and trainer.is_global_zero and (step % self.log_every == 0 or step == self.total):
            segment = time.perf_counter() - self._fit_t0  # this attempt: the rate to extrapolate from
            elapsed = self._fit_before + segment
            eta = segment / max(step - self._start_step, 1) * max(self.total - step, 0)
            print(
                f"[{self.cfg.label}] step {step}/{self.total} epoch {trainer.current_epoch} "
                f"loss {fmt(as_float(m.get('train/loss')))} acc {fmt(as_float(m.get('train/batch_accuracy')))} "
                f"nfe {fmt(as_float(m.get('solver/train_nfe')), '.1f')} "
                f"(paper's count {fmt(as_float(m.get('solver/train_reference_nfe')), '.1f')}) "
                f"bnfe {fmt(as_float(m.get('solver/train_backward_nfe')), '.1f')} "
                f"elapsed {hms(elapsed)} eta {hms(eta)}",
                flush=True,
            )

    # --- validation (the test set, per epoch)
    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        self._val_s += time.perf_counter() - self._val_t0
        self._validated = True
        if self.progress == "lines" and trainer.is_global_zero:
            m = trainer.callback_metrics
            print(
                f"[{self.cfg.label}] epoch {trainer.current_epoch} test accuracy "
                f"{fmt(as_float(m.get('val/accuracy')))} nfe {fmt(as_float(m.get('solver/val_nfe')), '.1f')}",
                flush=True,
            )

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        seconds = time.perf_counter() - self._epoch_t0 - self._val_s  # training only: the evaluation is timed apart
        n = len(self._epoch["loss"]) or len(self.step_times)
        if n >= trainer.num_training_batches and trainer.num_training_batches > 0:
            self.epoch_times.append(seconds)
            self.full_epochs += 1
        m = trainer.callback_metrics
        row = self._row(trainer, "train", seconds)
        if self._validated:
            row.update(
                eval_accuracy=as_float(m.get("val/accuracy")),
                eval_explicit_accuracy=as_float(m.get("val/explicit_accuracy")),
                eval_nfe=as_float(m.get("solver/val_nfe")),
                eval_loss=as_float(m.get("val/loss")),
                eval_reference_nfe=as_float(m.get("solver/val_reference_nfe")),
            )
        self.last_epoch = row
        if trainer.is_global_zero and self.epochs_csv is not None:
            append_row(self.epochs_csv, row, EPOCH_COLUMNS)

    def _row(self, trainer: Any, stage: str, seconds: Optional[float]) -> Dict[str, Any]:
        cfg, e = self.cfg, self._epoch
        return dict(
            experiment=cfg.experiment,
            arch=cfg.arch,
            model_type=cfg.model_type,
            solver=cfg.solver,
            jac_reg=cfg.jacobian_regularization,
            seed=cfg.seed,
            stage=stage,
            epoch=trainer.current_epoch,
            step=trainer.global_step,
            train_loss=mean(e.get("loss", [])),
            train_accuracy=mean(e.get("accuracy", [])),
            train_nfe=mean(e.get("nfe", [])),
            train_backward_nfe=mean(e.get("backward_nfe", [])),
            train_time_s=seconds,
            protocol=cfg.protocol,
            ode_solver=cfg.ode_solver,
            train_reference_nfe=mean(e.get("reference_nfe", [])),
        )

    def test_row(self, trainer: Any, metrics: Dict[str, Any]) -> Dict[str, Any]:
        """The epoch table's row of the final test (stage ``test``), under the epoch trained last."""
        row = self._row(trainer, "test", None)
        row["epoch"] = self.last_epoch.get("epoch", trainer.current_epoch)
        row.update(
            eval_accuracy=as_float(metrics.get("test/accuracy")),
            eval_explicit_accuracy=as_float(metrics.get("test/explicit_accuracy")),
            eval_nfe=as_float(metrics.get("solver/test_nfe")),
            eval_loss=as_float(metrics.get("test/loss")),
            eval_reference_nfe=as_float(metrics.get("solver/test_reference_nfe")),
        )
        return row
