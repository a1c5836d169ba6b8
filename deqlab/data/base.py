"""Shared machinery of every deqlab data module: seeded splits, transformed subsets, loaders.

Why one base: the five data modules differ only in where their files live and which transforms
they use. Splitting, loader construction (pinning, persistent workers), the missing-data message
and the guarded download are written once here so they behave identically everywhere, including
under DDP, where every rank must draw the *same* train/val split without talking to the others.
"""

from __future__ import annotations

import contextlib
import socket
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Literal, Optional, Sequence, Sized, Tuple, Union, cast

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, random_split
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchvision.transforms import v2

__all__ = [
    "BaseDataModule",
    "EpochSeededSampler",
    "Flatten",
    "ResumableDataLoader",
    "TorchvisionDataModule",
    "TransformedSubset",
    "normalize_transform",
    "split_indices",
    "split_lengths",
]

Split = Literal["train", "test"]
PathLike = Union[str, Path]

# Seconds any single socket operation may block during a download. torchvision's downloader calls
# urllib without a timeout, so a firewall that silently drops packets would otherwise hang forever.
DOWNLOAD_SOCKET_TIMEOUT_S = 60.0


def split_lengths(n: int, val_fraction: float, test_fraction: float = 0.0) -> tuple[int, int, int]:
    """Sizes ``(train, val, test)`` for ``n`` items.

    ``test_fraction`` is taken from all items, ``val_fraction`` from what remains after the test
    split, both rounded to the nearest integer. Pure arithmetic, so a data module can validate its
    fractions in ``__init__``, long before the data is loaded.

    Args:
        n: number of items to split.
        val_fraction: fraction of the non-test items held out for validation, in [0, 1). No default:
            every data module passes its own ``val_fraction``.
        test_fraction: fraction of all items held out for testing, in [0, 1). Default 0.0: the
            torchvision datasets have an official test set and split only train/val.

    Returns:
        ``(n_train, n_val, n_test)``, summing to ``n``.

    Raises:
        ValueError: when a fraction is outside [0, 1), or nothing is left to train on.

    Examples:
        >>> from deqlab.data import split_lengths
        >>> split_lengths(1797, 0.1, 0.2)
        (1294, 144, 359)
        >>> split_lengths(10, 0.5)
        (5, 5, 0)
    """
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {frac}")
    n_test = int(round(n * test_fraction))
    n_val = int(round((n - n_test) * val_fraction))
    n_train = n - n_test - n_val
    if n_train < 1:
        raise ValueError(
            f"no training items left: n={n}, val_fraction={val_fraction}, test_fraction={test_fraction} "
            f"give train={n_train}, val={n_val}, test={n_test}"
        )
    return n_train, n_val, n_test


def split_indices(n: int, lengths: Sequence[int], seed: int) -> list[list[int]]:
    """Partition ``range(n)`` into pieces of ``lengths`` with a seeded permutation.

    Why a fresh ``torch.Generator().manual_seed(seed)``: the split depends on ``seed`` alone, not on
    the global RNG state, so every process (every DDP rank, every rerun) gets identical indices.

    Args:
        n: number of items; the indices are ``0 .. n-1``.
        lengths: size of each piece (e.g. from [`split_lengths`][deqlab.data.split_lengths]); must sum to ``n``.
        seed: seeds the permutation. No default, on purpose: the caller's seed (a data module's
            ``seed``) must decide the split, never an implicit value.

    Returns:
        One list of indices per entry of ``lengths``, disjoint and together covering ``range(n)``.

    Raises:
        ValueError: when ``lengths`` does not sum to ``n``.

    Examples:
        >>> from deqlab.data import split_indices
        >>> split_indices(10, [7, 3], seed=0)
        [[4, 1, 7, 5, 3, 9, 0], [8, 6, 2]]
        >>> split_indices(10, [7, 3], seed=0) == split_indices(10, [7, 3], seed=0)
        True
    """
    if sum(lengths) != n:
        raise ValueError(f"lengths {list(lengths)} do not sum to n={n}")
    generator = torch.Generator().manual_seed(seed)
    # random_split only indexes and measures its dataset: a range of the indices serves as one
    parts = random_split(cast("Dataset[int]", range(n)), list(lengths), generator=generator)
    return [list(s.indices) for s in parts]


class EpochSeededSampler(StatefulDistributedSampler):
    """Shuffles by ``(seed, epoch)`` alone, one shard per process, and resumes mid-epoch (torchdata's
    ``StatefulDistributedSampler`` underneath).

    Why: a run resumed from a checkpoint must see exactly the batches an uninterrupted run would, and the
    global RNG, which Lightning does not checkpoint, must not decide them. Lightning calls ``set_epoch`` at
    every epoch start. Under DDP each process takes its shard (``num_replicas``, ``rank``), so Lightning
    keeps this sampler instead of putting its own ``DistributedSampler`` in.

    Two things on top of torchdata's sampler, both for resuming under Lightning:

    * the pass is a generator: it starts at the first index asked for, after Lightning's ``set_epoch``,
      also when a loader asks for ``iter(sampler)`` earlier;
    * ``state_dict`` holds the epoch next to the indices drawn, and a loaded position is applied only to a
      pass of that epoch: a checkpoint taken at the last batch of an epoch (by ``limit_train_batches`` or
      ``every_n_train_steps``) starts the next epoch from its beginning, as the uninterrupted run does.

    Single-process orders are those of deqlab's earlier ``EpochSeededSampler`` (the permutation seeded
    with ``seed * 100_003 + epoch``; ``DistributedSampler``'s ``seed`` attribute holds ``seed * 100_003``),
    so runs and checkpoints made before keep their batches.

    Args:
        data_source: the dataset to shuffle (only its length is used).
        seed: with the epoch, fixes every permutation. Default 0, the data modules' default ``seed``
            (they pass theirs).
        num_replicas: processes sharing the data; ``None`` (default): the world size of an initialised
            ``torch.distributed``, else 1.
        rank: this process's shard; ``None`` (default): its ``torch.distributed`` rank, else 0.

    Examples:
        >>> from deqlab.data import EpochSeededSampler
        >>> sampler = EpochSeededSampler(range(6), seed=0)
        >>> list(sampler)
        [2, 5, 3, 0, 1, 4]
        >>> list(sampler) == [2, 5, 3, 0, 1, 4]  # same epoch: same order, whatever the global RNG did
        True
        >>> sampler.set_epoch(1)
        >>> list(sampler)
        [1, 5, 2, 0, 3, 4]
        >>> sampler.load_state_dict({"yielded": 4, "epoch": 1})  # a checkpoint 4 indices into epoch 1
        >>> list(sampler)
        [3, 4]
        >>> sampler.load_state_dict({"yielded": 4, "epoch": 0})  # another epoch's position is not applied
        >>> list(sampler)
        [1, 5, 2, 0, 3, 4]
        >>> [list(EpochSeededSampler(range(6), seed=0, num_replicas=2, rank=r)) for r in (0, 1)]  # DDP shards
        [[2, 3, 1], [5, 0, 4]]
    """

    def __init__(
        self, data_source: Dataset, seed: int = 0, *, num_replicas: Optional[int] = None, rank: Optional[int] = None
    ) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if num_replicas is None:
            num_replicas = torch.distributed.get_world_size() if distributed else 1
        if rank is None:
            rank = torch.distributed.get_rank() if distributed else 0
        super().__init__(
            data_source,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=True,
            seed=int(seed) * 100_003,
        )
        self.data_source = data_source
        self.next_yielded: Optional[int]  # torchdata's: where the next pass starts (None: at its start)
        self._position_epoch: Optional[int] = None  # epoch of a loaded position (None: any)

    def state_dict(self) -> dict:
        """``{"yielded": ..., "epoch": ...}``: indices drawn in the current pass and the pass's epoch."""
        return {**super().state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue the next pass after ``state_dict["yielded"]`` indices if it is of ``state_dict["epoch"]``."""
        super().load_state_dict(state_dict)
        epoch = state_dict.get("epoch")
        self._position_epoch = None if epoch is None else int(epoch)

    def skip_next(self, n: int) -> None:
        """Leave out the first ``n`` indices of the next pass only, whatever its epoch."""
        self.next_yielded = max(0, int(n))
        self._position_epoch = None

    def __iter__(self) -> Iterator[int]:
        # a generator: this runs at the pass's first index, after Lightning's set_epoch
        epoch, self._position_epoch = self._position_epoch, None
        if epoch is not None and epoch != self.epoch:
            self.next_yielded = None  # the position belongs to another epoch's pass
        yield from super().__iter__()


class ResumableDataLoader(StatefulDataLoader):
    """torchdata's ``StatefulDataLoader`` that makes its iterator at the first batch, not at ``iter()``.

    Lightning stores ``state_dict()`` of the training loader in every checkpoint and hands it back with
    ``load_state_dict`` on resume; ``StatefulDataLoader`` then continues with the next unseen batch (workers
    included). Why the later iterator: Lightning calls ``iter(loader)`` when it sets the data up, before
    it calls the sampler's ``set_epoch`` for the epoch being resumed, and a ``StatefulDataLoader`` with
    workers hands the sampler's first indices to them right there, from the wrong epoch's order (measured:
    weights off by 4e-4 after a mid-epoch resume in epoch 1 with 2 workers). Here ``iter(loader)`` returns
    a generator whose first ``next`` makes the real iterator, after ``set_epoch``.

    A position written by deqlab's earlier ``ResumableDataLoader`` (``{"epoch", "batches"}``) is still
    understood: with an [`EpochSeededSampler`][deqlab.data.EpochSeededSampler] the pass of that epoch skips
    those batches.

    Args:
        *args: passed to ``StatefulDataLoader`` (the dataset first, as for ``DataLoader``).
        seed: seeds the loader's generator (worker seeds) when no ``generator`` is given. Default 0, the data
            modules' default ``seed`` ([`BaseDataModule`][deqlab.data.BaseDataModule] passes its own).
        **kwargs: passed to ``StatefulDataLoader`` (``batch_size``, ``sampler``, ``num_workers``, ...).

    Examples:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from deqlab.data import EpochSeededSampler, ResumableDataLoader
        >>> data = TensorDataset(torch.arange(6.0))
        >>> def make_loader():
        ...     return ResumableDataLoader(data, batch_size=2, sampler=EpochSeededSampler(data, seed=0))
        >>> loader = make_loader()
        >>> batches = iter(loader)
        >>> next(batches)
        [tensor([2., 5.])]
        >>> state = loader.state_dict()  # what a mid-epoch checkpoint stores
        >>> resumed = make_loader()
        >>> resumed.load_state_dict(state)
        >>> [batch[0].tolist() for batch in resumed]  # the rest of the epoch, not a restart
        [[3.0, 0.0], [1.0, 4.0]]
    """

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator().manual_seed(int(seed))
        with warnings.catch_warnings():
            # torchdata 0.11 calls torch.set_vital, deprecated in recent torch: nothing for the user to act on
            warnings.filterwarnings("ignore", message=".*set_vital.* is deprecated", category=UserWarning)
            super().__init__(*args, **kwargs)
        self.seed = int(seed)
        self._earlier_position: Optional[dict] = None

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume from ``state_dict`` (of `state_dict`, or of deqlab's earlier ``ResumableDataLoader``)."""
        if isinstance(state_dict, dict) and set(state_dict) == {"epoch", "batches"}:
            super().load_state_dict({})
            self._earlier_position = dict(state_dict)
            return
        self._earlier_position = None
        super().load_state_dict(state_dict)

    def __iter__(self) -> Iterator[Any]:
        # a generator: the iterator (and the workers' first indices) is made at the first batch, after set_epoch
        earlier, self._earlier_position = self._earlier_position, None
        sampler = self.sampler
        if (
            earlier is not None
            and isinstance(sampler, EpochSeededSampler)
            and self.batch_size
            and earlier.get("epoch") == sampler.epoch
        ):
            sampler.skip_next(int(earlier.get("batches") or 0) * self.batch_size)
        yield from super().__iter__()


class TransformedSubset(Dataset):
    """``dataset[indices[i]]`` with ``transform`` applied to the input (not the label).

    Why not ``torch.utils.data.Subset``: the train and val subsets of one underlying dataset need
    different transforms (augmentation only for training), and the underlying data is loaded once.

    Args:
        dataset: the underlying dataset, yielding ``(input, label)`` pairs.
        indices: which items of ``dataset`` form the subset, in order (copied into a list).
        transform: applied to each input on access. Default ``None``: inputs are returned as stored.

    Examples:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from deqlab.data import TransformedSubset
        >>> data = TensorDataset(torch.arange(5.0), torch.arange(5))
        >>> subset = TransformedSubset(data, [4, 0], transform=lambda x: 10 * x)
        >>> len(subset), subset[0]
        (2, (tensor(40.), tensor(4)))
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Optional[Callable] = None) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        x, y = self.dataset[self.indices[i]]
        if self.transform is not None:
            x = self.transform(x)
        return x, y


class Flatten:
    """Flatten a ``(C, H, W)`` image tensor to ``(C*H*W,)`` for dense models.

    A module-level class rather than a lambda so transforms pickle into spawned worker processes.

    Examples:
        >>> import torch
        >>> from deqlab.data.base import Flatten
        >>> Flatten()(torch.zeros(1, 28, 28)).shape
        torch.Size([784])
    """

    def __call__(self, x: Tensor) -> Tensor:
        return x.reshape(-1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def normalize_transform(
    mean: Sequence[float], std: Sequence[float], *, augment: Sequence[Callable] = (), flatten: bool = False
) -> v2.Compose:
    """PIL image → augmentations → float tensor in [0, 1] → ``(x - mean) / std`` (→ flattened).

    Augmentations run on the PIL image (cheap, exact for crops/flips); the result is a plain
    ``torch.Tensor`` (``ToPureTensor``) so batches are ordinary tensors, not tv_tensors subclasses.

    Args:
        mean: per-channel mean of the dataset's [0, 1] pixels (one entry per channel).
        std: per-channel standard deviation, same length as ``mean``.
        augment: PIL-image transforms run first (random crops, flips). Default ``()``: none, as for
            evaluation.
        flatten: append `Flatten` for dense models. Default ``False``: images keep ``(C, H, W)``.

    Returns:
        The composed ``torchvision.transforms.v2`` transform.

    Examples:
        >>> import numpy as np
        >>> from PIL import Image
        >>> from deqlab.data.base import normalize_transform
        >>> transform = normalize_transform((0.5,), (0.5,), flatten=True)
        >>> transform(Image.fromarray(np.full((2, 2), 255, dtype=np.uint8)))
        tensor([1., 1., 1., 1.])
    """
    steps: list[Callable] = [
        *augment,
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
        v2.ToPureTensor(),
    ]
    if flatten:
        steps.append(Flatten())
    return v2.Compose(steps)


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Temporarily give sockets created without a timeout this one (restored afterwards)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


class BaseDataModule(pl.LightningDataModule):
    """Loader logic shared by all deqlab data modules.

    Subclasses fill ``train_set``, ``val_set`` and ``test_set`` in ``setup``; this class turns them into
    ``DataLoader``s with one policy: shuffle only the training set, pin memory only when CUDA is
    there to receive it, keep workers alive between epochs when there are workers.

    The training loader is a [`ResumableDataLoader`][deqlab.data.ResumableDataLoader] (torchdata's
    ``StatefulDataLoader``) over an [`EpochSeededSampler`][deqlab.data.EpochSeededSampler] (one shard per
    process, so Lightning keeps it under DDP). Why: Lightning stores the position of a stateful training
    loader in every checkpoint and hands it back on resume, so a run resumed from a mid-epoch checkpoint
    continues with the next unseen batch, and the order depends only on ``(seed, epoch)``, never on the
    global RNG, so an epoch-end resume shuffles the next epoch as the uninterrupted run does. Worker seeds
    come from the loader's own generator seeded with ``seed``. Measured exactness: the resume section of
    docs/lightning.md.

    The loader options below are defined here once: subclasses take ``**kwargs`` and forward them, and
    repeat an option in their own signature only to give it a different default (CIFAR-10's batch size,
    ImageNet's workers). LightningCLI follows the ``**kwargs`` to this signature, so configs are still
    type-checked key by key.

    Args:
        batch_size: samples per batch (per process under DDP). Default 64, the paper's batch size for
            MNIST conv, SVHN and ImageNet (subclasses with another paper value set their own default).
        num_workers: loader worker processes; 0 (default) loads in the main process (simplest, and
            fastest for small in-memory datasets).
        seed: seeds the train/val(/test) split, the training shuffle (with the epoch) and the loader's
            worker seeds, so the split is identical on every rank and a resumed run sees the same
            batches. Default 0.
        val_fraction: fraction of the non-test data held out for validation (0 disables validation).
            Default 0.1: a tenth is enough to track accuracy and leaves 90% for training.
        pin_memory: page-locked host batches for faster host-to-GPU copies; ``None`` (default) means
            "only when CUDA is available" (pinning without a GPU only costs memory).

    Raises:
        ValueError: when ``batch_size`` < 1, ``num_workers`` < 0 or ``val_fraction`` is outside [0, 1).

    Examples:
        A subclass fills the sets in ``setup``; here they are set by hand:

        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from deqlab.data import BaseDataModule
        >>> dm = BaseDataModule(batch_size=2)
        >>> dm.train_set = TensorDataset(torch.arange(6.0))
        >>> loader = dm.train_dataloader()
        >>> type(loader).__name__, len(loader)
        ('ResumableDataLoader', 3)
        >>> sorted(torch.cat([batch[0] for batch in loader]).tolist())  # shuffled by (seed, epoch)
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        >>> BaseDataModule(val_fraction=1.0)
        Traceback (most recent call last):
        ...
        ValueError: val_fraction must be in [0, 1), got 1.0
    """

    num_classes: int
    input_shape: tuple[int, ...]

    def __init__(
        self,
        *,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.1,
        pin_memory: Optional[bool] = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_fraction = val_fraction
        self.pin_memory = pin_memory
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    def _loader(self, dataset: Optional[Dataset], *, shuffle: bool, what: str) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: no {what} set; call setup() first (the Trainer does this)")
        pin = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
        options: Dict[str, Any] = dict(
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=pin,
            persistent_workers=self.num_workers > 0,
        )
        if shuffle:  # the training loader: shuffled by (seed, epoch), resumable mid-epoch (see the class docstring)
            replicas, rank = self._replicas()
            sampler = EpochSeededSampler(dataset, self.seed, num_replicas=replicas, rank=rank)
            return ResumableDataLoader(dataset, sampler=sampler, seed=self.seed, **options)
        return DataLoader(dataset, **options)

    def _replicas(self) -> Tuple[int, int]:
        """``(processes, this process's rank)`` of the run: from the Trainer when one is attached, else from
        an initialised ``torch.distributed``, else ``(1, 0)``."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.world_size), int(trainer.global_rank)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True, what="train")

    def val_dataloader(self) -> Union[DataLoader, list]:
        # An empty list tells Lightning there is no validation (val_fraction=0).
        if self.val_set is not None and len(cast(Sized, self.val_set)) == 0:  # map-style: it has a length
            return []
        return self._loader(self.val_set, shuffle=False, what="validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False, what="test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False, what="test")


class TorchvisionDataModule(BaseDataModule):
    """A data module over a torchvision dataset stored under ``data_dir``.

    Subclasses say which files must exist (``expected_paths``), how the layout looks
    (``layout_hint``), how to load a split (``load_split``), how to download (``download_data``)
    and which transforms to use. This class adds: download only in ``prepare_data`` (which
    Lightning runs on one process per node, so ranks never race on the same files), an explicit
    ``FileNotFoundError`` naming every missing file, and a train/val split of the official
    training set that is the same on every rank.

    Args:
        data_dir: root directory shared by the datasets (each has its own sub-layout). Default ``"data"``
            (relative to the working directory), where the experiment configs expect it.
        download: fetch the files in ``prepare_data`` when they are missing (needs network). Default
            ``False``: nothing touches the network unless asked, and a missing file is reported by name.
        augment: use training augmentation (validation and test never augment). Default ``False``: the
            paper's v1 protocol trains without it.
        **kwargs: the loader options of [`BaseDataModule`][deqlab.data.BaseDataModule] (``batch_size``, ``num_workers``, ``seed``,
            ``val_fraction``, ``pin_memory``).

    Raises:
        ValueError: from [`BaseDataModule`][deqlab.data.BaseDataModule] for an invalid loader option.

    Examples:
        A subclass names its files and how to load them; torchvision's ``FakeData`` stands in here:

        >>> from torchvision.datasets import FakeData
        >>> from deqlab.data import TorchvisionDataModule
        >>> from deqlab.data.base import normalize_transform
        >>> class FakeDataModule(TorchvisionDataModule):
        ...     name, num_classes, input_shape = "fake", 10, (3, 8, 8)
        ...     def expected_paths(self, split): return []  # nothing on disk
        ...     def layout_hint(self): return "Nothing to place."
        ...     def download_data(self): pass
        ...     def load_split(self, split, transform):
        ...         return FakeData(size=20, image_size=(3, 8, 8), transform=transform)
        ...     def train_transform(self): return normalize_transform((0.5,) * 3, (0.5,) * 3)
        ...     def eval_transform(self): return normalize_transform((0.5,) * 3, (0.5,) * 3)
        >>> dm = FakeDataModule(batch_size=4, val_fraction=0.25)
        >>> dm.setup("fit")
        >>> len(dm.train_set), len(dm.val_set)
        (15, 5)
        >>> images, labels = next(iter(dm.train_dataloader()))
        >>> images.shape
        torch.Size([4, 3, 8, 8])
    """

    name: str = "dataset"

    def __init__(
        self,
        data_dir: PathLike = "data",
        *,
        download: bool = False,
        augment: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.data_dir = Path(data_dir).expanduser()
        self.download = download
        self.augment = augment

    # ---- what subclasses provide -------------------------------------------------------------
    def expected_paths(self, split: Split) -> list[Path]:
        """Files or directories that must exist before ``split`` can be loaded."""
        raise NotImplementedError

    def layout_hint(self) -> str:
        """One or two sentences saying what goes where, for error messages."""
        raise NotImplementedError

    def download_data(self) -> None:
        """Fetch the files into ``data_dir`` (called only when ``download=True`` and files are missing)."""
        raise NotImplementedError

    def load_split(self, split: Split, transform: Optional[Callable]) -> Dataset:
        """The torchvision dataset for ``split``, yielding ``(PIL image, int label)`` before ``transform``."""
        raise NotImplementedError

    def train_transform(self) -> Callable:
        """Transform for training samples (with augmentation when ``augment``)."""
        raise NotImplementedError

    def eval_transform(self) -> Callable:
        """Transform for validation and test samples (deterministic)."""
        raise NotImplementedError

    #: Whether ``download=True`` can fetch this dataset (ImageNet cannot: its licence requires a manual
    #: download), so the missing-data message only suggests it where it works.
    downloadable: bool = True

    # ---- shared behaviour --------------------------------------------------------------------
    def missing_paths(self, split: Optional[Split] = None) -> list[Path]:
        """Expected paths that do not exist, for one split or (``None``) both."""
        splits: tuple[Split, ...] = ("train", "test") if split is None else (split,)
        seen: dict[Path, None] = {}
        for s in splits:
            for p in self.expected_paths(s):
                if not p.exists():
                    seen[p] = None
        return list(seen)

    def _missing_message(self, missing: list[Path]) -> str:
        listed = ", ".join(
            str(p.relative_to(self.data_dir)) if p.is_relative_to(self.data_dir) else str(p) for p in missing
        )
        return f"{self.name} data not found: missing under {self.data_dir}: {listed}. {self.layout_hint()} " + (
            "Pass download=True to fetch it (needs network access), or place the files there."
            if self.downloadable
            else "It cannot be downloaded automatically: place the files there."
        )

    def prepare_data(self) -> None:
        """Download when asked to and needed; otherwise touch nothing (missing data is reported in ``setup``)."""
        if not self.download or not self.missing_paths():
            return
        try:
            with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT_S):
                self.download_data()
        except Exception as err:  # URLError, socket.timeout, torchvision's RuntimeError on bad md5, ...
            raise RuntimeError(
                f"downloading {self.name} into {self.data_dir} failed ({type(err).__name__}: {err}). "
                f"Without network access place the files yourself: {self.layout_hint()}"
            ) from err
        still_missing = self.missing_paths()
        if still_missing:
            raise RuntimeError("download finished but files are still missing. " + self._missing_message(still_missing))

    def _load_checked(self, split: Split, transform: Optional[Callable]) -> Dataset:
        missing = self.missing_paths(split)
        if missing:
            msg = self._missing_message(missing)
            if self.download:
                msg += " (download=True only downloads in prepare_data(); call it before setup(), as the Trainer does.)"
            raise FileNotFoundError(msg)
        try:
            return self.load_split(split, transform)
        except RuntimeError as err:
            # The files exist (checked above), so torchvision rejected them: wrong checksum or format.
            raise RuntimeError(
                f"{self.name} files are present under {self.data_dir} but torchvision rejected them ({err}). "
                f"They are probably corrupted, truncated or not the official release: delete them and "
                f"download again. {self.layout_hint()}"
            ) from err

    def setup(self, stage: Optional[str] = None) -> None:
        """Build the datasets the stage needs (idempotent: a second call reuses them)."""
        if stage in (None, "fit", "validate") and self.train_set is None:
            full = self._load_checked("train", None)
            n = len(cast(Sized, full))  # map-style: it has a length
            n_train, n_val, _ = split_lengths(n, self.val_fraction)
            train_idx, val_idx = split_indices(n, [n_train, n_val], self.seed)
            self.train_set = TransformedSubset(full, train_idx, self.train_transform())
            self.val_set = TransformedSubset(full, val_idx, self.eval_transform())
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._load_checked("test", self.eval_transform())
