"""DigitsDataModule: the embedded scikit-learn digits."""

from __future__ import annotations

import pytest
import torch

from deqlab.data import DigitsDataModule


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=32, seed=0)
    dm.setup("fit")
    return dm


def test_sizes_and_attributes(digits: DigitsDataModule) -> None:
    sizes = (len(digits.train_set), len(digits.val_set), len(digits.test_set))
    assert sum(sizes) == 1797
    assert sizes == (1294, 144, 359)
    assert digits.num_classes == 10
    assert digits.input_shape == (1, 8, 8)


def test_batch_shape_dtype_and_labels(digits: DigitsDataModule) -> None:
    x, y = next(iter(digits.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.long
    all_labels = torch.cat([digits.train_set.tensors[1], digits.val_set.tensors[1], digits.test_set.tensors[1]])
    assert set(all_labels.tolist()) == set(range(10))


def test_normalised_with_train_statistics(digits: DigitsDataModule) -> None:
    train_x = digits.train_set.tensors[0]
    assert abs(float(train_x.mean())) < 1e-5
    assert abs(float(train_x.std()) - 1.0) < 1e-4
    assert 0.0 < digits.mean < 1.0 and digits.std > 0.0  # statistics of [0, 1]-scaled pixels
    # val/test use the same affine map: their minimum is the image of pixel 0.
    expected_min = (0.0 - digits.mean) / digits.std
    assert torch.isclose(digits.test_set.tensors[0].min(), torch.tensor(expected_min), atol=1e-5)


def test_flatten() -> None:
    dm = DigitsDataModule(batch_size=8, flatten=True)
    dm.setup()
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (8, 64) and dm.input_shape == (64,)


def test_split_reproducible_and_seed_dependent(digits: DigitsDataModule) -> None:
    same = DigitsDataModule(batch_size=32, seed=0)
    same.setup()
    other = DigitsDataModule(batch_size=32, seed=1)
    other.setup()
    assert torch.equal(same.test_set.tensors[0], digits.test_set.tensors[0])
    assert torch.equal(same.train_set.tensors[1], digits.train_set.tensors[1])
    assert not torch.equal(other.test_set.tensors[0], digits.test_set.tensors[0])


def test_custom_fractions_and_hparams() -> None:
    dm = DigitsDataModule(val_fraction=0.2, test_fraction=0.1)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1294, 323, 180)
    assert dm.hparams["val_fraction"] == 0.2 and dm.hparams["test_fraction"] == 0.1
    with pytest.raises(ValueError, match="test_fraction"):
        DigitsDataModule(test_fraction=1.0)
