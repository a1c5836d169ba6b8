"""scikit-learn's bundled 8×8 handwritten digits: the offline default dataset of deqlab.

Why this dataset: it ships inside scikit-learn (no download, no files), has 1797 samples and 10
classes, and trains a small DEQ on a CPU in seconds, so demos, docs and tests always have real data.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from deqlab.data.base import BaseDataModule, split_indices, split_lengths

__all__ = ["DigitsDataModule"]

_N_SAMPLES = 1797
_MAX_PIXEL = 16.0  # the dataset's pixel values are integers 0..16


class DigitsDataModule(BaseDataModule):
    """Train/val/test loaders over ``sklearn.datasets.load_digits`` (1797 images of 8×8 pixels).

    Images are ``(1, 8, 8)`` float tensors (``(64,)`` with ``flatten=True``), scaled from 0..16 to
    [0, 1] and then normalised with the mean and std of the *training split only*, so no statistic
    leaks from validation or test data. Labels are ``torch.long`` in 0..9.

    The split is a seeded permutation: ``test_fraction`` of all samples is the test set,
    ``val_fraction`` of the rest is the validation set (defaults give 1294 / 144 / 359).

    Args:
        test_fraction: fraction of all samples used for testing. Default 0.2: the dataset has no official
            test split, and a fifth (359 images) is a usable test set that leaves most samples for training.
        flatten: yield ``(64,)`` vectors for dense models instead of ``(1, 8, 8)`` images. Default
            ``False``: images, as the torchvision data modules yield them.
        **kwargs: the loader options of [`BaseDataModule`][deqlab.data.BaseDataModule] (``batch_size``,
            ``num_workers``: 0 is best here, the whole dataset is one small tensor; ``seed``: seeds the
            split; ``val_fraction``: of the non-test samples; ``pin_memory``).

    Attributes:
        num_classes: 10.
        input_shape: ``(1, 8, 8)`` or ``(64,)``.
        mean: the normalisation mean (set by ``setup``).
        std: the normalisation standard deviation (set by ``setup``).

    Raises:
        ValueError: when the fractions leave no training samples or lie outside [0, 1), or for an
            invalid loader option.

    Examples:
        >>> from deqlab.data import DigitsDataModule
        >>> dm = DigitsDataModule(batch_size=32, flatten=True)
        >>> dm.setup()
        >>> len(dm.train_set), len(dm.val_set), len(dm.test_set)
        (1294, 144, 359)
        >>> images, labels = next(iter(dm.train_dataloader()))
        >>> images.shape, labels.dtype
        (torch.Size([32, 64]), torch.int64)
    """

    num_classes: int = 10

    def __init__(self, *, test_fraction: float = 0.2, flatten: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        split_lengths(_N_SAMPLES, self.val_fraction, test_fraction)  # validate the fractions now, not in setup
        self.test_fraction = test_fraction
        self.flatten = flatten
        self.input_shape: tuple[int, ...] = (64,) if flatten else (1, 8, 8)
        self.mean: Optional[float] = None
        self.std: Optional[float] = None

    def setup(self, stage: Optional[str] = None) -> None:
        """Build all three splits at once (idempotent); the whole dataset is ~460 KB."""
        if self.train_set is not None:
            return
        bunch = load_digits()
        x = torch.as_tensor(bunch.data, dtype=torch.float32) / _MAX_PIXEL
        y = torch.as_tensor(bunch.target, dtype=torch.long)
        lengths = split_lengths(len(x), self.val_fraction, self.test_fraction)
        train_idx, val_idx, test_idx = (
            torch.tensor(i, dtype=torch.long) for i in split_indices(len(x), lengths, self.seed)
        )
        train_x = x[train_idx]
        self.mean = float(train_x.mean())
        self.std = float(train_x.std())
        x = (x - self.mean) / self.std
        x = x.reshape(-1, *self.input_shape)
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self.test_set = TensorDataset(x[test_idx], y[test_idx])
