"""SVHN (32×32 colour house-number digits), trained with the same 2-scale MDEQ as CIFAR-10."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torchvision
from torch.utils.data import Dataset
from torchvision.transforms import v2

from deqlab.data.base import PathLike, Split, TorchvisionDataModule, normalize_transform

__all__ = ["SVHNDataModule", "SVHN_MEAN", "SVHN_STD"]

SVHN_MEAN = (0.4104, 0.4160, 0.4421)
SVHN_STD = (0.1959, 0.1988, 0.1953)
_FILES: dict[str, str] = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


class SVHNDataModule(TorchvisionDataModule):
    """SVHN (cropped digits, format 2) through ``torchvision.datasets.SVHN``.

    On disk: ``<data_dir>/SVHN/train_32x32.mat`` and ``<data_dir>/SVHN/test_32x32.mat`` (the
    official MATLAB files: ``X`` of shape (32, 32, 3, N) uint8, ``y`` of shape (N, 1) with labels
    1..10 where 10 is the digit 0; torchvision maps 10 → 0). The ``SVHN`` sub-folder keeps the
    datasets apart when they share one ``data_dir``. The ``extra`` split is not used (the paper
    trains on ``train`` only). torchvision verifies the files' MD5 checksums.

    Args:
        data_dir: root containing ``SVHN/``. Default ``"data"``, where the experiment configs look.
        **kwargs: ``download`` (the two ``.mat`` files), ``augment`` (random 32×32 crops of the
            4-pixel-padded image; not in the paper's protocol; no flips, digits are chiral) and the loader
            options of [`BaseDataModule`][deqlab.data.BaseDataModule] (the paper's batch size is 64).

    Normalisation: mean (0.4104, 0.4160, 0.4421), std (0.1959, 0.1988, 0.1953).

    Raises:
        ValueError: from [`BaseDataModule`][deqlab.data.BaseDataModule] for an invalid loader option.

    Examples:
        >>> from deqlab.data import SVHNDataModule
        >>> dm = SVHNDataModule("/nonexistent/data")
        >>> dm.num_classes, dm.input_shape, dm.batch_size
        (10, (3, 32, 32), 64)
        >>> [p.name for p in dm.missing_paths()]
        ['train_32x32.mat', 'test_32x32.mat']
        >>> dm = SVHNDataModule("data", download=True)
        >>> dm.prepare_data()  # doctest: +SKIP
    """

    name = "SVHN"
    num_classes: int = 10
    input_shape: tuple[int, ...] = (3, 32, 32)

    def __init__(self, data_dir: PathLike = "data", **kwargs: Any) -> None:
        super().__init__(data_dir, **kwargs)
        self.save_hyperparameters()

    @property
    def root(self) -> Path:
        return self.data_dir / "SVHN"

    def expected_paths(self, split: Split) -> list[Path]:
        return [self.root / _FILES[split]]

    def layout_hint(self) -> str:
        return f"Expected SVHN files {_FILES['train']} and {_FILES['test']} in {self.root}."

    def download_data(self) -> None:
        for split in ("train", "test"):
            if self.missing_paths(split):
                torchvision.datasets.SVHN(self.root, split=split, download=True)

    def load_split(self, split: Split, transform: Optional[Callable]) -> Dataset:
        return torchvision.datasets.SVHN(self.root, split=split, transform=transform, download=False)

    def train_transform(self) -> Callable:
        augment = [v2.RandomCrop(32, padding=4)] if self.augment else []
        return normalize_transform(SVHN_MEAN, SVHN_STD, augment=augment)

    def eval_transform(self) -> Callable:
        return normalize_transform(SVHN_MEAN, SVHN_STD)
