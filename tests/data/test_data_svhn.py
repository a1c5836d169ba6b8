"""SVHNDataModule on tiny ``.mat`` files read by torchvision's real SVHN reader (scipy.io.loadmat).

torchvision checks the MD5 of the official ``.mat`` files; the ``skip_md5`` fixture (conftest.py)
replaces only that check with an existence check.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from deqlab.data import SVHN_MEAN, SVHN_STD, SVHNDataModule

pytestmark = pytest.mark.usefixtures("skip_md5")

N_TRAIN, N_TEST = 20, 10


@pytest.fixture
def svhn_root(tmp_path: Path, writers: SimpleNamespace) -> Path:
    writers.svhn(
        tmp_path, "train", writers.random_images(N_TRAIN, (32, 32, 3), seed=0), [i % 10 + 1 for i in range(N_TRAIN)]
    )
    writers.svhn(tmp_path, "test", writers.random_images(N_TEST, (32, 32, 3), seed=1), [10, 1, 2, 10, 5, 6, 7, 8, 9, 3])
    return tmp_path


def test_shapes_sizes_and_label_mapping(svhn_root: Path) -> None:
    dm = SVHNDataModule(svhn_root, batch_size=5, val_fraction=0.25)
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (15, 5, N_TEST)
    assert dm.num_classes == 10 and dm.input_shape == (3, 32, 32)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert y.tolist() == [0, 1, 2, 0, 5]  # the file's label 10 is the digit 0
    labels = {dm.train_set[i][1] for i in range(len(dm.train_set))} | {dm.val_set[i][1] for i in range(len(dm.val_set))}
    assert labels == set(range(10))


def test_pixels_keep_their_layout(tmp_path: Path, writers: SimpleNamespace) -> None:
    # One red pixel at row 1, column 2: torchvision's (H, W, C, N) → (N, C, H, W) must put it there.
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    images[:, 1, 2, 0] = 255
    writers.svhn(tmp_path, "train", images, [1, 2])
    writers.svhn(tmp_path, "test", images, [1, 2])
    dm = SVHNDataModule(tmp_path)
    dm.setup("test")
    x, _ = dm.test_set[0]
    raw = x * torch.tensor(SVHN_STD).view(3, 1, 1) + torch.tensor(SVHN_MEAN).view(3, 1, 1)
    assert torch.isclose(raw[0, 1, 2], torch.tensor(1.0), atol=1e-5)
    assert torch.isclose(raw[0, 2, 1], torch.tensor(0.0), atol=1e-5)


def test_normalisation_constant_image(tmp_path: Path, writers: SimpleNamespace) -> None:
    color = writers.constant_rgb(SVHN_MEAN)
    images = np.broadcast_to(np.asarray(color, dtype=np.uint8), (4, 32, 32, 3)).copy()
    writers.svhn(tmp_path, "train", images, [1, 2, 3, 4])
    writers.svhn(tmp_path, "test", images, [1, 2, 3, 4])
    dm = SVHNDataModule(tmp_path, val_fraction=0.25)
    dm.setup("fit")
    x, _ = dm.train_set[0]
    assert float(x.abs().max()) < 0.01


def test_split_reproducible_and_seed_dependent(svhn_root: Path) -> None:
    def val_indices(seed: int) -> list[int]:
        dm = SVHNDataModule(svhn_root, seed=seed, val_fraction=0.5)
        dm.setup("fit")
        return dm.val_set.indices

    assert val_indices(0) == val_indices(0) and val_indices(0) != val_indices(1)


def test_no_augmentation_by_default(svhn_root: Path) -> None:
    dm = SVHNDataModule(svhn_root)
    dm.setup("fit")
    assert torch.equal(dm.train_set[0][0], dm.train_set[0][0])
    aug = SVHNDataModule(svhn_root, augment=True)
    aug.setup("fit")
    torch.manual_seed(0)
    draws = [aug.train_set[0][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])


def test_missing_files_message(tmp_path: Path, writers: SimpleNamespace) -> None:
    with pytest.raises(FileNotFoundError) as info:
        SVHNDataModule(tmp_path).setup("fit")
    assert str(tmp_path / "SVHN") in str(info.value) and "train_32x32.mat" in str(info.value)
    assert "download=True" in str(info.value)
    # only the test file missing: fitting works, testing names the test file
    writers.svhn(tmp_path, "train", writers.random_images(4, (32, 32, 3)), [1, 2, 3, 4])
    dm = SVHNDataModule(tmp_path)
    dm.setup("fit")
    with pytest.raises(FileNotFoundError, match="test_32x32.mat"):
        dm.setup("test")
