"""What every solver returns: one record, whatever the algorithm.

Why a single record: the DEQ layers, the Lightning module and the benchmarks all read the same
numbers (NFE, per-sample residuals, convergence masks, an explicit status) without knowing which
algorithm produced them.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor

from deqlab.state import State


class SolverStatus(str, enum.Enum):
    """Why a solve ended. A ``str`` subclass so it logs and compares as plain text."""

    CONVERGED = "converged"
    MAX_STEPS = "max_steps"
    DIVERGED = "diverged"
    NONFINITE = "nonfinite"

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return self.value


@dataclass
class SolverResult:
    """Outcome of ``solver(f, z0)``.

    Attributes:
        z: the returned iterate, with the structure of ``z0`` (a tensor or a list of tensors).
        nfe: every evaluation of ``f`` (batched calls), including rejected ODE steps and line searches.
        steps: iterations (discrete) or stepper calls, accepted and rejected (continuous), of the solver loop.
        residual: per-sample absolute residual ``||f(z) - z||`` at ``z`` (shape ``(B,)``), in the
            solver's norm (L2 or RMS).
        rel_residual: per-sample ``||f(z) - z|| / (||f(z)|| + eps)``.
        converged: per-sample bool mask: the sample met the termination condition.
        status: ``converged`` when every sample converged, else why the solve ended.
        sample_steps: per-sample number of steps until the sample stopped (``(B,)`` long).
        trace: optional ``(steps + 1, B)`` tensor of the termination objective per step.
        fz: ``f(z)`` at the returned iterate when the solver has it for free, else ``None``.
        t: continuous solvers only: the per-sample integration time reached (``(B,)``).
        sample_weighted_nfe: evaluations weighted by the fraction of the batch each covered
            (``sum of rows evaluated / B``). Equal to ``nfe`` unless the solver evaluated sub-batches
            (``per_sample_exit=True``), where it is the work actually done; ``None`` when not recorded.
    """

    z: State
    nfe: int
    steps: int
    residual: Tensor
    rel_residual: Tensor
    converged: Tensor
    status: SolverStatus
    sample_steps: Tensor
    trace: Optional[Tensor] = None
    fz: Optional[State] = field(default=None, repr=False)
    t: Optional[Tensor] = None
    sample_weighted_nfe: Optional[float] = None

    @property
    def all_converged(self) -> bool:
        return self.status is SolverStatus.CONVERGED

    def stats(self) -> dict:
        """Scalar summary, convenient for logging (an empty batch gives zeros and a converged fraction of 1)."""
        if self.residual.numel() == 0:
            return {"nfe": float(self.nfe), "steps": float(self.steps), "residual_mean": 0.0, "residual_max": 0.0,
                    "rel_residual_mean": 0.0, "converged_fraction": 1.0}
        return {
            "nfe": float(self.nfe),
            "steps": float(self.steps),
            "residual_mean": float(self.residual.mean()),
            "residual_max": float(self.residual.max()),
            "rel_residual_mean": float(self.rel_residual.mean()),
            "converged_fraction": float(self.converged.float().mean()),
        }


class ConvergenceWarning(UserWarning):
    """Warned when a forward or backward solve ends without meeting its tolerance.

    A ``UserWarning`` subclass, so ``warnings.simplefilter("error", ConvergenceWarning)`` turns every
    unconverged solve into an exception, and ``"ignore"`` silences them. deqlab rate-limits it in training
    loops so a long run does not flood the log.
    """


class SolverError(RuntimeError):
    """Raised by a solver called with ``throw=True`` when a solve does not converge."""

    def __init__(self, message: str, result: SolverResult):
        super().__init__(message)
        self.result = result
