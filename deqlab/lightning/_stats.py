"""Reduce one or several ``DeepEquilibriumSolution`` records to the numbers the module logs, and the
per-step record the module hands to callbacks.

Why a separate step: a network may hold several DEQ layers (or none during an ablation); the module
composes the loss and logs from this one summary whatever the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from deqlab.nn.solution import DeepEquilibriumSolution
from deqlab.solvers.result import SolverStatus

__all__ = ["SolutionSummary", "StepRecord", "as_solution_list", "split_forward_output", "summarize"]

STATUSES = tuple(s.value for s in SolverStatus)


def as_solution_list(solution: Any, *, owner: str = "the model") -> List[DeepEquilibriumSolution]:
    """``None`` → ``[]``, a single solution → ``[solution]``, a sequence of solutions → a list.

    Anything else raises ``TypeError``: the second element of ``forward``'s result must be the DEQ
    layer's record (or ``None``), not a tensor or another value.

    Args:
        solution: the second element of a model's ``forward`` result.
        owner: who returned it, for the error message. Default ``"the model"``; the module passes its
            class name.

    Returns:
        The solution records, ``None`` entries dropped.

    Raises:
        TypeError: when ``solution`` (or an entry of it) is not a ``DeepEquilibriumSolution`` or ``None``.

    Examples:
        >>> import torch
        >>> from deqlab.lightning._stats import as_solution_list
        >>> as_solution_list(None)
        []
        >>> as_solution_list(torch.zeros(1))
        Traceback (most recent call last):
        ...
        TypeError: the model: forward(x) must return (output, solution) where solution is ...; got a Tensor as solution
    """
    if solution is None:
        return []
    items = list(solution) if isinstance(solution, (list, tuple)) else [solution]
    items = [s for s in items if s is not None]
    for s in items:
        if not isinstance(s, DeepEquilibriumSolution):
            raise TypeError(
                f"{owner}: forward(x) must return (output, solution) where solution is the DEQ layer's "
                f"DeepEquilibriumSolution, a list of them, or None; got a {type(s).__name__} as solution"
            )
    return items


def split_forward_output(result: Any, *, owner: str = "the model") -> Tuple[Any, List[DeepEquilibriumSolution]]:
    """``(output, solution records)`` from what a model's ``forward`` returned, the contract checked.

    The one check of the forward contract: the training, validation, test and predict steps and the
    convergence-figure callback all unpack the forward through it, so a ``forward`` that returns only
    logits gets the same message everywhere instead of being unpacked row by row.

    Args:
        result: what ``forward(x)`` returned; must be a pair ``(output, solution)``.
        owner: who returned it, for the error message. Default ``"the model"``; the module passes its
            class name.

    Returns:
        The output and the solution records (see `as_solution_list`).

    Raises:
        TypeError: when ``result`` is not a pair, or its second element is not a solution record, a list
            of them or ``None``.

    Examples:
        >>> import torch
        >>> from deqlab.lightning._stats import split_forward_output
        >>> split_forward_output((torch.zeros(2, 3), None))[1]
        []
        >>> split_forward_output(torch.zeros(2, 3))
        Traceback (most recent call last):
        ...
        TypeError: the model.forward(x) must return a pair (output, solution): ...; got a Tensor
    """
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        got = f"a tuple of {len(result)}" if isinstance(result, (tuple, list)) else f"a {type(result).__name__}"
        raise TypeError(
            f"{owner}.forward(x) must return a pair (output, solution): the model output and "
            "the DEQ layer's DeepEquilibriumSolution (a list of them for several DEQ layers, None for a model "
            f"without one), e.g. `z, solution = self.deq(h); return self.head(z), solution`; got {got}"
        )
    output, solution = result
    return output, as_solution_list(solution, owner=owner)


@dataclass
class SolutionSummary:
    """Sums over DEQ layers of the per-batch quantities (one layer is the usual case).

    Built by `summarize`, which documents each field.

    Attributes:
        skip_loss: the layers' skip losses, summed (a scalar tensor).
        jacobian_loss: the layers' Jacobian terms, summed (a scalar tensor).
        nfe: forward function evaluations, summed.
        reference_nfe: the forward NFE as the paper's reference code counted them
            (`DeepEquilibriumSolution.reference_nfe`), summed; ``None`` when no layer reports it.
        abs_residual_mean: mean absolute residual ``||f(z*) - z*||`` over all samples of all layers; ``None``
            when none reports one.
        abs_residual_max: largest absolute residual; ``None`` when none reports one.
        rel_residual_mean: mean relative residual ``||f(z*) - z*|| / ||f(z*)||``; ``None`` when none reports one.
        rel_residual_max: largest relative residual; ``None`` when none reports one.
        objective_max: largest value of the solvers' stopping objective (what the tolerance bounds: the
            relative residual for ``rel_*`` modes, the absolute one for ``abs_*``); ``None`` when not reported.
        tolerance: the largest tolerance of the layers' stopping tests (with one layer: its tolerance);
            ``None`` when not reported.
        converged_fraction: fraction of samples whose solve converged; ``None`` when none reports it.
        status_counts: solver status value → number of solves (layers × this batch) that ended with it.
        stalled_fraction: fraction of samples the patience rule stopped near, not within, the tolerance
            (counted among the unconverged ones; a layer without a solver result counts none); ``None``
            when no layer reports convergence.
        spectral_radius_mean: mean of the per-sample estimates of ``ρ(∂f/∂z)`` at ``z*``
            (`DeepEquilibriumSolution.spectral_radius`, filled by a layer built with ``spectral_radius=...``);
            ``None`` when no layer reports one.
        spectral_radius_max: the largest of those estimates; ``None`` when no layer reports one.

    Examples:
        >>> import torch
        >>> from deqlab.lightning._stats import summarize
        >>> summarize([], like=torch.zeros(())).nfe
        0.0
    """

    skip_loss: Tensor
    jacobian_loss: Tensor
    nfe: float
    reference_nfe: Optional[float]
    abs_residual_mean: Optional[Tensor]
    abs_residual_max: Optional[Tensor]
    converged_fraction: Optional[Tensor]
    status_counts: Dict[str, int]
    stalled_fraction: Optional[Tensor] = None
    rel_residual_mean: Optional[Tensor] = None
    rel_residual_max: Optional[Tensor] = None
    objective_max: Optional[Tensor] = None
    tolerance: Optional[float] = None
    spectral_radius_mean: Optional[Tensor] = None
    spectral_radius_max: Optional[Tensor] = None

    @property
    def solves(self) -> int:
        """Solves in this summary (DEQ layers × this batch)."""
        return int(sum(self.status_counts.values()))

    def solves_fraction(self, status: str) -> Optional[float]:
        """Fraction of the solves that ended with ``status`` (``None`` without a solve): what
        ``solver/{stage}_solves_{status}`` logs, the batch-level view beside the sample-level
        ``converged_fraction``."""
        n = self.solves
        return None if n == 0 else self.status_counts.get(status, 0) / n

    @property
    def unconverged_fraction(self) -> Optional[Tensor]:
        """``1 - converged_fraction``; ``None`` when convergence is not reported."""
        return None if self.converged_fraction is None else 1.0 - self.converged_fraction


def summarize(solutions: Sequence[DeepEquilibriumSolution], like: Tensor) -> SolutionSummary:
    """Add up losses and NFE of ``solutions``; residual/convergence stats over all layers' samples.

    Args:
        solutions: the step's solution records (empty for a model without a DEQ layer).
        like: a tensor on the loss's device and dtype; the zero losses are made like it, so the sums can
            be added to the task loss whatever the architecture.

    Returns:
        The summary, a `SolutionSummary`.

    Examples:
        >>> import torch
        >>> from deqlab.lightning._stats import summarize
        >>> from deqlab.zoo import DigitsDEQ
        >>> _, solution = DigitsDEQ(width=8)(torch.randn(4, 64))
        >>> summary = summarize([solution], like=torch.zeros(()))
        >>> summary.status_counts["converged"], float(summary.converged_fraction), float(summary.stalled_fraction)
        (1, 1.0, 0.0)
    """
    zero = like.new_zeros(())
    skip = zero
    jac = zero
    nfe = 0.0
    reference: Optional[float] = None
    residuals: List[Tensor] = []
    rels: List[Tensor] = []
    objectives: List[Tensor] = []
    tolerance: Optional[float] = None
    converged: List[Tensor] = []
    stalled: List[Tensor] = []
    radii: List[Tensor] = []
    counts = {s: 0 for s in STATUSES}
    for s in solutions:
        skip = skip + _scalar(s.skip_loss, zero)
        jac = jac + _scalar(s.jacobian_loss, zero)
        nfe += float(s.nfe)
        ref = getattr(s, "reference_nfe", None)  # a researcher's own record type may lack it
        if ref is not None:
            reference = float(ref) if reference is None else reference + float(ref)
        if s.abs_residual is not None:
            residuals.append(s.abs_residual.detach().reshape(-1).float())
        rel = getattr(s, "rel_residual", None)
        if rel is not None:
            rels.append(rel.detach().reshape(-1).float())
        result = getattr(s, "solver_result", None)
        if result is not None and getattr(result, "objective", None) is not None:
            objectives.append(result.objective.detach().reshape(-1).float())
            if result.tolerance is not None:
                tolerance = result.tolerance if tolerance is None else max(tolerance, result.tolerance)
        if s.converged is not None:
            conv_s = s.converged.detach().reshape(-1).float()
            converged.append(conv_s)
            stall_s = s.stalled
            stalled.append(torch.zeros_like(conv_s) if stall_s is None else stall_s.detach().reshape(-1).float())
        rho = getattr(s, "spectral_radius", None)
        if rho is not None:
            radii.append(rho.detach().reshape(-1).float())
        status = SolverStatus(s.status).value
        counts[status] = counts.get(status, 0) + 1
    res = torch.cat(residuals) if residuals else None
    rel_all = torch.cat(rels) if rels else None
    obj = torch.cat(objectives) if objectives else None
    conv = torch.cat(converged) if converged else None
    rho_all = torch.cat(radii) if radii else None
    return SolutionSummary(
        skip_loss=skip,
        jacobian_loss=jac,
        nfe=nfe,
        reference_nfe=reference,
        abs_residual_mean=res.mean() if res is not None and res.numel() else None,
        abs_residual_max=res.max() if res is not None and res.numel() else None,
        rel_residual_mean=rel_all.mean() if rel_all is not None and rel_all.numel() else None,
        rel_residual_max=rel_all.max() if rel_all is not None and rel_all.numel() else None,
        objective_max=obj.max() if obj is not None and obj.numel() else None,
        tolerance=tolerance,
        converged_fraction=conv.mean() if conv is not None and conv.numel() else None,
        status_counts=counts,
        stalled_fraction=torch.cat(stalled).mean() if conv is not None and conv.numel() else None,
        spectral_radius_mean=rho_all.mean() if rho_all is not None and rho_all.numel() else None,
        spectral_radius_max=rho_all.max() if rho_all is not None and rho_all.numel() else None,
    )


def _scalar(value: Any, zero: Tensor) -> Tensor:
    if value is None:
        return zero
    if not torch.is_tensor(value):
        return zero + float(value)
    return value.to(zero.dtype).mean()


class StepRecord:
    """What one step of [`DEQLightningModule`][deqlab.lightning.DEQLightningModule] did: the one channel to callbacks.

    Every ``training_step`` / ``validation_step`` / ``test_step`` returns ``{"loss": loss, "deq": record}``;
    a callback reads ``outputs["deq"]`` in ``on_{train,validation,test}_batch_end``. Plain numbers only
    (no tensors or graphs), filled from the solution records: the forward part by the step, the backward
    part (``backward_nfe``, ``backward_unconverged_fraction``) after ``loss.backward()``, and ``skipped``
    when the non-finite policy dropped the update.

    A plain class, not a dataclass, on purpose: Lightning deep-copies dataclasses in step outputs, and
    the backward part is filled in after the step returned.

    The module builds the record; a callback only reads it. No argument has a default: every step knows
    all of them, and a missing one would be a bug in the step rather than something to guess.

    Args:
        stage: ``"train"``, ``"val"`` or ``"test"``: which loop ran the step.
        batch_idx: index of the batch within its epoch, as Lightning passes it to the step.
        nfe: forward function evaluations, summed over the model's DEQ layers (0.0 for a model without one).
        abs_residual_mean: mean absolute residual ``||f(z*) - z*||`` over all samples of all DEQ layers;
            ``None`` when no layer reports residuals. (``residual_mean``, its old name, still reads, warning.)
        forward_time: wall time of the forward in seconds (device-synchronized on CUDA); ``None`` when it
            was not timed.
        status_counts: solver status value (``"converged"``, ``"max_steps"``, ...) → number of DEQ layers
            that ended with it in this step. Copied, so a later change to the caller's dict does not leak in.
        unconverged_fraction: fraction of samples whose forward solve did not converge; ``None`` when the
            layers do not report convergence.
        residual_mean: the old name of ``abs_residual_mean``; still accepted, with a ``DeprecationWarning``.

    Examples:
        >>> from deqlab.lightning import StepRecord
        >>> record = StepRecord("train", 0, nfe=12.0, abs_residual_mean=1e-3, forward_time=0.01,
        ...                     status_counts={"converged": 1}, unconverged_fraction=0.0)
        >>> record.nfe, record.backward_nfe, record.skipped
        (12.0, None, False)
        >>> record.as_dict()["status_counts"]
        {'converged': 1}
    """

    __slots__ = (
        "stage",
        "batch_idx",
        "nfe",
        "backward_nfe",
        "abs_residual_mean",
        "forward_time",
        "status_counts",
        "unconverged_fraction",
        "backward_unconverged_fraction",
        "skipped",
    )

    def __init__(
        self,
        stage: str,
        batch_idx: int,
        nfe: float,
        abs_residual_mean: Optional[float] = None,
        forward_time: Optional[float] = None,
        status_counts: Optional[Dict[str, int]] = None,
        unconverged_fraction: Optional[float] = None,
        *,
        residual_mean: Optional[float] = None,
    ) -> None:
        from deqlab._compat import renamed

        self.stage = stage
        self.batch_idx = batch_idx
        self.nfe = nfe
        self.abs_residual_mean = renamed(
            "StepRecord", "abs_residual_mean", abs_residual_mean, "residual_mean", residual_mean
        )
        status_counts = {} if status_counts is None else status_counts
        self.forward_time = forward_time
        self.status_counts = dict(status_counts)
        self.unconverged_fraction = unconverged_fraction
        #: VJPs of the backward, summed over DEQ layers; ``None`` until the backward ran (training only).
        self.backward_nfe: Optional[float] = None
        #: fraction of samples whose adjoint solve did not converge, when the layers report it.
        self.backward_unconverged_fraction: Optional[float] = None
        #: the non-finite policy skipped this batch's update (training only).
        self.skipped: bool = False

    @property
    def residual_mean(self) -> Optional[float]:
        """Deprecated old name of `abs_residual_mean`."""
        from deqlab._compat import deprecated

        return deprecated("StepRecord", ".residual_mean", ".abs_residual_mean", self.abs_residual_mean)

    def as_dict(self) -> Dict[str, Any]:
        """Every field by name (the forward part, the backward part and ``skipped``), e.g. for a CSV row."""
        return {k: getattr(self, k) for k in self.__slots__}

    def __repr__(self) -> str:
        return f"StepRecord({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"
