"""Fixtures for the paper-reproduction tests: tiny datasets in the real on-disk formats.

The writers are the data tests' own (tests/data/conftest.py, loaded by path: a test folder without
``__init__`` cannot import another folder's conftest), so both suites exercise torchvision's real readers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("_data_writers", REPO / "tests" / "data" / "conftest.py")
writers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(writers)  # type: ignore[union-attr]

skip_md5 = writers.skip_md5  # the fixture, re-exported for the CIFAR-10 / SVHN tests


def _labels(n: int, seed: int) -> np.ndarray:
    return (np.arange(n) + seed) % 10


def make_mnist(root: Path, n_train: int = 64, n_test: int = 32) -> Path:
    writers.write_mnist(
        root,
        writers.random_images(n_train, (28, 28), 1),
        _labels(n_train, 0).astype(np.uint8),
        writers.random_images(n_test, (28, 28), 2),
        _labels(n_test, 3).astype(np.uint8),
    )
    return root


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    return make_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    writers.write_cifar10(
        root,
        writers.random_images(40, (32, 32, 3), 1),
        list(_labels(40, 0)),
        writers.random_images(16, (32, 32, 3), 2),
        list(_labels(16, 1)),
    )
    return root


@pytest.fixture(scope="session")
def svhn_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("svhn")
    writers.write_svhn(root, "train", writers.random_images(32, (32, 32, 3), 1), list(_labels(32, 0) + 1))
    writers.write_svhn(root, "test", writers.random_images(16, (32, 32, 3), 2), list(_labels(16, 1) + 1))
    return root


@pytest.fixture(scope="session")
def imagenet_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    classes = ["n01", "n02", "n03"]
    writers.write_image_folder(root / "train", classes, 4, size=(40, 40), seed=1)
    writers.write_image_folder(root / "val", classes, 2, size=(40, 40), seed=2)
    return root


def out_args(tmp_path: Path) -> list:
    """Where a test run writes: results and TensorBoard under its own tmp folder, progress as lines."""
    return [
        "--results-dir",
        str(tmp_path / "results"),
        "--log-dir",
        str(tmp_path / "tb"),
        "--progress",
        "lines",
        "--num-workers",
        "0",
    ]
