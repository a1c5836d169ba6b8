"""CIFAR10DataModule on tiny python-pickle batches read by torchvision's real CIFAR10 reader.

torchvision checks each file's MD5 against the official release, which synthetic files cannot
match, so these tests use the ``skip_md5`` fixture (conftest.py): it swaps only torchvision's
integrity check for an existence check; the pickles are loaded by torchvision's own code.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from deqlab.data import CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule

N_TRAIN, N_TEST = 30, 10


@pytest.fixture
def cifar_root(tmp_path: Path, writers: SimpleNamespace) -> Path:
    writers.cifar10(
        tmp_path,
        writers.random_images(N_TRAIN, (32, 32, 3), seed=0),
        [i % 10 for i in range(N_TRAIN)],
        writers.random_images(N_TEST, (32, 32, 3), seed=1),
        [9 - i % 10 for i in range(N_TEST)],
    )
    return tmp_path


@pytest.mark.usefixtures("skip_md5")
def test_shapes_sizes_and_labels(cifar_root: Path) -> None:
    dm = CIFAR10DataModule(cifar_root, batch_size=4, val_fraction=0.2)
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (24, 6, N_TEST)
    assert dm.num_classes == 10 and dm.input_shape == (3, 32, 32)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert dm.train_set[0][1] == dm.train_set.indices[0] % 10
    assert [dm.test_set[i][1] for i in range(3)] == [9, 8, 7]


@pytest.mark.usefixtures("skip_md5")
def test_normalisation_constant_image(tmp_path: Path, writers: SimpleNamespace) -> None:
    color = writers.constant_rgb(CIFAR10_MEAN)
    images = np.broadcast_to(np.asarray(color, dtype=np.uint8), (10, 32, 32, 3)).copy()
    writers.cifar10(tmp_path, images, [0] * 10, images[:5], [1] * 5)
    dm = CIFAR10DataModule(tmp_path)
    dm.setup("test")
    x, y = dm.test_set[0]
    assert y == 1
    assert float(x.abs().max()) < 0.01
    for c in range(3):
        expected = (color[c] / 255 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]
        assert torch.allclose(x[c], torch.full_like(x[c], expected), atol=1e-5)


@pytest.mark.usefixtures("skip_md5")
def test_split_reproducible_and_seed_dependent(cifar_root: Path) -> None:
    def train_indices(seed: int) -> list[int]:
        dm = CIFAR10DataModule(cifar_root, seed=seed, val_fraction=0.3)
        dm.setup("fit")
        return dm.train_set.indices

    assert train_indices(1) == train_indices(1)
    assert train_indices(1) != train_indices(2)


@pytest.mark.usefixtures("skip_md5")
def test_augmentation_on_and_off(cifar_root: Path) -> None:
    plain = CIFAR10DataModule(cifar_root)
    plain.setup("fit")
    assert torch.equal(plain.train_set[0][0], plain.train_set[0][0])
    aug = CIFAR10DataModule(cifar_root, augment=True)
    aug.setup("fit")
    steps = aug.train_transform().transforms
    crop = next(t for t in steps if isinstance(t, v2.RandomCrop))
    assert crop.size == (32, 32) and crop.padding == [4, 4, 4, 4]
    assert any(isinstance(t, v2.RandomHorizontalFlip) for t in steps)
    torch.manual_seed(0)
    draws = [aug.train_set[0][0] for _ in range(8)]
    assert all(d.shape == (3, 32, 32) for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(aug.val_set[0][0], aug.val_set[0][0])  # evaluation is deterministic
    assert torch.equal(aug.val_set[0][0], plain.val_set[0][0])


def test_missing_files_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        CIFAR10DataModule(tmp_path).setup("fit")
    msg = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg
    for name in ("data_batch_1", "data_batch_5", "test_batch", "batches.meta", "download=True"):
        assert name in msg


def test_checksum_mismatch_is_explained(cifar_root: Path) -> None:
    # Without skip_md5 torchvision rejects the synthetic (non-official) files: the error says why.
    with pytest.raises(RuntimeError, match="rejected them"):
        CIFAR10DataModule(cifar_root).setup("test")
