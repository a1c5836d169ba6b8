"""Shared helpers of tests/lightning (not a test module)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

REPO = Path(__file__).resolve().parents[2]
MNIST_DIR = REPO.parent / "shared" / "data"

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
warnings.filterwarnings("ignore", message=".*LitLogger.*")


def digits(batch_size: int = 64, **kwargs: Any):
    from deqlab.data import DigitsDataModule

    return DigitsDataModule(batch_size=batch_size, **kwargs)


def trainer(**overrides: Any) -> pl.Trainer:
    """A quiet single-process CPU Trainer; tests override what they check."""
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    options.update(overrides)
    return pl.Trainer(**options)
