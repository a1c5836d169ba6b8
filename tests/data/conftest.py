"""Writers of tiny datasets in the real on-disk formats, so the tests run torchvision's own readers.

Only one thing is faked, and only where the tests ask for it (fixture ``skip_md5``): torchvision's
CIFAR10 and SVHN compare each file's MD5 with the checksum of the official release, which no
synthetic file can match. The fixture replaces ``check_integrity`` in those two torchvision modules
by a plain existence check; the file reading itself (pickle / scipy.io.loadmat) is the real code.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import numpy as np
import pytest

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX (big-endian) file: magic = 0x08 (uint8) << 8 | ndim, i.e. 2049 for labels, 2051 for images."""
    magic = (0x08 << 8) | array.ndim
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist(
    root: Path, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray
) -> Path:
    """``<root>/MNIST/raw/*-ubyte``; images ``(N, 28, 28)`` uint8, labels ``(N,)`` uint8."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, arr in zip(MNIST_FILES, (train_images, train_labels, test_images, test_labels)):
        _write_idx(raw / name, arr)
    return raw


def random_images(n: int, shape: Sequence[int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def write_cifar10(
    root: Path,
    train_images: np.ndarray,
    train_labels: Sequence[int],
    test_images: np.ndarray,
    test_labels: Sequence[int],
) -> Path:
    """``<root>/cifar-10-batches-py``: training images (N, 32, 32, 3) uint8 spread over 5 batches."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)

    def dump(name: str, images: np.ndarray, labels: Sequence[int]) -> None:
        # The official pickles store each image as 3072 bytes: the R plane, then G, then B.
        data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        entry = {"batch_label": name, "labels": [int(v) for v in labels], "data": data, "filenames": []}
        with open(base / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)

    for i, chunk in enumerate(np.array_split(np.arange(len(train_images)), 5), start=1):
        dump(f"data_batch_{i}", train_images[chunk], [train_labels[j] for j in chunk])
    dump("test_batch", test_images, test_labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": 10000, "num_vis": 3072}, f, protocol=2)
    return base


def write_svhn(root: Path, split: str, images: np.ndarray, labels: Sequence[int]) -> Path:
    """``<root>/SVHN/<split>_32x32.mat`` with ``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1) in 1..10."""
    import scipy.io

    folder = root / "SVHN"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}_32x32.mat"
    y = np.asarray(labels, dtype=np.uint8).reshape(-1, 1)
    scipy.io.savemat(path, {"X": np.ascontiguousarray(images.transpose(1, 2, 3, 0)), "y": y})
    return path


def write_image_folder(
    folder: Path,
    classes: Sequence[str],
    per_class: int,
    *,
    size: tuple[int, int] = (40, 30),
    fmt: str = "JPEG",
    color: Optional[tuple[int, int, int]] = None,
    seed: int = 0,
) -> None:
    """``folder/<class>/<i>.<fmt>``: random RGB images, or constant ``color`` ones."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ext = "JPEG" if fmt == "JPEG" else fmt.lower()
    for cls in classes:
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            if color is None:
                arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            else:
                arr = np.broadcast_to(np.asarray(color, dtype=np.uint8), (size[1], size[0], 3)).copy()
            Image.fromarray(arr).save(folder / cls / f"{i}.{ext}", format=fmt)


def constant_rgb(mean: Sequence[float]) -> tuple[int, ...]:
    """The uint8 pixel closest to ``mean`` (in [0, 1]) per channel: normalises to ~0."""
    return tuple(int(round(m * 255)) for m in mean)


@pytest.fixture
def skip_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let synthetic CIFAR-10/SVHN files pass torchvision's MD5 check (existence is still checked)."""
    import torchvision.datasets.cifar
    import torchvision.datasets.svhn

    def exists(fpath: "os.PathLike[str] | str", md5: Optional[str] = None) -> bool:
        return os.path.isfile(fpath)

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", exists)
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", exists)


@pytest.fixture
def writers() -> SimpleNamespace:
    """The writers above as ``writers.mnist(...)`` etc. (a folder without ``__init__`` cannot import conftest)."""
    return SimpleNamespace(
        mnist=write_mnist,
        cifar10=write_cifar10,
        svhn=write_svhn,
        image_folder=write_image_folder,
        random_images=random_images,
        constant_rgb=constant_rgb,
    )
