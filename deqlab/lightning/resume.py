"""Exact resume and checkpoint integrity, as two Lightning callbacks.

Why callbacks and not hooks of `DEQLightningModule`: a subclass that overrides ``on_save_checkpoint``,
``on_load_checkpoint`` or ``on_train_start`` without calling ``super()`` would silently switch a module
hook off (a resumed run then drifts from the uninterrupted one with no message). Callbacks run whatever
the module overrides; the module returns both from ``configure_callbacks``, and they work the same for any
``LightningModule`` given them in ``Trainer(callbacks=[...])``.

* `CheckpointIntegrity`: every checkpoint file the Trainer reads is checked first (`check_checkpoint_file`)
  and a failed read is reported by name (`damage_reported_by_name`). It wraps the strategy's public
  ``checkpoint_io`` plugin (`CheckedCheckpointIO`) instead of patching the strategy.
* `ExactResume`: writes deqlab's entry ``checkpoint["deqlab"]`` (global RNG states, the training loader's
  position) and restores it when training starts, so a run resumed from any
  checkpoint, mid-epoch included, ends bit-identical to the uninterrupted run (CPU). A loader that
  Lightning checkpoints itself (one with ``state_dict``/``load_state_dict``: torchdata's
  ``StatefulDataLoader``, deqlab's data modules) is left to Lightning; a plain ``DataLoader`` with
  ``num_workers=0`` and a ``RandomSampler``, ``SequentialSampler`` or ``DistributedSampler`` is positioned
  by this callback; any other loader gets a `ResumeWarning` at resume naming it and what to use instead.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, cast

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import CheckpointIO
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from deqlab.lightning.checkpoint import check_checkpoint_file, damage_reported_by_name, restore_rng_state, rng_state

__all__ = ["CHECKPOINT_KEY", "CheckedCheckpointIO", "CheckpointIntegrity", "ExactResume", "ResumeWarning"]

#: Key of deqlab's own entry in a Lightning checkpoint (RNG states, loader position).
CHECKPOINT_KEY = "deqlab"

#: Samplers whose whole randomness is their ``generator`` (or, without one, one draw from the global RNG at
#: the start of a pass) or none: replaying a pass from the recorded state gives the same order (deqlab's
#: EpochSeededSampler, ordered by (seed, epoch), is added in `_replayable`).
_REPLAYABLE_SAMPLERS = (RandomSampler, SequentialSampler, DistributedSampler)


def _replayable(sampler: Any) -> bool:
    from deqlab.data.base import EpochSeededSampler

    return type(sampler) in _REPLAYABLE_SAMPLERS or type(sampler) is EpochSeededSampler


_INSTEAD = (
    "use torchdata's StatefulDataLoader (from torchdata.stateful_dataloader import StatefulDataLoader; "
    "the same arguments as DataLoader), which Lightning checkpoints itself, or a DataLoader with "
    "num_workers=0 and shuffle=True/False"
)


class ResumeWarning(UserWarning):
    """Warned when a resumed run cannot continue exactly as the uninterrupted run would.

    Its own class so that a script can turn it into an error (``warnings.simplefilter("error",
    ResumeWarning)``) where an inexact resume must not go unnoticed.

    Examples:
        >>> from deqlab.lightning.resume import ResumeWarning
        >>> issubclass(ResumeWarning, UserWarning)
        True
    """


class CheckedCheckpointIO(CheckpointIO):
    """A checkpoint IO plugin that checks a file before ``inner`` reads it and reports a failed read by name.

    Saving and removing go to ``inner`` unchanged. Loading runs `check_checkpoint_file` (a truncated, empty
    or corrupted file raises `CheckpointDamagedError` naming it before anything is read) and then
    ``inner.load_checkpoint`` inside `damage_reported_by_name` (damage only the unpickler sees is reported
    the same way).

    Args:
        inner: the plugin that does the reading and writing (the strategy's own, e.g. ``TorchCheckpointIO``
            or ``AsyncCheckpointIO``).

    Examples:
        >>> from lightning_fabric.plugins import TorchCheckpointIO
        >>> from deqlab.lightning.resume import CheckedCheckpointIO
        >>> io = CheckedCheckpointIO(TorchCheckpointIO())
        >>> type(io.inner).__name__
        'TorchCheckpointIO'
    """

    def __init__(self, inner: CheckpointIO) -> None:
        super().__init__()
        self.inner = inner

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        check_checkpoint_file(path)
        with damage_reported_by_name(path):
            return self.inner.load_checkpoint(path, *args, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


class CheckpointIntegrity(pl.Callback):
    """Report a damaged ``ckpt_path`` by name before the Trainer reads it.

    At ``setup`` (before Lightning loads ``ckpt_path`` in ``fit``/``validate``/``test``/``predict``) the
    strategy's ``checkpoint_io`` plugin is wrapped in `CheckedCheckpointIO`, once per strategy. Strategies
    that read checkpoints without their ``checkpoint_io`` (DeepSpeed) are not covered.
    `DEQLightningModule` returns this callback from ``configure_callbacks``.

    Examples:
        >>> import pytorch_lightning as pl
        >>> from deqlab.lightning.resume import CheckedCheckpointIO, CheckpointIntegrity
        >>> trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
        >>> CheckpointIntegrity().setup(trainer, None, "fit")
        >>> isinstance(trainer.strategy.checkpoint_io, CheckedCheckpointIO)
        True
    """

    def setup(self, trainer: "pl.Trainer", pl_module: Any, stage: str) -> None:
        strategy = trainer.strategy
        if not isinstance(strategy.checkpoint_io, CheckedCheckpointIO):
            strategy.checkpoint_io = CheckedCheckpointIO(strategy.checkpoint_io)


# ---------------------------------------------------------------------------------------------- loaders
def _describe(loader: Any) -> str:
    if isinstance(loader, DataLoader):
        sampler = (
            getattr(loader.batch_sampler, "sampler", loader.sampler)
            if loader.batch_sampler is not None
            else loader.sampler
        )
        return (
            f"{type(loader).__name__}(dataset={type(loader.dataset).__name__}, batch_sampler="
            f"{type(loader.batch_sampler).__name__}, sampler={type(sampler).__name__}, "
            f"num_workers={loader.num_workers})"
        )
    return type(loader).__name__


def _is_stateful(loader: Any) -> bool:
    """Lightning's own test (``CombinedLoader._state_dicts``): it checkpoints a loader with both methods."""
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


def _classify(loaders: Any) -> Tuple[str, Optional[DataLoader], str]:
    """``(kind, loader, why)`` for the Trainer's training loader(s): kind ``"stateful"`` (Lightning restores
    the position), ``"plain"`` (this callback does) or ``"unsupported"`` (``why`` says why)."""
    if isinstance(loaders, (list, tuple, dict)):
        items = list(loaders.values()) if isinstance(loaders, dict) else list(loaders)
        if items and all(_is_stateful(dl) for dl in items):
            return "stateful", None, ""
        if len(items) != 1:
            return "unsupported", None, f"{len(items)} training loaders, not all of them stateful"
        loaders = items[0]
    if _is_stateful(loaders):
        return "stateful", None, ""
    if not isinstance(loaders, DataLoader):
        return "unsupported", None, f"{type(loaders).__name__} is not a torch DataLoader"
    dl = loaders
    batch_sampler = dl.batch_sampler
    if batch_sampler is None or type(batch_sampler) is not BatchSampler:
        return "unsupported", dl, f"its batch sampler {type(batch_sampler).__name__} is not torch's BatchSampler"
    if not _replayable(batch_sampler.sampler):
        return (
            "unsupported",
            dl,
            (
                f"its sampler {type(batch_sampler.sampler).__name__} is none of RandomSampler, "
                "SequentialSampler, DistributedSampler, whose order deqlab can replay"
            ),
        )
    if dl.num_workers > 0:
        return (
            "unsupported",
            dl,
            (
                f"num_workers={dl.num_workers}: its workers take indices from the sampler when "
                "Lightning creates the loader's iterator, before deqlab can set its position"
            ),
        )
    return "plain", dl, ""


def _generators(dl: DataLoader) -> List[Optional[torch.Generator]]:
    """The loader's own generator and its sampler's (``None`` where absent; the same object may appear twice)."""
    sampler = _batch_sampler(dl).sampler if dl.batch_sampler is not None else dl.sampler
    return [dl.generator, getattr(sampler, "generator", None)]


def _batch_sampler(dl: DataLoader) -> BatchSampler:
    """The batch sampler of a ``"plain"`` loader: torch's ``BatchSampler`` (`_classify` checked it)."""
    return cast(BatchSampler, dl.batch_sampler)


def _sampler_source(sampler: Any) -> Tuple[str, Optional[torch.Generator]]:
    """Where the sampler's pass draws its randomness: its ``generator``, the global RNG, or nowhere."""
    if isinstance(sampler, RandomSampler):
        return ("generator", sampler.generator) if sampler.generator is not None else ("global", None)
    return "none", None


class _FirstDraw:
    """Stands in for a loader's sampler (as its batch sampler's ``sampler``) until the pass's first draw.

    torch's ``BatchSampler`` takes ``iter(self.sampler)`` at the first batch of a pass, after Lightning
    created the loader's iterator and after ``on_train_start``/``on_train_epoch_start``. At that moment
    this stand-in puts the real sampler back and hands the pass to ``start``, which records (or, resuming,
    sets) the state the pass starts from and returns the pass's iterator. Everything else (``len``,
    ``set_epoch``, ...) goes to the real sampler.

    Why a stand-in: Lightning keeps the loader's iterator to itself, and a plain ``DataLoader`` has no
    position to load; the batch sampler's public ``sampler`` attribute, read when a pass begins, is the one
    place where the pass's start can be seen and set without private attributes. The real sampler is back
    before the first index is drawn, and the stand-in is removed at the epoch's end, on exceptions and at
    teardown if no pass began.
    """

    def __init__(self, batch_sampler: BatchSampler, start: Callable[[Any], Iterator[int]]) -> None:
        self.__dict__.update(_batch_sampler=batch_sampler, _sampler=batch_sampler.sampler, _start=start)
        batch_sampler.sampler = self

    def __iter__(self) -> Iterator[int]:
        self.remove()
        return self._start(self._sampler)

    def __len__(self) -> int:
        return len(self._sampler)

    def __getattr__(self, name: str) -> Any:
        try:
            sampler = self.__dict__["_sampler"]
        except KeyError:  # not initialised (copy, unpickling)
            raise AttributeError(name) from None
        return getattr(sampler, name)

    def remove(self) -> None:
        if self._batch_sampler.sampler is self:
            self._batch_sampler.sampler = self._sampler


# ---------------------------------------------------------------------------------------------- the callback
class ExactResume(pl.Callback):
    """Make ``trainer.fit(..., ckpt_path=...)`` continue exactly as the uninterrupted run would.

    Lightning checkpoints weights, optimizer, schedulers and loop counters, but not the global random
    number generators (dropout masks, Hutchinson probes, augmentation in the main process) and, for a plain
    ``DataLoader``, not where the epoch's shuffle stood. This callback stores both in
    ``checkpoint["deqlab"]`` (plain tensors and tuples: ``torch.load(weights_only=True)`` reads it) and
    restores them at ``on_train_start``, after Lightning's setup and before the first batch is drawn:

    * the global RNG states of torch, numpy and Python (CUDA where the device count matches);
    * the training loader's position:

      - a stateful loader (``state_dict``/``load_state_dict``: deqlab's data modules' `ResumableDataLoader`,
        torchdata's ``StatefulDataLoader``) gets its position from Lightning. This callback adds what Lightning
        misses: a checkpoint at an epoch's last batch resumes with a fresh pass of the next epoch (Lightning
        would hand over the finished pass's position); at an epoch boundary the worker-seed draw that a new
        iterator makes from the global RNG is made again; when the training data was set up before the
        checkpoint was restored (``trainer.estimated_stepping_batches`` in ``configure_optimizers``, Lightning
        issue #20550) a `ResumableDataLoader` still gets its position. It warns where the order cannot come
        out right: a sampler shuffling with a generator carried over from earlier epochs, resumed at an epoch
        boundary; a sampler ordered by ``set_epoch`` (a ``DistributedSampler``) in a loader that makes its
        iterator before Lightning calls it, resumed after epoch 0; #20550 with another stateful loader;
      - a plain ``DataLoader`` with ``num_workers=0``, torch's ``BatchSampler`` and a ``RandomSampler``
        (with or without its own ``generator``), ``SequentialSampler`` or ``DistributedSampler`` (what
        Lightning puts in under DDP): the state its sampler's pass started from (the generator, or the
        global RNG for a sampler without one) and the batches already drawn are in the entry; the resumed
        pass starts from that state and skips those batches (index lists only, no data loaded), and the
        generators end where they were at the checkpoint;
      - any other loader: a `ResumeWarning` at resume names it and says what to use instead.

    Resuming from a checkpoint without deqlab's entry (written without this callback) warns as well.
    `DEQLightningModule` returns this callback from ``configure_callbacks``; give it to the Trainer for
    any other ``LightningModule``.

    Examples:
        >>> import pytorch_lightning as pl
        >>> from deqlab.lightning import ExactResume
        >>> trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[ExactResume()])
        >>> any(isinstance(c, ExactResume) for c in trainer.callbacks)
        True
    """

    def __init__(self) -> None:
        self._entry: Optional[Dict[str, Any]] = None  # deqlab's entry of the checkpoint being resumed
        self._ckpt: Any = None
        self._loader_states: Optional[List[Any]] = None  # the checkpoint's positions of stateful training loaders
        self._early_data = False  # the training data was set up before the checkpoint was restored
        self._epoch = 0  # epoch of the batches counted in _batches
        self._batches = 0  # batches drawn from the training loader in this epoch
        self._start_state: Optional[torch.Tensor] = None  # state the sampler's pass of this epoch started from
        self._plan: Optional[Dict[str, Any]] = None  # the resumed pass: start state and indices to skip
        self._stand_in: Optional[_FirstDraw] = None

    # ---- saving
    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: Any, checkpoint: Dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"rng": rng_state(), "train_loader": self._loader_record(trainer)}

    def _loader_record(self, trainer: "pl.Trainer") -> Dict[str, Any]:
        kind, dl, why = _classify(trainer.train_dataloader)
        record: Dict[str, Any] = {
            "kind": kind,
            "name": _describe(trainer.train_dataloader),
            "why": why,
            "epoch": self._epoch,
            "batches": self._batches,
            "epoch_batches": float(trainer.num_training_batches),
        }
        if kind == "plain" and dl is not None:
            record["start_state"] = self._start_state
            record["generators"] = [g.get_state() if g is not None else None for g in _generators(dl)]
        return record

    # ---- loading
    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: Any, checkpoint: Dict[str, Any]) -> None:
        self._ckpt = trainer.ckpt_path
        entry = checkpoint.get(CHECKPOINT_KEY)
        if not isinstance(entry, dict):
            warnings.warn(
                f"deqlab: checkpoint {str(self._ckpt)!r} has no deqlab entry (checkpoint['{CHECKPOINT_KEY}']): it was "
                "written without deqlab's ExactResume callback (a module that is no DEQLightningModule, or whose "
                "configure_callbacks drops deqlab's callbacks, or an old deqlab whose on_save_checkpoint a subclass "
                "overrode). Training continues, but the global RNG states and a plain DataLoader's position are not "
                "restored, so the result will differ from an uninterrupted run; resume from a checkpoint written "
                "with ExactResume attached for an exact continuation.",
                ResumeWarning,
                stacklevel=2,
            )
            return
        self._entry = entry
        self._loader_states = _loader_states(checkpoint)
        record = entry.get("train_loader") or {}
        if record.get("batches", 0) >= record.get("epoch_batches", float("inf")):
            # a checkpoint at the epoch's last batch: Lightning resumes with the next epoch but would hand the
            # loader the position of the finished pass (a stateful loader would continue that pass, or find it
            # exhausted); the uninterrupted run started a fresh pass there, so the resumed one does too
            _drop_loader_states(checkpoint)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        # the checkpoint's loop states are restored after this hook; data set up by now was set up early
        self._early_data = trainer.train_dataloader is not None

    # ---- training
    def on_train_start(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        entry, self._entry = self._entry, None
        kind, dl, why = _classify(trainer.train_dataloader)
        self._epoch = trainer.current_epoch
        if entry is not None:
            # restored here, after Lightning's setup and sanity check and before the first batch is drawn, so
            # the next random draw is the one the uninterrupted run made at this point
            restore_rng_state(entry["rng"])
            self._resume_loader(trainer, entry.get("train_loader"), kind, dl, why)
        if kind == "plain" and dl is not None:
            self._stand_in_for_sampler(dl)

    def _resume_loader(
        self, trainer: "pl.Trainer", record: Optional[Dict[str, Any]], kind: str, dl: Optional[DataLoader], why: str
    ) -> None:
        mid_epoch = bool(record and record.get("epoch") == trainer.current_epoch and record.get("batches", 0) > 0)
        name = _describe(trainer.train_dataloader)
        if kind == "unsupported":
            warnings.warn(
                f"deqlab: resuming from {str(self._ckpt)!r}, deqlab cannot restore the position and random state of "
                f"the training loader {name}: {why}. The resumed run draws different batches than the uninterrupted "
                f"run would; {_INSTEAD}.",
                ResumeWarning,
                stacklevel=2,
            )
            return
        if kind == "stateful":
            loader = trainer.train_dataloader
            if _wrapped_for_ddp(loader):
                warnings.warn(
                    f"deqlab: resuming from {str(self._ckpt)!r}, the training loader {name} has its own sampler wrapped "
                    "by Lightning for DDP (DistributedSamplerWrapper); the wrapped sampler's state (its generator) is "
                    "not checkpointed, so the resumed run draws another order. Give the loader a "
                    "DistributedSampler itself, e.g. deqlab.data.EpochSeededSampler(dataset, seed) (one shard per "
                    "process, ordered by (seed, epoch)), in a deqlab.data.ResumableDataLoader.",
                    ResumeWarning,
                    stacklevel=2,
                )
            elif trainer.current_epoch > 0 and _epoch_set_after_iterator(loader):
                warnings.warn(
                    f"deqlab: resuming from {str(self._ckpt)!r} in epoch {trainer.current_epoch}, the training loader "
                    f"{name} made its iterator, and with it the epoch's order, when Lightning set the data up, before "
                    "Lightning handed its sampler the epoch (set_epoch): the resumed epoch follows another epoch's order "
                    "(under DDP Lightning's DistributedSampler is such a sampler). Use deqlab.data.ResumableDataLoader "
                    "(StatefulDataLoader's arguments), which makes its iterator at the first batch.",
                    ResumeWarning,
                    stacklevel=2,
                )
            if mid_epoch:
                if self._early_data:
                    self._hand_over_position(trainer, name)
                return
            if _draws_worker_seed_from_global_rng(loader):
                # the uninterrupted run made this epoch's iterator after the checkpoint and drew its worker seed from
                # the global RNG then (torch's DataLoader iterator does, without a generator); Lightning made the
                # resumed run's before the restore. Make that one draw again.
                torch.empty((), dtype=torch.int64).random_()
            if _shuffled_by_generator_history(loader):
                warnings.warn(
                    f"deqlab: resuming from {str(self._ckpt)!r} at an epoch boundary, the training loader {name} shuffles "
                    "the new epoch with a generator that continues from the previous epochs, and Lightning restores no "
                    "loader state at an epoch boundary: the resumed epoch's order differs from the uninterrupted run's. "
                    "Use deqlab.data.ResumableDataLoader(dataset, sampler=EpochSeededSampler(dataset, seed), ...), "
                    "ordered by (seed, epoch), or a DataLoader with num_workers=0 and shuffle=True.",
                    ResumeWarning,
                    stacklevel=2,
                )
            return
        assert dl is not None
        if not record or record.get("kind") != "plain":
            if mid_epoch or record is None:
                warnings.warn(
                    f"deqlab: checkpoint {str(self._ckpt)!r} holds no position for the training loader {name} (it "
                    f"was written with another loader{'' if record is None else ': ' + str(record.get('name'))}), so "
                    "the resumed epoch does not continue where the uninterrupted run was.",
                    ResumeWarning,
                    stacklevel=2,
                )
            return
        for g, state in zip(_generators(dl), record.get("generators") or []):
            if g is not None and state is not None:
                g.set_state(state)  # where they were at the checkpoint (the resumed pass replays from its start)
        if mid_epoch:
            start = record.get("start_state")
            source, _ = _sampler_source(_batch_sampler(dl).sampler)
            if start is None and source != "none":
                warnings.warn(
                    f"deqlab: checkpoint {str(self._ckpt)!r} lacks the state the epoch's shuffle started "
                    f"from, so the training loader {name} cannot continue its epoch exactly.",
                    ResumeWarning,
                    stacklevel=2,
                )
            assert dl.batch_size is not None  # a torch BatchSampler was built from batch_size
            self._plan = {"state": start, "skip": int(record["batches"]) * int(dl.batch_size)}
        else:
            # the uninterrupted run created this epoch's iterator after the checkpoint, drawing its worker seed
            # from the loader's generator (or the global RNG); Lightning created the resumed run's before the
            # restore. Creating one more with torch's own code makes the same draw (no data is loaded).
            iter(dl)

    def _hand_over_position(self, trainer: "pl.Trainer", name: str) -> None:
        """The training data was set up before the checkpoint was restored (``trainer.estimated_stepping_batches``
        in ``configure_optimizers`` does that), and Lightning then never hands the loader its checkpointed
        position (Lightning issue #20550). A `ResumableDataLoader` has made no iterator yet: it gets the
        position here. Any other stateful loader has one already, which a late ``load_state_dict`` does not
        reach: warn."""
        from deqlab.data.base import ResumableDataLoader

        loader = trainer.train_dataloader
        if isinstance(loader, ResumableDataLoader) and self._loader_states:
            loader.load_state_dict(self._loader_states[0])
            return
        warnings.warn(
            f"deqlab: resuming from the mid-epoch checkpoint {str(self._ckpt)!r}, Lightning did not hand the training "
            f"loader {name} its position: the training data was set up before the checkpoint was restored "
            "(trainer.estimated_stepping_batches in configure_optimizers does that; Lightning issue #20550), so the "
            "epoch restarts from its first batch. Ask for the number of steps when training starts instead (as "
            "DEQLightningModule's cosine schedule does), or use deqlab.data.ResumableDataLoader, which takes its "
            "position late.",
            ResumeWarning,
            stacklevel=3,
        )

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        self._epoch, self._batches = trainer.current_epoch, 0
        kind, dl, _ = _classify(trainer.train_dataloader)
        if kind == "plain" and dl is not None:
            self._stand_in_for_sampler(dl)

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._epoch, self._batches = trainer.current_epoch, batch_idx + 1

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        self._put_sampler_back()

    def on_train_end(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        self._put_sampler_back()

    def on_exception(self, trainer: "pl.Trainer", pl_module: Any, exception: BaseException) -> None:
        self._put_sampler_back()

    def teardown(self, trainer: "pl.Trainer", pl_module: Any, stage: str) -> None:
        self._put_sampler_back()

    # ---- the plain loader's sampler
    def _stand_in_for_sampler(self, dl: DataLoader) -> None:
        if self._stand_in is not None and _batch_sampler(dl).sampler is self._stand_in:
            return  # already waiting for this pass's first draw
        self._put_sampler_back()
        self._stand_in = _FirstDraw(_batch_sampler(dl), self._first_draw)

    def _put_sampler_back(self) -> None:
        if self._stand_in is not None:
            self._stand_in.remove()
            self._stand_in = None

    def _first_draw(self, sampler: Any) -> Iterator[int]:
        """The pass of ``sampler`` for this epoch: record the state it starts from, or, resuming mid-epoch,
        start it from the recorded state and skip the indices the uninterrupted run had drawn."""
        self._stand_in = None
        source, generator = _sampler_source(sampler)
        plan, self._plan = self._plan, None
        outer = torch.get_rng_state() if source == "global" and plan is not None else None
        if plan is not None and plan["state"] is not None:
            if generator is not None:  # source "generator"
                generator.set_state(plan["state"])
            elif source == "global":
                torch.set_rng_state(plan["state"])
        self._start_state = (
            generator.get_state() if generator is not None else torch.get_rng_state() if source == "global" else None
        )
        indices = iter(sampler)
        if plan is not None:
            for _ in range(plan["skip"]):
                if next(indices, None) is None:
                    break
        if outer is not None:  # the sampler's own draw is done: the global RNG goes back to the checkpoint's
            torch.set_rng_state(outer)
        return indices


def _draws_worker_seed_from_global_rng(loader: Any) -> bool:
    """Whether a new epoch of this stateful loader makes a new iterator right away (no persistent workers), and
    that iterator draws its worker seed from the global RNG (no ``generator``). deqlab's `ResumableDataLoader`
    makes its iterator at the first batch, after the restore, and draws from its own generator."""
    from deqlab.data.base import ResumableDataLoader

    if not isinstance(loader, DataLoader) or isinstance(loader, ResumableDataLoader) or loader.generator is not None:
        return False
    return not (loader.persistent_workers and loader.num_workers > 0)


def _wrapped_for_ddp(loader: Any) -> bool:
    """Whether Lightning wrapped the loader's own sampler in a ``DistributedSamplerWrapper`` for DDP."""
    from lightning_fabric.utilities.distributed import DistributedSamplerWrapper

    samplers = (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None))
    return any(isinstance(s, DistributedSamplerWrapper) for s in samplers)


def _epoch_set_after_iterator(loader: Any) -> bool:
    """Whether ``loader``'s order depends on the epoch Lightning sets (``set_epoch``) after the resumed run made its
    iterator: a stateful loader other than deqlab's `ResumableDataLoader` (which makes its iterator at the first
    batch) whose sampler takes ``set_epoch`` and is not deqlab's lazy `EpochSeededSampler`."""
    from deqlab.data.base import EpochSeededSampler, ResumableDataLoader

    if not isinstance(loader, DataLoader) or isinstance(loader, ResumableDataLoader):
        return False
    samplers = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    return any(callable(getattr(s, "set_epoch", None)) and not isinstance(s, EpochSeededSampler) for s in samplers)


def _shuffled_by_generator_history(loader: Any) -> bool:
    """Whether ``loader``'s sampler draws each epoch's order from a generator that carries over from the previous
    epochs (torch's or torchdata's ``RandomSampler``), rather than from ``(seed, epoch)``."""
    from torchdata.stateful_dataloader.sampler import RandomSampler as StatefulRandomSampler

    return isinstance(getattr(loader, "sampler", None), (RandomSampler, StatefulRandomSampler))


def _fit_loop_state(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    loops = checkpoint.get("loops")
    fit_state = loops.get("fit_loop", {}).get("state_dict", {}) if isinstance(loops, dict) else {}
    return fit_state if isinstance(fit_state, dict) else {}


def _drop_loader_states(checkpoint: Dict[str, Any]) -> None:
    """Remove the training loaders' positions from a Lightning checkpoint (see `_loader_states`)."""
    _fit_loop_state(checkpoint).pop("combined_loader", None)


def _loader_states(checkpoint: Dict[str, Any]) -> Optional[List[Any]]:
    """The positions of the stateful training loaders in a Lightning checkpoint (``None`` when absent).

    With `_drop_loader_states` the one place that knows where Lightning keeps them
    (``loops/fit_loop/state_dict/combined_loader``, written by Lightning's fit loop in ``on_save_checkpoint``);
    ``tests/lightning/test_lightning_resume_callbacks.py`` fails when a Lightning version moves them.
    """
    states = _fit_loop_state(checkpoint).get("combined_loader")
    return list(states) if isinstance(states, list) else None
