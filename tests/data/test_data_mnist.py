"""MNISTDataModule on tiny IDX files read by torchvision's real MNIST reader (and on the real MNIST)."""

from __future__ import annotations

import socket
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision

from deqlab.data import MNIST_MEAN, MNIST_STD, MNISTDataModule

N_TRAIN, N_TEST = 40, 12
REAL_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture
def mnist_root(tmp_path: Path, writers: SimpleNamespace) -> Path:
    train = writers.random_images(N_TRAIN, (28, 28), seed=0)
    test = writers.random_images(N_TEST, (28, 28), seed=1)
    writers.mnist(
        tmp_path, train, np.arange(N_TRAIN, dtype=np.uint8) % 10, test, (np.arange(N_TEST, dtype=np.uint8) + 3) % 10
    )
    return tmp_path


def test_idx_headers_are_real(mnist_root: Path) -> None:
    raw = mnist_root / "MNIST" / "raw"
    assert int.from_bytes((raw / "train-images-idx3-ubyte").read_bytes()[:4], "big") == 2051
    assert int.from_bytes((raw / "train-labels-idx1-ubyte").read_bytes()[:4], "big") == 2049


def test_shapes_sizes_and_labels(mnist_root: Path) -> None:
    dm = MNISTDataModule(mnist_root, batch_size=8, val_fraction=0.25, seed=0)
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (30, 10, N_TEST)
    assert dm.num_classes == 10 and dm.input_shape == (1, 28, 28)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    # labels follow the file: train item i has label i % 10, test item i has (i + 3) % 10
    for i in (0, 5):
        _, label = dm.train_set[i]
        assert label == dm.train_set.indices[i] % 10
    assert [dm.test_set[i][1] for i in range(4)] == [3, 4, 5, 6]


def test_normalisation_constant_image(tmp_path: Path, writers: SimpleNamespace) -> None:
    value = round(MNIST_MEAN[0] * 255)  # a pixel value whose normalised image is ~0
    images = np.full((10, 28, 28), value, dtype=np.uint8)
    labels = np.zeros(10, dtype=np.uint8)
    writers.mnist(tmp_path, images, labels, images, labels)
    dm = MNISTDataModule(tmp_path, val_fraction=0.2)
    dm.setup("test")
    x, _ = dm.test_set[0]
    assert abs(float(x.mean())) < 0.01
    expected = (value / 255 - MNIST_MEAN[0]) / MNIST_STD[0]
    assert torch.allclose(x, torch.full_like(x, expected), atol=1e-5)


def test_raw_pixels_without_normalisation(tmp_path: Path, writers: SimpleNamespace) -> None:
    # the January-2022 reference script trained on raw [0, 1] pixels (paper_repro --protocol v1)
    images = np.full((10, 28, 28), 51, dtype=np.uint8)
    labels = np.zeros(10, dtype=np.uint8)
    writers.mnist(tmp_path, images, labels, images, labels)
    for stage, split in (("fit", "train_set"), ("test", "test_set")):
        dm = MNISTDataModule(tmp_path, val_fraction=0.2, normalize=False, flatten=True)
        dm.setup(stage)
        x, _ = getattr(dm, split)[0]
        assert x.shape == (784,) and torch.allclose(x, torch.full_like(x, 51 / 255), atol=1e-6)


def test_flatten(mnist_root: Path) -> None:
    dm = MNISTDataModule(mnist_root, batch_size=4, flatten=True)
    dm.setup("fit")
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 784) and dm.input_shape == (784,)


def test_split_reproducible_and_seed_dependent(mnist_root: Path) -> None:
    def indices(seed: int) -> tuple[list[int], list[int]]:
        dm = MNISTDataModule(mnist_root, seed=seed, val_fraction=0.25)
        dm.setup("fit")
        return dm.train_set.indices, dm.val_set.indices

    a, b, c = indices(5), indices(5), indices(6)
    assert a == b and a != c
    assert sorted(a[0] + a[1]) == list(range(N_TRAIN))


def test_augment_only_on_train(mnist_root: Path) -> None:
    plain = MNISTDataModule(mnist_root)
    plain.setup("fit")
    assert torch.equal(plain.train_set[0][0], plain.train_set[0][0])
    aug = MNISTDataModule(mnist_root, augment=True)
    aug.setup("fit")
    torch.manual_seed(0)
    draws = [aug.train_set[0][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(aug.val_set[0][0], plain.val_set[0][0])  # validation is never augmented


def test_missing_files_message(tmp_path: Path) -> None:
    dm = MNISTDataModule(tmp_path / "nowhere")
    dm.prepare_data()  # download=False: nothing happens, nothing is created
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in msg
    assert "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert "download=True" in msg


def test_failed_download_is_wrapped_with_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def offline(self: torchvision.datasets.MNIST) -> None:
        seen["timeout"] = socket.getdefaulttimeout()
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    before = socket.getdefaulttimeout()
    dm = MNISTDataModule(tmp_path, download=True)
    with pytest.raises(RuntimeError) as info:
        dm.prepare_data()
    assert "downloading MNIST" in str(info.value) and str(tmp_path / "MNIST" / "raw") in str(info.value)
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    assert seen["timeout"] is not None and seen["timeout"] > 0  # sockets could not block forever
    assert socket.getdefaulttimeout() == before


def test_no_download_when_files_present(mnist_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_run(self: torchvision.datasets.MNIST) -> None:
        raise AssertionError("download attempted although the files exist")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", must_not_run)
    dm = MNISTDataModule(mnist_root, download=True)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 36


@pytest.mark.skipif(
    not (REAL_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file(),
    reason=f"real MNIST not present at {REAL_DATA}/MNIST/raw",
)
def test_real_mnist() -> None:
    dm = MNISTDataModule(REAL_DATA, batch_size=256, seed=0)
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (54000, 6000, 10000)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (256, 1, 28, 28) and y.dtype == torch.long
    assert y[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first test labels
    # the paper's constants normalise real MNIST to ~zero mean, unit std
    batch = torch.stack([dm.train_set[i][0] for i in range(512)])
    assert abs(float(batch.mean())) < 0.1 and abs(float(batch.std()) - 1.0) < 0.1
