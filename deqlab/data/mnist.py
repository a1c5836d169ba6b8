"""MNIST (28×28 grey digits), the dataset of the paper's dense and 2-scale conv experiments."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Tuple

import torch
import torchvision
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from deqlab.data.base import PathLike, Split, TorchvisionDataModule, normalize_transform

__all__ = ["MNISTDataModule", "MNIST_MEAN", "MNIST_STD", "load_mnist_tensors"]

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

    def __init__(
        self, data_dir: PathLike = "data", *, flatten: bool = False, normalize: bool = True, **kwargs: Any
    ) -> None:
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


_IDX_MAGIC = {3: 2051, 1: 2049}  # dimensions -> magic number of an unsigned-byte IDX file


def _read_idx(path: Path, ndim: int) -> Tensor:
    """An unsigned-byte IDX file (plain, or gzipped when ``path`` ends in ``.gz``) as a uint8 tensor."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as fh:
        data = fh.read()
    magic = int.from_bytes(data[:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        raise ValueError(
            f"{path} is not an MNIST IDX file of {ndim} dimension(s): magic number {magic}, expected "
            f"{_IDX_MAGIC[ndim]}; re-download it (MNISTDataModule(data_dir, download=True).prepare_data())"
        )
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    start = 4 + 4 * ndim
    count = 1
    for d in shape:
        count *= d
    if len(data) - start < count:
        raise ValueError(
            f"{path} is truncated: its header promises {count} bytes, it holds {len(data) - start}; "
            f"re-download it (MNISTDataModule(data_dir, download=True).prepare_data())"
        )
    return torch.frombuffer(bytearray(data[start : start + count]), dtype=torch.uint8).view(*shape)


def load_mnist_tensors(
    data_dir: PathLike = "data",
    split: Literal["train", "test"] = "test",
    *,
    normalize: bool = True,
    flatten: bool = False,
    limit: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """One MNIST split as two in-memory tensors, images and labels, read straight from the IDX files.

    Why: benchmarks and timing scripts want a fixed batch of real digits, not a ``DataLoader``; reading the
    two IDX files directly skips building a torchvision dataset, and every script gets the same pixels and
    the same normalisation as [`MNISTDataModule`][deqlab.data.MNISTDataModule].

    Args:
        data_dir: root containing ``MNIST/raw`` (torchvision's layout). Each file may also be gzipped
            (``t10k-images-idx3-ubyte.gz``), as downloaded. Default ``"data"``, as the data module's.
        split: ``"test"`` (default: the 10k official test set, what timing a trained model wants) or
            ``"train"`` (the 60k official training set, not split into train/val).
        normalize: standardise pixels with MNIST's mean and std (default ``True``, as the data module);
            ``False`` gives raw ``[0, 1]`` pixels.
        flatten: ``(N, 784)`` vectors instead of ``(N, 1, 28, 28)`` images. Default ``False``.
        limit: read only the first ``limit`` samples. Default ``None``: all of them.

    Returns:
        ``(x, y)``: float32 images and int64 labels.

    Raises:
        ValueError: ``split`` is neither ``"train"`` nor ``"test"``, or a file is not an MNIST IDX file.
        FileNotFoundError: an image or label file is missing (the message names it and how to download it).

    Example:
        >>> from deqlab.data import load_mnist_tensors
        >>> load_mnist_tensors("/nonexistent/data", "test")
        Traceback (most recent call last):
        ...
        FileNotFoundError: MNIST test images not found: neither /nonexistent/data/MNIST/raw/t10k-images-idx3-ubyte nor ...
        >>> x, y = load_mnist_tensors("data", "test", limit=32)   # doctest: +SKIP
        >>> x.shape, y.shape                                       # doctest: +SKIP
        (torch.Size([32, 1, 28, 28]), torch.Size([32]))
    """
    if split not in ("train", "test"):
        raise ValueError(f"load_mnist_tensors: split must be 'train' or 'test', got {split!r}")
    raw = Path(data_dir) / "MNIST" / "raw"
    prefix = "train" if split == "train" else "t10k"
    out = []
    for kind, ndim in (("images", 3), ("labels", 1)):
        stem = raw / f"{prefix}-{kind}-idx{ndim}-ubyte"
        path = next((p for p in (stem, stem.with_name(stem.name + ".gz")) if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"MNIST {split} {kind} not found: neither {stem} nor {stem}.gz exists. Download MNIST with "
                f"MNISTDataModule({str(data_dir)!r}, download=True).prepare_data(), or pass the folder that "
                f"holds MNIST/raw"
            )
        out.append(_read_idx(path, ndim))
    images, labels = out
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = images.float() / 255.0
    if normalize:
        x = (x - MNIST_MEAN[0]) / MNIST_STD[0]
    x = x.reshape(len(x), -1) if flatten else x.unsqueeze(1)
    return x, labels.long()
