"""What the DEQ solves of a step did, as logged scalars: the forward's (logged by the step) and the backward's
(logged by `BackwardStats` after ``loss.backward()``).

Why a callback for the backward: its numbers exist only once the backward ran, and a module hook
(``on_after_backward``) that a subclass overrides without ``super()`` would lose them and leave the step
record's backward part empty for every callback that reads it.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
import torch
from torch import Tensor

from deqlab.lightning._pending import PendingStep
from deqlab.lightning._stats import STATUSES, SolutionSummary
from deqlab.nn.solution import DeepEquilibriumSolution

__all__ = ["BackwardStats", "log_solver_summary"]


def log_solver_summary(pl_module: pl.LightningModule, s: SolutionSummary, stage: str, **kw: Any) -> None:
    """Log a step's forward solver statistics under ``solver/{stage}_...`` with ``pl_module.log``.

    NFE (and the paper's reference count where reported); the absolute and relative residuals (mean and
    max), the stopping test's objective (max) and its tolerance; the spectral radius of ``∂f/∂z`` at
    ``z*`` (mean and max, when a layer estimates it: ``DeepEquilibriumNetwork(spectral_radius=...)``); the
    fractions of the *samples* converged, unconverged and stalled; and the fraction of the *solves* (a layer on
    a batch) ending with each solver status. Evaluation scalars are epoch means (weighted by batch size),
    training ones per step.

    Args:
        pl_module: the module that logs (inside one of its steps).
        s: the step's `SolutionSummary`.
        stage: ``"train"``, ``"val"`` or ``"test"``.
        **kw: ``self.log`` options for every scalar (``on_step``, ``on_epoch``, ``batch_size``, ``sync_dist``).

    Examples:
        >>> import torch
        >>> from deqlab.lightning._stats import summarize
        >>> from deqlab.lightning.solver_stats import log_solver_summary
        >>> class Recorder:  # stands in for a LightningModule
        ...     def __init__(self): self.names = []
        ...     def log(self, name, value, **kw): self.names.append(name)
        >>> module = Recorder()
        >>> log_solver_summary(module, summarize([], like=torch.zeros(())), "val")
        >>> module.names
        ['solver/val_nfe']
    """
    pl_module.log(f"solver/{stage}_nfe", float(s.nfe), prog_bar=True, **kw)
    if s.reference_nfe is not None:  # the paper's count, beside ours (deqlab.solvers.counting)
        pl_module.log(f"solver/{stage}_reference_nfe", s.reference_nfe, **kw)
    as_max = {**kw, "reduce_fx": "max"}
    for name, value, kwargs in (
        ("abs_residual_mean", s.abs_residual_mean, kw),
        ("abs_residual_max", s.abs_residual_max, as_max),
        ("rel_residual_mean", s.rel_residual_mean, kw),
        ("rel_residual_max", s.rel_residual_max, as_max),
        ("objective_max", s.objective_max, as_max),
        ("spectral_radius_mean", s.spectral_radius_mean, kw),
        ("spectral_radius_max", s.spectral_radius_max, as_max),
    ):
        if value is not None:
            pl_module.log(f"solver/{stage}_{name}", value, **kwargs)
    if s.tolerance is not None:  # beside the objective it bounds
        pl_module.log(f"solver/{stage}_tolerance", float(s.tolerance), **as_max)
    # what each counter counts is in its name: fractions of the *samples*, fractions of the *solves* (a solve:
    # one DEQ layer on one batch); on one run they agree (samples_converged == 1 exactly when every solve did)
    if s.converged_fraction is not None:
        pl_module.log(f"solver/{stage}_samples_converged", s.converged_fraction, **kw)
        pl_module.log(f"solver/{stage}_samples_unconverged", 1.0 - s.converged_fraction, **kw)
    if s.stalled_fraction is not None:  # among the unconverged: stopped by the patience rule near tol
        pl_module.log(f"solver/{stage}_samples_stalled", s.stalled_fraction, **kw)
    for status in STATUSES:  # a diverging model shows solver/train_solves_diverged
        fraction = s.solves_fraction(status)  # None without a solve
        if fraction is not None:
            pl_module.log(f"solver/{stage}_solves_{status}", float(fraction), **kw)


def backward_unconverged_fraction(solutions: List[DeepEquilibriumSolution]) -> Optional[float]:
    """Fraction of samples whose adjoint solve did not converge, over the records that say so.

    ``backward_converged`` is filled by the backward (``None`` until one ran, and for backward modes
    without a solve); a bool covers the layer's whole batch, a tensor is per sample.
    """
    flags: List[Tensor] = []
    for s in solutions:
        conv = s.backward_converged
        if conv is None:
            continue
        n = int(s.abs_residual.numel()) if s.abs_residual is not None else 1
        flags.append(
            conv.detach().reshape(-1).float() if torch.is_tensor(conv) else torch.full((n,), float(bool(conv)))
        )
    if not flags:
        return None
    return float(1.0 - torch.cat(flags).mean())


class BackwardStats(pl.Callback):
    """After every training backward: fill the step record's backward part and log the backward's numbers.

    The backward fills each solution record's ``backward_nfe`` (and ``backward_converged`` where the backward
    mode solves); this callback sums them into the step's [`StepRecord`][deqlab.lightning.StepRecord]
    (``backward_nfe``, ``backward_unconverged_fraction``, which every callback reads in
    ``on_train_batch_end``) and logs ``solver/train_backward_nfe`` and ``solver/train_backward_samples_unconverged``
    per step and ``solver/train_backward_nfe_epoch`` for the batches that train. A batch whose forward ran on a
    zero-filled stand-in of a NaN input logs nothing (its numbers describe the copy).

    It reads ``pl_module.pending_step`` (set by `DEQLightningModule`'s training step); for a module without
    one it does nothing. `DEQLightningModule` attaches one from ``configure_callbacks``.

    Args:
        log_scalars: also log the scalars (the record is filled either way). Default ``True``;
            `DEQLightningModule` passes its ``log_solver_stats``. (Not ``log``: Lightning gives every
            callback a ``log`` method of its own.)

    Examples:
        >>> from deqlab.lightning import BackwardStats
        >>> BackwardStats(log_scalars=False).log_scalars
        False
    """

    def __init__(self, log_scalars: bool = True) -> None:
        self.log_scalars = log_scalars

    def on_after_backward(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        step = getattr(pl_module, "pending_step", None)
        if not isinstance(step, PendingStep) or not step.solutions:
            return
        # the backward fills the records: solution.backward_nfe (and backward_converged where available)
        bnfe = float(sum(s.backward_nfe for s in step.solutions))
        unconverged = backward_unconverged_fraction(step.solutions)
        step.record.backward_nfe = bnfe
        step.record.backward_unconverged_fraction = unconverged
        if not self.log_scalars or step.stand_in:
            return
        pl_module.log("solver/train_backward_nfe", bnfe, on_step=True, on_epoch=False, prog_bar=True)
        epoch: Dict[str, Any] = dict(on_step=False, on_epoch=True, sync_dist=True)
        step.when_trained(partial(pl_module.log, "solver/train_backward_nfe_epoch", bnfe, **epoch))
        if unconverged is not None:
            pl_module.log("solver/train_backward_samples_unconverged", unconverged, on_step=True, on_epoch=False)
