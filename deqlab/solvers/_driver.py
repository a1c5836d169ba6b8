"""Shared pieces of every solver call: input checks, the counted flat map, the result and ``throw``."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from deqlab import instrument
from deqlab.solvers.result import SolverError, SolverResult, SolverStatus
from deqlab.solvers.termination import TerminationTracker
from deqlab.state import State, StatePacker, make_flat_map


class CountedMap:
    """``f`` on flat vectors, counting batched evaluations (the solver's NFE) and the rows they covered.

    ``restrict(index, packer)`` switches it to the map of a sub-batch (per-sample early exit) while the
    counts go on: ``nfe`` stays the number of calls, ``rows`` sums the samples evaluated.

    While `deqlab.instrument` records, every evaluation is timed as region ``"f"`` (decided when the map
    is built, so an unrecorded solve calls the flat map directly).
    """

    __slots__ = ("flat", "nfe", "rows")

    def __init__(self, f: Callable[[State], State], packer: StatePacker):
        self.flat = instrument.wrap("f", make_flat_map(f, packer))
        self.nfe = 0
        self.rows = 0

    def __call__(self, z: Tensor) -> Tensor:
        self.nfe += 1
        self.rows += z.shape[0]
        return self.flat(z)

    def restrict(self, f: Callable[[State], State], packer: StatePacker) -> None:
        """Evaluate ``f`` (the map of a sub-batch, states packed by ``packer``) from now on."""
        self.flat = instrument.wrap("f", make_flat_map(f, packer))


def check_max_steps(max_steps: object) -> int:
    """The step budget every solver takes: an ``int >= 0`` (``bool`` is refused, it is an int in Python)."""
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 0:
        raise ValueError(f"max_steps must be an int >= 0, got {max_steps!r}")
    return max_steps


def prepare(z0: State) -> Tuple[StatePacker, Tensor]:
    """Validate the structure of ``z0`` and flatten it (finiteness is checked lazily, see
    `check_first_step`)."""
    packer = StatePacker(z0)
    return packer, packer.flatten(z0).detach()


def empty_result(
    packer: StatePacker, z: Tensor, *, continuous: bool = False, reference_counting: Optional[str] = None
) -> SolverResult:
    """The result for a batch of 0 samples: nothing to solve, so ``f`` is never called and the (vacuous)
    status is ``converged``; every per-sample field has length 0 (the reference code, which had no empty
    batches, is credited with nothing either)."""
    norm_dtype = torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else z.dtype
    empty = z.new_zeros(0, dtype=norm_dtype)
    return SolverResult(
        z=packer.unflatten(z.clone()),
        nfe=0,
        steps=0,
        abs_residual=empty,
        rel_residual=empty.clone(),
        converged=torch.zeros(0, dtype=torch.bool, device=z.device),
        status=SolverStatus.CONVERGED,
        sample_steps=torch.zeros(0, dtype=torch.long, device=z.device),
        trace=None,
        fz=packer.unflatten(z.clone()),
        t=z.new_zeros(0) if continuous else None,
        reference_nfe=0,
        reference_counting=reference_counting,
        stalled=torch.zeros(0, dtype=torch.bool, device=z.device),
        accepted_steps=torch.zeros(0, dtype=torch.long, device=z.device) if continuous else None,
    )


def check_first_step(tracker: TerminationTracker, z0: Tensor) -> None:
    """A non-finite initial guess is the caller's bug, not a solve outcome. Checked only when the first
    residual is already non-finite, so a healthy solve pays nothing for it."""
    if tracker.n_active < tracker.batch and bool(tracker.nonfinite.any()) and not bool(torch.isfinite(z0).all()):
        raise ValueError("z0 contains NaN or Inf; the initial guess must be finite (check the shortcut/initializer)")


def build_result(
    tracker: TerminationTracker,
    packer: StatePacker,
    z: Tensor,
    du: Tensor,
    *,
    nfe: int,
    steps: int,
    throw: bool,
    solver_name: str,
    t: Optional[Tensor] = None,
    last_step: Optional[Tensor] = None,
    rows: Optional[int] = None,
    reference_nfe: Optional[int] = None,
    reference_counting: Optional[str] = None,
    accepted_steps: Optional[Tensor] = None,
) -> SolverResult:
    z_ret, du_ret, res, rel = tracker.finish(z, du, last_step)
    status = tracker.status()
    cond = tracker.cond
    objective = None if getattr(cond, "batch_wide", False) else {"abs_norm": res, "rel_norm": rel}.get(cond.mode)
    if objective is None:  # rel_deq_* / abs_deq_* objectives are rel / res; abs, rel, norm, batch-wide computed
        objective = (
            rel
            if cond.mode.startswith("rel_deq") and not getattr(cond, "batch_wide", False)
            else res
            if cond.mode.startswith("abs_deq") and not getattr(cond, "batch_wide", False)
            else cond.evaluate(z_ret, du_ret)[0]
        )
    result = SolverResult(
        z=packer.unflatten(z_ret),
        nfe=nfe,
        steps=steps,
        abs_residual=res,
        rel_residual=rel,
        converged=tracker.converged.clone(),
        status=status,
        sample_steps=tracker.sample_steps,
        trace=tracker.trace_tensor(),
        fz=packer.unflatten(z_ret + du_ret),
        t=t,
        sample_weighted_nfe=float(nfe) if rows is None or packer.batch == 0 else rows / packer.batch,
        reference_nfe=reference_nfe,
        reference_counting=reference_counting,
        stalled=tracker.stalled.clone(),
        accepted_steps=accepted_steps,
        objective=objective,
        tolerance=float(cond.tol),
        objective_name=cond.objective_name,
    )
    iterates, recorded = tracker.iterates(z_ret), tracker.record_steps  # both None when nothing was requested
    if iterates is not None and recorded is not None:
        result.iterates = [packer.unflatten(t) for t in iterates]
        result.iterate_steps = list(recorded)
    if throw and status is not SolverStatus.CONVERGED:
        n_bad = int((~result.converged).sum())
        n_stall = int(tracker.stalled.sum())  # what result.stalled holds a copy of
        stalled = (
            f", {n_stall} of them stalled within {tracker.cond.patience_objective_multiplier:g}x the "
            f"tolerance (stopped by the patience rule)"
            if n_stall
            else ""
        )
        raise SolverError(
            f"{solver_name} ended with status '{status.value}' after {steps} steps ({nfe} evaluations): "
            f"{n_bad} of {len(result.converged)} samples did not converge{stalled} (max {cond.objective_name} "
            f"{float(objective.max()):.3g}, tolerance {cond.tol:g}). Raise max_steps, loosen the tolerances, or "
            f"pick another solver.",
            result,
        )
    return result
