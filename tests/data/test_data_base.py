"""Shared split and loader logic (deqlab.data.base)."""

from __future__ import annotations

import pickle
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from deqlab.data import (
    DigitsDataModule,
    EpochSeededSampler,
    ResumableDataLoader,
    TransformedSubset,
    split_indices,
    split_lengths,
)
from deqlab.data.base import Flatten, normalize_transform


def test_split_lengths_rounding_and_validation() -> None:
    assert split_lengths(1797, 0.1, 0.2) == (1294, 144, 359)
    assert split_lengths(60000, 0.1) == (54000, 6000, 0)
    assert split_lengths(10, 0.0) == (10, 0, 0)
    with pytest.raises(ValueError, match="val_fraction"):
        split_lengths(10, 1.0)
    with pytest.raises(ValueError, match="test_fraction"):
        split_lengths(10, 0.1, -0.1)
    with pytest.raises(ValueError, match="no training items"):
        split_lengths(1, 0.0, 0.9)


def test_split_indices_is_a_partition_and_seeded() -> None:
    a = split_indices(100, [70, 20, 10], seed=3)
    assert [len(p) for p in a] == [70, 20, 10]
    assert sorted(sum(a, [])) == list(range(100))
    assert split_indices(100, [70, 20, 10], seed=3) == a
    assert split_indices(100, [70, 20, 10], seed=4) != a
    with pytest.raises(ValueError, match="sum"):
        split_indices(100, [70, 20], seed=3)


def test_split_ignores_global_rng_state() -> None:
    # What makes DDP ranks agree: the split depends on the seed argument only.
    torch.manual_seed(1)
    a = split_indices(50, [40, 10], seed=7)
    torch.manual_seed(999)
    torch.rand(10)
    assert split_indices(50, [40, 10], seed=7) == a


def test_transformed_subset_applies_transform_to_inputs_only() -> None:
    base = TensorDataset(torch.arange(10.0).reshape(10, 1), torch.arange(10))
    sub = TransformedSubset(base, [3, 5], transform=lambda x: x * 10)
    assert len(sub) == 2
    x, y = sub[1]
    assert x.item() == 50.0 and y.item() == 5


def test_transforms_pickle_for_spawned_workers() -> None:
    t = normalize_transform((0.5,), (0.5,), flatten=True)
    assert any(isinstance(s, Flatten) for s in pickle.loads(pickle.dumps(t)).transforms)


def test_loader_policy() -> None:
    dm = DigitsDataModule(batch_size=16, num_workers=2)
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()
    dm.setup()
    train = dm.train_dataloader()
    assert train.batch_size == 16 and train.num_workers == 2 and train.persistent_workers
    assert train.pin_memory == torch.cuda.is_available()
    # torchdata's StatefulDataLoader (Lightning checkpoints its position) over a (seed, epoch) sampler
    assert isinstance(train, ResumableDataLoader) and isinstance(train, StatefulDataLoader)
    assert isinstance(train.sampler, EpochSeededSampler) and train.sampler.num_replicas == 1
    assert isinstance(dm.val_dataloader().sampler, torch.utils.data.SequentialSampler)
    assert isinstance(dm.test_dataloader().sampler, torch.utils.data.SequentialSampler)
    dm0 = DigitsDataModule(num_workers=0, pin_memory=True)
    dm0.setup()
    loader = dm0.train_dataloader()
    assert loader.pin_memory and not loader.persistent_workers


def test_no_validation_when_val_fraction_is_zero() -> None:
    dm = DigitsDataModule(val_fraction=0.0)
    dm.setup()
    assert dm.val_dataloader() == []


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.5)
    with pytest.raises(TypeError):
        DigitsDataModule(batchsize=3)  # type: ignore[call-arg]


def test_epoch_seeded_sampler_depends_on_seed_and_epoch_only():
    from deqlab.data import EpochSeededSampler

    data = list(range(50))
    a, b = EpochSeededSampler(data, seed=3), EpochSeededSampler(data, seed=3)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(99)  # the global RNG must not matter (it is not checkpointed)
    assert list(b) == first and sorted(first) == data
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(EpochSeededSampler(data, seed=4)) != first


def test_the_training_sampler_shards_itself_under_ddp() -> None:
    # Lightning keeps a DistributedSampler it is given: each rank takes its shard of the (seed, epoch) order
    dm = DigitsDataModule(batch_size=8, seed=2)
    dm.setup()
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)
    sampler = dm.train_dataloader().sampler
    assert (sampler.num_replicas, sampler.rank) == (2, 1)
    full = list(EpochSeededSampler(range(len(dm.train_set)), seed=2, num_replicas=2, rank=1))
    assert list(sampler) == full and len(full) == -(-len(dm.train_set) // 2)


def test_a_position_is_applied_only_to_a_pass_of_its_epoch() -> None:
    sampler = EpochSeededSampler(list(range(10)), seed=1)
    sampler.set_epoch(3)
    order = list(sampler)
    sampler.load_state_dict({"yielded": 4, "epoch": 3})
    assert list(sampler) == order[4:]
    sampler.load_state_dict({"yielded": 4, "epoch": 2})  # a checkpoint at the last batch of epoch 2
    assert list(sampler) == order  # epoch 3 starts at its beginning
    assert sampler.state_dict() == {"yielded": 10, "epoch": 3}


def test_the_loader_makes_its_iterator_at_the_first_batch_after_set_epoch() -> None:
    # Lightning calls iter(loader) before set_epoch when it resumes; the pass must still be the set epoch's
    data = TensorDataset(torch.arange(12.0))

    def first_batch(loader_class, **kwargs):
        loader = loader_class(data, batch_size=3, sampler=EpochSeededSampler(data, seed=0), **kwargs)
        batches = iter(loader)
        loader.sampler.set_epoch(1)
        return next(batches)[0].tolist()

    sampler = EpochSeededSampler(data, seed=0)
    sampler.set_epoch(1)
    expected = [float(i) for i in list(sampler)[:3]]
    assert first_batch(ResumableDataLoader) == expected
    assert first_batch(ResumableDataLoader, num_workers=1) == expected  # workers take indices when it is made
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert first_batch(StatefulDataLoader, num_workers=1) != expected  # torchdata's own: the epoch-0 order


def test_a_position_written_by_the_earlier_resumable_loader_is_understood() -> None:
    data = TensorDataset(torch.arange(12.0))
    loader = ResumableDataLoader(data, batch_size=3, sampler=EpochSeededSampler(data, seed=4))
    loader.sampler.set_epoch(1)
    order = [b[0].tolist() for b in loader]
    resumed = ResumableDataLoader(data, batch_size=3, sampler=EpochSeededSampler(data, seed=4))
    resumed.load_state_dict({"epoch": 1, "batches": 2})  # deqlab's earlier {"epoch", "batches"} format
    resumed.sampler.set_epoch(1)
    assert [b[0].tolist() for b in resumed] == order[2:]
