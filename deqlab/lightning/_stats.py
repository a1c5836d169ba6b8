"""Reduce one or several ``DeepEquilibriumSolution`` records to the numbers the module logs.

Why a separate step: a network may hold several DEQ layers (or none during an ablation); the module
composes the loss and logs from this one summary whatever the architecture.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch
from torch import Tensor


def as_solution_list(solution: Any) -> List[Any]:
    """``None`` → ``[]``, a single solution → ``[solution]``, a sequence of solutions → a list."""
    if solution is None:
        return []
    if isinstance(solution, (list, tuple)):
        return [s for s in solution if s is not None]
    return [solution]


@dataclass
class SolutionSummary:
    """Sums over DEQ layers of the per-batch quantities (one layer is the usual case)."""

    skip_loss: Tensor
    jacobian_loss: Tensor
    nfe: float
    residual_mean: Optional[Tensor]
    residual_max: Optional[Tensor]
    converged_fraction: Optional[Tensor]


def summarize(solutions: Sequence[Any], like: Tensor) -> SolutionSummary:
    """Add up losses and NFE of ``solutions``; residual/convergence stats over all layers' samples."""
    zero = like.new_zeros(())
    skip = zero
    jac = zero
    nfe = 0.0
    residuals: List[Tensor] = []
    converged: List[Tensor] = []
    for s in solutions:
        skip = skip + _scalar(s.skip_loss, zero)
        jac = jac + _scalar(s.jacobian_loss, zero)
        nfe += float(s.nfe)
        if getattr(s, "residual", None) is not None:
            residuals.append(s.residual.detach().reshape(-1).float())
        if getattr(s, "converged", None) is not None:
            converged.append(s.converged.detach().reshape(-1).float())
    res = torch.cat(residuals) if residuals else None
    conv = torch.cat(converged) if converged else None
    return SolutionSummary(
        skip_loss=skip,
        jacobian_loss=jac,
        nfe=nfe,
        residual_mean=res.mean() if res is not None and res.numel() else None,
        residual_max=res.max() if res is not None and res.numel() else None,
        converged_fraction=conv.mean() if conv is not None and conv.numel() else None,
    )


def _scalar(value: Any, zero: Tensor) -> Tensor:
    if value is None:
        return zero
    if not torch.is_tensor(value):
        return zero + float(value)
    return value.to(zero.dtype).mean()
