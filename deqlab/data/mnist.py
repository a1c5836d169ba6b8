"""MNIST (28×28 grey digits), the dataset of the paper's dense and 2-scale conv experiments."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Tuple

import torchvision
from torch.utils.data import Dataset
from torchvision.transforms import v2

from deqlab.data.base import PathLike, Split, TorchvisionDataModule, normalize_transform

__all__ = ["MNISTDataModule", "MNIST_MEAN", "MNIST_STD"]

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class MNISTDataModule(TorchvisionDataModule):
    """MNIST through ``torchvision.datasets.MNIST``.

    On disk (torchvision's raw layout): ``<data_dir>/MNIST/raw/`` holding the four uncompressed IDX
    files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``. The official 60k training set is split into train/val with
    ``seed``; the official 10k test set is the test set.

    Args:
        data_dir: root containing ``MNIST/raw``. Default ``"data"``, where the experiment configs look.
        flatten: yield ``(784,)`` vectors for the dense model instead of ``(1, 28, 28)`` images. Default
            ``False``: images, for the conv model (the dense models flatten inputs themselves too).
        normalize: standardise pixels with MNIST's mean and std. Default ``True``; ``False`` gives the raw
            ``[0, 1]`` pixels the January-2022 reference script trained on (``paper_repro``'s v1 protocol).
        **kwargs: ``download``, ``augment`` (random 28×28 crops of the 2-pixel-padded image; not part of
            the paper's protocol, which trains MNIST without augmentation; never flips, digits are chiral)
            and the loader options of [`BaseDataModule`][deqlab.data.BaseDataModule] (``batch_size``: the paper
            uses 32 for the dense model, 64 for the conv model).

    Normalisation: mean 0.1307, std 0.3081 (PAPER_PROTOCOLS.md; the original script used raw pixels,
    ``normalize=False``).

    Raises:
        ValueError: from [`BaseDataModule`][deqlab.data.BaseDataModule] for an invalid loader option.

    Examples:
        Sizes are known before any file is read; ``setup`` names what is missing:

        >>> from deqlab.data import MNISTDataModule
        >>> dm = MNISTDataModule("/nonexistent/data", flatten=True, batch_size=32)
        >>> dm.num_classes, dm.input_shape
        (10, (784,))
        >>> dm.setup("fit")
        Traceback (most recent call last):
        ...
        FileNotFoundError: MNIST data not found: missing under /nonexistent/data: MNIST/raw/train-images-idx3-ubyte, ...
        >>> dm = MNISTDataModule("data", download=True)
        >>> dm.prepare_data()  # doctest: +SKIP
    """

    name = "MNIST"
    num_classes: int = 10

    def __init__(self, data_dir: PathLike = "data", *, flatten: bool = False, normalize: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(data_dir, **kwargs)
        self.save_hyperparameters()
        self.flatten = flatten
        self.normalize = bool(normalize)
        self.input_shape: tuple[int, ...] = (784,) if flatten else (1, 28, 28)

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "MNIST" / "raw"

    def expected_paths(self, split: Split) -> list[Path]:
        # torchvision's MNIST refuses to load either split unless all four files exist.
        return [self.raw_dir / f for f in _RAW_FILES]

    def layout_hint(self) -> str:
        return f"Expected MNIST raw files in {self.raw_dir} ({', '.join(_RAW_FILES)}; uncompressed IDX files)."

    def download_data(self) -> None:
        torchvision.datasets.MNIST(self.data_dir, train=True, download=True)

    def load_split(self, split: Split, transform: Optional[Callable]) -> Dataset:
        return torchvision.datasets.MNIST(self.data_dir, train=split == "train", transform=transform, download=False)

    def train_transform(self) -> Callable:
        augment = [v2.RandomCrop(28, padding=2)] if self.augment else []
        return normalize_transform(*self._stats(), augment=augment, flatten=self.flatten)

    def eval_transform(self) -> Callable:
        return normalize_transform(*self._stats(), flatten=self.flatten)

    def _stats(self) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """The (mean, std) the transforms standardise with: MNIST's, or (0, 1) for raw pixels."""
        return (MNIST_MEAN, MNIST_STD) if self.normalize else ((0.0,), (1.0,))
