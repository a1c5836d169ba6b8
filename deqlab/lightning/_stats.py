"""Reduce one or several ``DeepEquilibriumSolution`` records to the numbers the module logs, and the
per-step record the module hands to callbacks.

Why a separate step: a network may hold several DEQ layers (or none during an ablation); the module
composes the loss and logs from this one summary whatever the architecture.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from deqlab.nn.solution import DeepEquilibriumSolution
from deqlab.solvers.result import SolverStatus

__all__ = ["SolutionSummary", "StepRecord", "as_solution_list", "summarize"]

STATUSES = tuple(s.value for s in SolverStatus)


def as_solution_list(solution: Any, *, owner: str = "the model") -> List[DeepEquilibriumSolution]:
    """``None`` → ``[]``, a single solution → ``[solution]``, a sequence of solutions → a list.

    Anything else raises ``TypeError``: the second element of ``forward``'s result must be the DEQ
    layer's record (or ``None``), not a tensor or another value.
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


@dataclass
class SolutionSummary:
    """Sums over DEQ layers of the per-batch quantities (one layer is the usual case)."""

    skip_loss: Tensor
    jacobian_loss: Tensor
    nfe: float
    residual_mean: Optional[Tensor]
    residual_max: Optional[Tensor]
    converged_fraction: Optional[Tensor]
    status_counts: Dict[str, int]

    @property
    def unconverged_fraction(self) -> Optional[Tensor]:
        return None if self.converged_fraction is None else 1.0 - self.converged_fraction


def summarize(solutions: Sequence[DeepEquilibriumSolution], like: Tensor) -> SolutionSummary:
    """Add up losses and NFE of ``solutions``; residual/convergence stats over all layers' samples."""
    zero = like.new_zeros(())
    skip = zero
    jac = zero
    nfe = 0.0
    residuals: List[Tensor] = []
    converged: List[Tensor] = []
    counts = {s: 0 for s in STATUSES}
    for s in solutions:
        skip = skip + _scalar(s.skip_loss, zero)
        jac = jac + _scalar(s.jacobian_loss, zero)
        nfe += float(s.nfe)
        if s.residual is not None:
            residuals.append(s.residual.detach().reshape(-1).float())
        if s.converged is not None:
            converged.append(s.converged.detach().reshape(-1).float())
        status = str(getattr(s.status, "value", s.status))
        counts[status] = counts.get(status, 0) + 1
    res = torch.cat(residuals) if residuals else None
    conv = torch.cat(converged) if converged else None
    return SolutionSummary(
        skip_loss=skip,
        jacobian_loss=jac,
        nfe=nfe,
        residual_mean=res.mean() if res is not None and res.numel() else None,
        residual_max=res.max() if res is not None and res.numel() else None,
        converged_fraction=conv.mean() if conv is not None and conv.numel() else None,
        status_counts=counts,
    )


def _scalar(value: Any, zero: Tensor) -> Tensor:
    if value is None:
        return zero
    if not torch.is_tensor(value):
        return zero + float(value)
    return value.to(zero.dtype).mean()


class StepRecord:
    """What one step of :class:`~deqlab.lightning.DEQLightningModule` did: the one channel to callbacks.

    Every ``training_step`` / ``validation_step`` / ``test_step`` returns ``{"loss": loss, "deq": record}``;
    a callback reads ``outputs["deq"]`` in ``on_{train,validation,test}_batch_end``. Plain numbers only
    (no tensors or graphs), filled from the solution records: the forward part by the step, the backward
    part (``backward_nfe``, ``backward_unconverged_fraction``) after ``loss.backward()``, and ``skipped``
    when the non-finite policy dropped the update.

    A plain class, not a dataclass, on purpose: Lightning deep-copies dataclasses in step outputs, and
    the backward part is filled in after the step returned.
    """

    __slots__ = ("stage", "batch_idx", "nfe", "backward_nfe", "residual_mean", "forward_time", "status_counts",
                 "unconverged_fraction", "backward_unconverged_fraction", "skipped")

    def __init__(self, stage: str, batch_idx: int, nfe: float, residual_mean: Optional[float],
                 forward_time: Optional[float], status_counts: Dict[str, int],
                 unconverged_fraction: Optional[float]) -> None:
        self.stage = stage
        self.batch_idx = batch_idx
        self.nfe = nfe
        self.residual_mean = residual_mean
        self.forward_time = forward_time
        self.status_counts = dict(status_counts)
        self.unconverged_fraction = unconverged_fraction
        #: VJPs of the backward, summed over DEQ layers; ``None`` until the backward ran (training only).
        self.backward_nfe: Optional[float] = None
        #: fraction of samples whose adjoint solve did not converge, when the layers report it.
        self.backward_unconverged_fraction: Optional[float] = None
        #: the non-finite policy skipped this batch's update (training only).
        self.skipped: bool = False

    def as_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    def __repr__(self) -> str:
        return f"StepRecord({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"
