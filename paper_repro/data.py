"""The paper's view of a deqlab data module: fixed subsets, and the test set as the per-epoch evaluation set.

Imports Lightning at module level; ``paper_repro.run`` imports this module only when a run starts, so
``--help``, ``--dry-run`` and ``--list-grid`` never pay for it.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset, Subset

__all__ = ["PaperData", "fixed_subset", "check_data"]


def fixed_subset(dataset: Dataset, n: Optional[int]) -> Dataset:
    """``n`` samples of ``dataset`` drawn once with seed 0, the same for every run and seed, so runs on a
    subset stay comparable; the whole dataset when ``n`` is ``None`` or not smaller."""
    if n is None or n >= len(dataset):  # type: ignore[arg-type]
        return dataset
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n].tolist()  # type: ignore[arg-type]
    return Subset(dataset, sorted(idx))


class PaperData(pl.LightningDataModule):
    """Wraps a deqlab data module: optional fixed subsets, and the test set as the per-epoch evaluation set
    (the paper reports test accuracy and NFE per epoch; its training set is the full official one).

    Args:
        inner: a deqlab data module built with ``val_fraction=0`` (``MNISTDataModule``, ...).
        train_subset: train on a fixed random ``train_subset`` samples (``None``: all).
        test_subset: evaluate on a fixed random ``test_subset`` samples (``None``: all).
    """

    def __init__(self, inner: Any, train_subset: Optional[int] = None, test_subset: Optional[int] = None) -> None:
        super().__init__()
        self.inner = inner
        self.train_subset = train_subset
        self.test_subset = test_subset
        self._subsetted: Dict[str, bool] = {"train": False, "test": False}

    def prepare_data(self) -> None:
        self.inner.prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        # Lightning calls setup once per stage (fit, then test): subset each split only the first time.
        if stage in (None, "fit", "validate"):
            self.inner.setup("fit")
            if not self._subsetted["train"]:
                self.inner.train_set = fixed_subset(self.inner.train_set, self.train_subset)
                self._subsetted["train"] = True
        self.inner.setup("test")
        if not self._subsetted["test"]:
            self.inner.test_set = fixed_subset(self.inner.test_set, self.test_subset)
            self._subsetted["test"] = True

    def train_dataloader(self) -> Any:
        return self.inner.train_dataloader()

    def val_dataloader(self) -> Any:
        return self.inner.test_dataloader()

    def test_dataloader(self) -> Any:
        return self.inner.test_dataloader()


def check_data(data: Any, args: argparse.Namespace) -> None:
    """Stop in one line naming the missing files and the expected layout when the dataset is not under
    ``--data-dir`` (and ``--download`` was not given), instead of a torchvision traceback."""
    missing = [] if getattr(args, "download", False) else data.missing_paths()
    if missing:
        raise SystemExit(
            f"error: {data.name} not found under {data.data_dir}: missing {', '.join(str(m) for m in missing)}. "
            f"{data.layout_hint()} Pass --data-dir to the folder that holds it, or --download where possible."
        )
