"""The callbacks a `DEQLightningModule` trains with, and the check that they are attached.

Why callbacks: each policy around the step (pretraining, the non-finite guard, the backward's statistics,
timing, the HParams tab, checkpoint integrity, exact resume, the figures) acts in Lightning hooks, and a
callback's hooks run whatever a subclass overrides, where a module hook overridden without ``super()`` is
silently gone. The module returns them from ``configure_callbacks``; the one way left to lose them is a
``configure_callbacks`` override that does not return ``super().configure_callbacks()``, which
`warn_if_detached` reports.
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Sequence

import pytorch_lightning as pl

from deqlab.lightning.callbacks import ConvergenceFigure, NFEHistogram
from deqlab.lightning.hparams import HParamsTab
from deqlab.lightning.nonfinite import NonFiniteGuard
from deqlab.lightning.pretraining import PretrainingSchedule
from deqlab.lightning.resume import CheckpointIntegrity, ExactResume
from deqlab.lightning.solver_stats import BackwardStats
from deqlab.lightning.timing import PhaseTiming
from deqlab.spec.training import DEQTrainingConfig

__all__ = ["PolicyWarning", "deqlab_callbacks", "missing_callbacks", "warn_if_detached"]


class PolicyWarning(UserWarning):
    """Warned when a `DEQLightningModule` trains without one of the callbacks it attaches (its
    ``configure_callbacks`` override does not return ``super().configure_callbacks()``).

    Its own class so that a script can turn it into an error (``warnings.simplefilter("error",
    PolicyWarning)``).

    Examples:
        >>> from deqlab.lightning import PolicyWarning
        >>> issubclass(PolicyWarning, UserWarning)
        True
    """


def deqlab_callbacks(cfg: DEQTrainingConfig) -> List[pl.Callback]:
    """Fresh instances of the callbacks a `DEQLightningModule` with settings ``cfg`` trains with.

    Always `PretrainingSchedule` (``pretrain_steps``, ``pretrain_depth``), `NonFiniteGuard` (``on_nonfinite``),
    `BackwardStats` (``log_solver_stats``), `CheckpointIntegrity` and `ExactResume`; `PhaseTiming` with
    ``log_timing`` (first, so that the backward's time ends before the batch is judged), `HParamsTab` with
    ``log_hparams_metrics``, `NFEHistogram` and `ConvergenceFigure` with ``log_figures``. Their order is the
    order their hooks run in.

    Args:
        cfg: the module's training settings.

    Returns:
        The callbacks, new instances.

    Examples:
        >>> from deqlab.lightning.policies import deqlab_callbacks
        >>> from deqlab.spec import DEQTrainingConfig
        >>> [type(c).__name__ for c in deqlab_callbacks(DEQTrainingConfig(log_figures=False))]
        ['PhaseTiming', 'PretrainingSchedule', 'NonFiniteGuard', 'BackwardStats', 'HParamsTab', 'CheckpointIntegrity', 'ExactResume']
    """
    ours: List[pl.Callback] = [PhaseTiming()] if cfg.log_timing else []  # first: the phases end before the judging
    ours += [
        PretrainingSchedule(cfg.pretrain_steps, cfg.pretrain_depth),
        NonFiniteGuard(cfg.on_nonfinite),
        BackwardStats(log_scalars=cfg.log_solver_stats),
    ]
    if cfg.log_hparams_metrics:
        ours.append(HParamsTab())
    ours += [CheckpointIntegrity(), ExactResume()]
    if cfg.log_figures:
        ours += [NFEHistogram(), ConvergenceFigure()]
    return ours


def missing_callbacks(trainer: Optional["pl.Trainer"], callbacks: Sequence[pl.Callback]) -> List[pl.Callback]:
    """The ``callbacks`` of a type the Trainer has no instance of (an instance given to the Trainer takes
    precedence: one instance of each type).

    Args:
        trainer: the Trainer (``None``: none attached, every callback is missing).
        callbacks: the callbacks to look for, by type.

    Returns:
        Those whose type (or a subclass of it) is not among ``trainer.callbacks``, in order.

    Examples:
        >>> import pytorch_lightning as pl
        >>> from deqlab.lightning import ExactResume, NonFiniteGuard
        >>> from deqlab.lightning.policies import missing_callbacks
        >>> trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[ExactResume()])
        >>> [type(c).__name__ for c in missing_callbacks(trainer, [ExactResume(), NonFiniteGuard()])]
        ['NonFiniteGuard']
    """
    # Trainer.callbacks is set by Lightning's callback connector, not declared on the class
    existing = list(trainer.callbacks) if trainer is not None else []  # type: ignore[attr-defined]
    return [cb for cb in callbacks if not any(isinstance(c, type(cb)) for c in existing)]


def warn_if_detached(owner: str, trainer: "pl.Trainer", cfg: DEQTrainingConfig) -> None:
    """Warn `PolicyWarning` when one of the callbacks of `deqlab_callbacks` is not among ``trainer``'s,
    naming each and what it costs.

    Args:
        owner: the module's class name, for the message.
        trainer: the Trainer that trains it.
        cfg: the module's training settings.

    Examples:
        >>> import warnings
        >>> import pytorch_lightning as pl
        >>> from deqlab.lightning.policies import warn_if_detached
        >>> from deqlab.spec import DEQTrainingConfig
        >>> trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_if_detached("MyDEQ", trainer, DEQTrainingConfig(log_figures=False, log_timing=False,
        ...                                                           log_hparams_metrics=False))
        >>> str(caught[0].message)[:100]
        "deqlab: MyDEQ trains without deqlab's PretrainingSchedule, NonFiniteGuard, BackwardStats, Checkpoint"
    """
    missing = [type(cb).__name__ for cb in missing_callbacks(trainer, deqlab_callbacks(cfg))]
    if not missing:
        return
    names = ", ".join(missing[:-1]) + " and " + missing[-1] if len(missing) > 1 else missing[0]
    warnings.warn(
        f"deqlab: {owner} trains without deqlab's {names} callback(s): its configure_callbacks does not return "
        "super().configure_callbacks(). Without them the pretraining schedule is not applied, non-finite batches "
        "reach the weights, the backward's statistics and timing are not logged, and its checkpoints lack "
        "deqlab's entry (RNG states, loader position), so a run resumed from them differs from an uninterrupted "
        "one. Return [*super().configure_callbacks(), ...], or pass the missing callbacks to the Trainer "
        "(deqlab.lightning.policies.deqlab_callbacks(model.deq_config) builds them); switch the optional ones off "
        "with log_timing, log_hparams_metrics or log_figures=False.",
        PolicyWarning,
        stacklevel=3,
    )
