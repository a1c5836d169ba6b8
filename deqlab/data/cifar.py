"""CIFAR-10 (32×32 colour images, 10 classes), the paper's main image benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torchvision
from torch.utils.data import Dataset
from torchvision.transforms import v2

from deqlab.data.base import PathLike, Split, TorchvisionDataModule, normalize_transform

__all__ = ["CIFAR10DataModule", "CIFAR10_MEAN", "CIFAR10_STD"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10 through ``torchvision.datasets.CIFAR10``.

    On disk (the official "python version"): ``<data_dir>/cifar-10-batches-py/`` holding the
    pickles ``data_batch_1`` … ``data_batch_5``, ``test_batch`` and ``batches.meta``. torchvision
    verifies every file's MD5 checksum and needs all of them for either split. The 50k training
    images are split into train/val with ``seed``; the official 10k test batch is the test set.

    Args:
        data_dir: root containing ``cifar-10-batches-py/``. Default ``"data"``, where the experiment
            configs look.
        batch_size: samples per batch (paper v1: 32 discrete / 64 continuous; v2+ configs: 128). Default
            128, the v2+ configs' value (the experiments set the v1 sizes themselves).
        **kwargs: ``download``, ``augment`` (random 32×32 crop of the 4-pixel-padded image + horizontal
            flip: the paper's "large" config; off by default like the v1 protocol and the "tiny" config)
            and the other loader options of [`BaseDataModule`][deqlab.data.BaseDataModule].

    Normalisation: mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010).

    Raises:
        ValueError: from [`BaseDataModule`][deqlab.data.BaseDataModule] for an invalid loader option.

    Examples:
        >>> from deqlab.data import CIFAR10DataModule
        >>> dm = CIFAR10DataModule("/nonexistent/data", augment=True)
        >>> dm.num_classes, dm.input_shape, dm.batch_size
        (10, (3, 32, 32), 128)
        >>> dm.setup("fit")
        Traceback (most recent call last):
        ...
        FileNotFoundError: CIFAR-10 data not found: missing under /nonexistent/data: cifar-10-batches-py/data_batch_1, ...
        >>> dm = CIFAR10DataModule("data", download=True)
        >>> dm.prepare_data()  # doctest: +SKIP
    """

    name = "CIFAR-10"
    num_classes: int = 10
    input_shape: tuple[int, ...] = (3, 32, 32)

    def __init__(self, data_dir: PathLike = "data", *, batch_size: int = 128, **kwargs: Any) -> None:
        super().__init__(data_dir, batch_size=batch_size, **kwargs)
        self.save_hyperparameters()

    @property
    def root(self) -> Path:
        return self.data_dir / "cifar-10-batches-py"

    def expected_paths(self, split: Split) -> list[Path]:
        return [self.root / f for f in _FILES]

    def layout_hint(self) -> str:
        return f"Expected the CIFAR-10 python batches in {self.root} ({', '.join(_FILES)})."

    def download_data(self) -> None:
        torchvision.datasets.CIFAR10(self.data_dir, train=True, download=True)

    def load_split(self, split: Split, transform: Optional[Callable]) -> Dataset:
        return torchvision.datasets.CIFAR10(self.data_dir, train=split == "train", transform=transform, download=False)

    def train_transform(self) -> Callable:
        augment = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if self.augment else []
        return normalize_transform(CIFAR10_MEAN, CIFAR10_STD, augment=augment)

    def eval_transform(self) -> Callable:
        return normalize_transform(CIFAR10_MEAN, CIFAR10_STD)
