"""A run's checkpoint: saved at every epoch's end, resumed from when the run starts again, deleted once the
run's row is written.

Why: a 25-epoch MNIST run takes up to three CPU hours here and a CIFAR-10 run days; a job that is killed
(a session's end, a pre-empted SLURM task) would otherwise start over. ``--grid`` already skips finished
runs; this makes an unfinished one lose at most the epoch it was in. The checkpoint is Lightning's own
(model, optimizer, scheduler, loop and callback state: the `RunRecorder`'s timings included, so the run's
row reports the whole run), written by ``trainer.save_checkpoint``; deqlab's ``ExactResume`` policy
restores the data order and random state with it. Not Lightning's ``ModelCheckpoint``: it writes the file
in place, and a job killed while writing would leave a checkpoint that cannot be loaded; here it is written
beside the old one and renamed over it (atomic on POSIX), so there is always a whole checkpoint or none.

Where: ``<results-dir>/checkpoints/<cell name>/last.ckpt`` (the cell name is unique per run key, so a run
with another schedule, subset or process count never resumes this one), beside ``resume.json``, which
keeps the TensorBoard version so a resumed run keeps writing to its own folder.

Imports Lightning at module level: ``paper_repro.run`` imports it only when a run starts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl

__all__ = ["RunCheckpoint", "CHECKPOINTS_DIR"]

CHECKPOINTS_DIR = "checkpoints"


class RunCheckpoint:
    """The checkpoint folder of one run.

    Args:
        results_dir: the run's ``--results-dir``.
        name: the run's cell name (``RunConfig.cell_name``).
    """

    def __init__(self, results_dir: Path, name: str) -> None:
        self.dir = Path(results_dir) / CHECKPOINTS_DIR / name
        self.path = self.dir / "last.ckpt"
        self.meta = self.dir / "resume.json"

    def resume_from(self) -> Optional[Path]:
        """The checkpoint to resume from, ``None`` for a fresh start."""
        return self.path if self.path.is_file() else None

    def callback(self) -> Any:
        """A callback that writes ``last.ckpt`` at every epoch's end (after the epoch's evaluation)."""
        return _EpochCheckpoint(self.path)

    def log_version(self) -> Optional[int]:
        """The TensorBoard version the run's first attempt wrote to (``None`` when unknown)."""
        try:
            version = json.loads(self.meta.read_text(encoding="utf-8")).get("log_version")
        except (OSError, ValueError):
            return None
        return version if isinstance(version, int) else None

    def remember_log_version(self, version: Any) -> None:
        if isinstance(version, int):
            self.dir.mkdir(parents=True, exist_ok=True)
            self.meta.write_text(json.dumps({"log_version": version}), encoding="utf-8")

    def remove(self) -> None:
        """Delete the run's checkpoint folder (the run is recorded)."""
        shutil.rmtree(self.dir, ignore_errors=True)


class _EpochCheckpoint(pl.Callback):
    """``trainer.save_checkpoint`` at every training epoch's end into a temporary file, renamed over ``path``."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(str(tmp))  # every rank takes part; rank zero writes
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier("paper_repro.checkpoint")
