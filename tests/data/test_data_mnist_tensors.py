"""``load_mnist_tensors``: the one MNIST loader of the benchmarks and timing scripts reads the IDX files exactly
as torchvision's reader does (same pixels, labels and normalisation), plain or gzipped, and says what is
missing instead of failing inside a parser."""

from __future__ import annotations

import gzip
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision

from deqlab.data import MNIST_MEAN, MNIST_STD, load_mnist_tensors


@pytest.fixture
def root(tmp_path: Path, writers: SimpleNamespace) -> Path:
    writers.mnist(
        tmp_path,
        writers.random_images(20, (28, 28), seed=0),
        np.arange(20, dtype=np.uint8) % 10,
        writers.random_images(8, (28, 28), seed=1),
        (np.arange(8, dtype=np.uint8) + 3) % 10,
    )
    return tmp_path


@pytest.mark.parametrize("split", ["train", "test"])
def test_same_tensors_as_torchvisions_reader_with_the_data_modules_normalisation(root, split):
    ds = torchvision.datasets.MNIST(str(root), train=split == "train", download=False)
    want_x = ((ds.data.float() / 255.0 - MNIST_MEAN[0]) / MNIST_STD[0]).unsqueeze(1)
    x, y = load_mnist_tensors(root, split)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, want_x) and torch.equal(y, ds.targets)
    flat, _ = load_mnist_tensors(root, split, flatten=True)
    assert torch.equal(flat, want_x.reshape(len(want_x), -1))
    raw, _ = load_mnist_tensors(root, split, normalize=False, limit=3)
    assert raw.shape == (3, 1, 28, 28) and torch.equal(raw, ds.data[:3].float().unsqueeze(1) / 255.0)


def test_gzipped_files_read_the_same(root):
    plain = load_mnist_tensors(root, "test")
    raw = root / "MNIST" / "raw"
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / f"{name}.gz").write_bytes(gzip.compress((raw / name).read_bytes()))
        (raw / name).unlink()
    x, y = load_mnist_tensors(root, "test")
    assert torch.equal(x, plain[0]) and torch.equal(y, plain[1])


def test_missing_or_foreign_files_and_bad_splits_say_what_to_do(root, tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_mnist_tensors(tmp_path / "empty", "test")
    (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="test labels not found"):
        load_mnist_tensors(root, "test")
    (root / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + bytes(12))
    with pytest.raises(ValueError, match="not an MNIST IDX file"):
        load_mnist_tensors(root, "train")
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_mnist_tensors(root, "val")  # type: ignore[arg-type]
