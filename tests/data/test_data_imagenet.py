"""ImageNetDataModule on a tiny ImageFolder tree of real JPEG/PNG files."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from deqlab.data import IMAGENET_MEAN, ImageNetDataModule

CLASSES = ["n01440764", "n01443537", "n01484850"]


@pytest.fixture
def imagenet_root(tmp_path: Path, writers: SimpleNamespace) -> Path:
    writers.image_folder(tmp_path / "train", CLASSES, per_class=4, seed=0)
    writers.image_folder(tmp_path / "val", CLASSES, per_class=2, seed=1)
    return tmp_path


def test_shapes_sizes_and_labels(imagenet_root: Path) -> None:
    dm = ImageNetDataModule(imagenet_root, batch_size=3, num_workers=0, val_fraction=0.25)
    assert dm.num_classes == 3  # counted from train/ before setup
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (9, 3, 6)
    assert dm.input_shape == (3, 224, 224)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.long
    assert dm.test_set.classes == CLASSES
    assert [dm.test_set[i][1] for i in range(0, 6, 2)] == [0, 1, 2]  # sorted folder names → 0, 1, 2


def test_default_num_classes_without_data(tmp_path: Path) -> None:
    assert ImageNetDataModule(tmp_path / "absent").num_classes == 1000


def test_eval_transform_resize_and_center_crop(imagenet_root: Path) -> None:
    dm = ImageNetDataModule(imagenet_root, image_size=64, augment=False)
    assert dm.resize_size == 73 and dm.input_shape == (3, 64, 64)
    dm.setup("fit")
    x, _ = dm.train_set[0]
    assert x.shape == (3, 64, 64)
    assert torch.equal(x, dm.train_set[0][0])  # augment=False: training uses the eval transform


def test_augmentation_on(imagenet_root: Path) -> None:
    dm = ImageNetDataModule(imagenet_root, image_size=32, augment=True, val_fraction=0.25)
    dm.setup("fit")
    torch.manual_seed(0)
    draws = [dm.train_set[0][0] for _ in range(6)]
    assert all(d.shape == (3, 32, 32) for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])


def test_normalisation_constant_png(tmp_path: Path, writers: SimpleNamespace) -> None:
    color = writers.constant_rgb(IMAGENET_MEAN)
    writers.image_folder(tmp_path / "val", ["a", "b"], per_class=1, fmt="PNG", color=color)
    dm = ImageNetDataModule(tmp_path, image_size=48)
    dm.setup("test")  # train/ absent: testing alone still works
    x, y = dm.test_set[1]
    assert y == 1 and x.shape == (3, 48, 48)
    assert float(x.abs().max()) < 0.01


def test_split_reproducible_and_seed_dependent(imagenet_root: Path) -> None:
    def train_indices(seed: int) -> list[int]:
        dm = ImageNetDataModule(imagenet_root, seed=seed, val_fraction=0.5)
        dm.setup("fit")
        return dm.train_set.indices

    assert train_indices(0) == train_indices(0) and train_indices(0) != train_indices(1)


def test_class_mismatch_raises(tmp_path: Path, writers: SimpleNamespace) -> None:
    writers.image_folder(tmp_path / "train", CLASSES, per_class=1)
    writers.image_folder(tmp_path / "val", CLASSES[1:], per_class=1)
    with pytest.raises(ValueError, match="class folders differ"):
        ImageNetDataModule(tmp_path).setup("test")


def test_missing_data_and_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        ImageNetDataModule(tmp_path).setup("fit")
    assert str(tmp_path / "train") in str(info.value) and "<class>" in str(info.value)
    # it cannot be downloaded, so the message must not suggest download=True (which raises)
    assert "download=True" not in str(info.value) and "cannot be downloaded" in str(info.value)
    (tmp_path / "val").mkdir()  # present but empty: torchvision's error plus the layout
    with pytest.raises(FileNotFoundError, match="ImageFolder layout"):
        ImageNetDataModule(tmp_path).setup("test")
    with pytest.raises(ValueError, match="cannot be downloaded"):
        ImageNetDataModule(tmp_path, download=True)
