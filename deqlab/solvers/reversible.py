"""``ReversibleSolver``: the coupled, algebraically invertible fixed-point iteration of reversible DEQs.

McCallum, Arora & Foster, "Reversible Deep Equilibrium Models" (arXiv 2509.12917) iterate two states
from ``y_0 = z_0``::

    y_{n+1} = (1 - β) y_n + β f(z_n)
    z_{n+1} = (1 - β) z_n + β f(y_{n+1})

Each step can be undone exactly (up to rounding) from the pair it produced::

    z_n = (z_{n+1} - β f(y_{n+1})) / (1 - β)
    y_n = (y_{n+1} - β f(z_n)) / (1 - β)

so the exact gradient of the finite iteration is computed backwards without storing the iterates
([`ReversibleBackward`][deqlab.nn.ReversibleBackward]). The solver returns ``z_N`` and keeps ``y_N``, the
start and each sample's step count in ``SolverResult.reversible``, which is what that backward inverts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from deqlab import instrument
from deqlab.solvers._driver import CountedMap, build_result, check_first_step, check_max_steps, empty_result, prepare
from deqlab.solvers.counting import ReferenceCounting, check_reference_counting, reference_nfe
from deqlab.solvers.result import SolverError, SolverResult, SolverStatus
from deqlab.solvers.termination import (
    NormKind,
    TerminationCondition,
    TerminationMode,
    TerminationTracker,
    resolve_termination,
)
from deqlab.state import State

__all__ = ["ReversibleSolver", "ReversibleState"]


@dataclass
class ReversibleState:
    """What a reversible solve leaves for its backward: the final ``y``, the start and each sample's steps.

    Why a record of its own: the exact backward runs the iteration in reverse from the final pair
    ``(y_N, z_N)``; ``z_N`` is the returned ``SolverResult.z``, the rest is here. It is O(1) in the number of
    steps (two states and a ``(B,)`` count), never the iterates.

    Attributes:
        y: the final ``y_N`` of every sample, flat ``(B, N)`` (detached).
        z0: the start ``y_0 = z_0``, flat ``(B, N)``, kept only to measure the reconstruction error.
        steps: ``(B,)`` long: the coupled steps each sample took (a sample that stopped early is frozen
            at its own step, and the backward reverses exactly that many for it).
        beta: the relaxation ``β`` of the solve.

    Example:
        >>> import torch
        >>> from deqlab.solvers import ReversibleSolver
        >>> res = ReversibleSolver(beta=0.5, max_steps=3, mode="abs_norm", abstol_termination=0.0)(
        ...     lambda z: 0.5 * z + 1, torch.zeros(1, 2, dtype=torch.float64))
        >>> res.reversible.steps.tolist(), res.reversible.beta, tuple(res.reversible.y.shape)
        ([3], 0.5, (1, 2))
    """

    y: Tensor
    z0: Tensor
    steps: Tensor
    beta: float


class ReversibleSolver:
    """Find ``z* = f(z*)`` with the reversible coupled iteration of RevDEQ (McCallum et al. 2025).

    Starting from ``y_0 = z_0``, each step makes two evaluations of ``f``::

        y_{n+1} = (1 - β) y_n + β f(z_n)
        z_{n+1} = (1 - β) z_n + β f(y_{n+1})

    and the termination condition is tested on ``z_{n+1}`` with the residual ``f(z_{n+1}) - z_{n+1}``,
    whose evaluation the next step reuses. Why this iteration: every step is invertible by algebra
    alone, so [`ReversibleBackward`][deqlab.nn.ReversibleBackward] gives the *exact* gradient of the
    finite iteration in memory independent of the number of steps (no adjoint linear solve, no stored
    iterates). The price: twice the evaluations of plain fixed-point iteration per step, and a plain
    (relaxed) iteration, so it converges only where relaxed fixed-point iteration does.

    Every sample stops on its own (as in [`DiscreteDEQSolver`][deqlab.solvers.DiscreteDEQSolver]); a
    stopped sample's pair ``(y, z)`` is frozen and its own step count recorded in
    ``result.reversible.steps``, which the backward reverses per sample. The returned iterate is always
    each sample's *last* ``z`` (the one the backward can invert): the ``*_best`` modes are refused, and a
    sample whose new pair is NaN/Inf keeps its last finite pair (status ``nonfinite``).

    Args:
        beta: the relaxation ``β`` in ``(0, 2)``, ``β != 1``. Default 0.8, the paper's. Why not 1: the
            inverse divides by ``1 - β``; the reconstruction error of the backward grows like
            ``|1 - β|^-N`` times the rounding of ``f``, so a ``β`` close to 1 (or a long solve in float32)
            loses the reconstruction (measured on ``solution.backward_residual``).
        mode: termination mode (see `deqlab.solvers.termination`) except the ``*_best`` ones; ``None``
            (default) means ``"rel_deq_default"``, as for the other solvers.
        abstol_termination: absolute tolerance of the termination condition; ``None`` (default) means
            ``1e-3``, as for the other solvers.
        reltol_termination: relative tolerance of the termination condition; ``None`` (default) means
            ``1e-3``.
        max_steps: coupled steps at most (each costs two evaluations: NFE is ``1 + 2 * steps``). Default 50.
        norm: ``"l2"`` or ``"rms"``; ``None`` (default) means ``"l2"``.
        throw: raise [`SolverError`][deqlab.solvers.SolverError] instead of returning an unconverged
            result. Default ``False``.
        keep_trace: record the termination objective of every step in ``result.trace``. Default ``True``.
        termination: a full [`TerminationCondition`][deqlab.solvers.TerminationCondition] instead of the
            flat keywords (giving both raises). Default ``None``.
        reference_counting: the convention of ``result.reference_nfe`` (``"deqjl"`` default, or
            ``"fastdeq"``; see `deqlab.solvers.counting`).
        batch_wide: one termination verdict for the whole batch (every sample runs the same number of
            steps). ``None`` (default) means ``False``: per sample.

    Calling ``solver(f, z0)`` returns a [`SolverResult`][deqlab.solvers.SolverResult] whose
    ``reversible`` field is a [`ReversibleState`][deqlab.solvers.ReversibleState].

    Raises:
        ValueError: ``beta`` is not in ``(0, 2)`` or is 1; ``max_steps`` is not an int >= 0; the mode is a
            ``*_best`` mode (the backward inverts the last iterate, not the best) or otherwise invalid; or
            ``termination`` is given together with the flat keywords.

    Example:
        >>> import torch
        >>> from deqlab.solvers import ReversibleSolver
        >>> solver = ReversibleSolver(beta=0.8, mode="abs_norm", abstol_termination=1e-10, max_steps=100)
        >>> res = solver(lambda z: 0.5 * z + 1, torch.zeros(2, 3, dtype=torch.float64))   # z* = 2
        >>> res.status, res.nfe == 1 + 2 * res.steps
        (<SolverStatus.CONVERGED: 'converged'>, True)
        >>> res.z.round(decimals=6)
        tensor([[2., 2., 2.],
                [2., 2., 2.]], dtype=torch.float64)
        >>> ReversibleSolver()
        ReversibleSolver(beta=0.8, mode='rel_deq_default', abstol_termination=0.001, reltol_termination=0.001, norm='l2', max_steps=50)
    """

    def __init__(
        self,
        beta: float = 0.8,
        *,
        mode: Optional[TerminationMode] = None,
        abstol_termination: Optional[float] = None,
        reltol_termination: Optional[float] = None,
        max_steps: int = 50,
        norm: Optional[NormKind] = None,
        throw: bool = False,
        keep_trace: bool = True,
        termination: Optional[TerminationCondition] = None,
        reference_counting: ReferenceCounting = "deqjl",
        batch_wide: Optional[bool] = None,
    ):
        if (
            isinstance(beta, bool)
            or not isinstance(beta, (int, float))
            or not math.isfinite(beta)
            or not 0.0 < beta < 2.0
            or beta == 1.0
        ):
            raise ValueError(
                f"ReversibleSolver: beta must be a number in (0, 2) other than 1 (the inverse step "
                f"divides by 1 - beta), got {beta!r}; the paper uses 0.8"
            )
        self.beta = float(beta)
        self.termination: TerminationCondition = resolve_termination(
            termination,
            mode=mode,
            abstol_termination=abstol_termination,
            reltol_termination=reltol_termination,
            norm=norm,
            batch_wide=batch_wide,
            owner="ReversibleSolver",
        )
        if self.termination.returns_best:
            raise ValueError(
                f"ReversibleSolver: mode {self.termination.mode!r} returns the best iterate, but the "
                f"reversible backward inverts the last one; use "
                f"{self.termination.mode.replace('_best', '_default')!r}"
            )
        self.max_steps = check_max_steps(max_steps)
        self.throw = bool(throw)
        self.keep_trace = bool(keep_trace)
        self.reference_counting = check_reference_counting("ReversibleSolver", reference_counting)

    def __repr__(self) -> str:
        t = self.termination
        return (
            f"ReversibleSolver(beta={self.beta}, mode={t.mode!r}, abstol_termination={t.abstol}, "
            f"reltol_termination={t.reltol}, norm={t.norm!r}, max_steps={self.max_steps}"
            + (", batch_wide=True)" if t.batch_wide else ")")
        )

    @torch.no_grad()
    def __call__(self, f: Callable[[State], State], z0: State) -> SolverResult:
        """Run the coupled iteration from ``y_0 = z_0 = z0`` until every sample stops.

        Args:
            f: maps a state to a state of the same structure, shapes and dtype.
            z0: the batch-first initial guess: a floating-point tensor ``(B, ...)`` or a list of them.

        Returns:
            The [`SolverResult`][deqlab.solvers.SolverResult]: ``z`` is each sample's last ``z_n``, and
            ``reversible`` holds ``y_n``, the start and the per-sample step counts.

        Raises:
            ValueError: ``z0`` contains NaN/Inf, or ``f`` returns other shapes or another dtype.
            SolverError: with ``throw=True``, when some sample did not converge.
        """
        with instrument.region("solver"):
            return self._solve(f, z0)

    def _solve(self, f: Callable[[State], State], z0: State) -> SolverResult:
        packer, z = prepare(z0)
        if packer.batch == 0:
            result = empty_result(packer, z, reference_counting=self.reference_counting)
            result.reversible = ReversibleState(
                y=z.clone(), z0=z.clone(), steps=result.sample_steps.clone(), beta=self.beta
            )
            return result
        F = CountedMap(f, packer)
        cond = self.termination
        tracker = TerminationTracker(
            cond, packer.batch, packer.numel, device=z.device, dtype=z.dtype, keep_trace=self.keep_trace
        )
        start = z
        beta, keep = self.beta, 1.0 - self.beta
        fz = F(z)
        done = tracker.update(z, fz - z, fz=fz)
        check_first_step(tracker, z)
        y = z
        taken = torch.zeros(packer.batch, dtype=torch.long, device=z.device)
        steps = 0
        while not done and steps < self.max_steps:
            # A stopped sample stays frozen at its own step: f is evaluated on the batch as it stands
            # (new rows for the active samples, the frozen pair for the others), which is exactly the
            # batch the backward rebuilds, so even a map coupling samples is inverted exactly.
            a2 = tracker.active.unsqueeze(1)
            y_new = torch.where(a2, keep * y + beta * fz, y)
            fy = F(y_new)
            z_new = torch.where(a2, keep * z + beta * fy, z)
            fz_new = F(z_new)
            steps += 1
            # A NaN/Inf pair is not taken (it could not be inverted): the sample keeps its last finite
            # pair and the tracker flags it non-finite.
            take = (
                tracker.active
                & torch.isfinite(y_new).all(1)
                & torch.isfinite(z_new).all(1)
                & torch.isfinite(fz_new).all(1)
            )
            t2 = take.unsqueeze(1)
            y, z, fz = torch.where(t2, y_new, y), torch.where(t2, z_new, z), torch.where(t2, fz_new, fz)
            taken = taken + take.long()
            done = tracker.update(z_new, fz_new - z_new, fz=fz_new)
        calls = F.nfe + (1 if steps == 0 else 0)
        result = build_result(
            tracker,
            packer,
            z,
            fz - z,
            nfe=F.nfe,
            steps=steps,
            throw=False,
            solver_name="ReversibleSolver",
            reference_nfe=reference_nfe(self.reference_counting, calls=calls),
            reference_counting=self.reference_counting,
        )
        # The returned iterate is our own frozen z_N (the one the backward inverts), whatever the tracker
        # would have picked; its residuals are recomputed on it so they describe what is returned.
        du = fz - z
        evaluated, _, res, rel, _ = cond._evaluate(z, du, fz)
        obj = result.objective if cond.batch_wide and result.objective is not None else evaluated  # always set
        result = dataclasses.replace(
            result,
            z=packer.unflatten(z.clone()),
            fz=packer.unflatten(fz.clone()),
            abs_residual=res,
            rel_residual=rel,
            objective=obj,
            sample_steps=taken.clone(),
            reversible=ReversibleState(y=y, z0=start, steps=taken, beta=beta),
        )
        if self.throw and result.status is not SolverStatus.CONVERGED:
            n_bad = int((~result.converged).sum())
            raise SolverError(
                f"ReversibleSolver ended with status '{result.status.value}' after {steps} steps ({F.nfe} "
                f"evaluations): {n_bad} of {packer.batch} samples did not converge (max {cond.objective_name} "
                f"{float(obj.max()):.3g}, tolerance {cond.tol:g}). Raise max_steps, lower beta, loosen the "
                f"tolerances, or make the map more contractive.",
                result,
            )
        return result
