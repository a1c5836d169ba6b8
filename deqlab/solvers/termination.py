"""Termination modes, evaluated per sample, with best-iterate bookkeeping.

The modes are those of the paper-era DeepEquilibriumNetworks.jl (``du = f(u) - u``):

=================  =========================================================================
``abs``            every ``|du| <= abstol``
``abs_norm``       ``||du|| <= abstol``
``rel``            every ``|du| <= reltol * |u|``
``rel_norm``       ``||du|| <= reltol * ||du + u||``
``norm``           ``abs_norm`` and ``rel_norm``
``*_deq_default``  objective ``||du||`` (abs) or ``||du|| / (||du + u|| + eps)`` (rel); stop when
                   objective <= tol, or (after ``patience`` steps) objective <= 3 tol while the
                   recent objectives vary by less than ``min_max_factor``
``*_deq_best``     as ``*_deq_default`` but return the iterate with the lowest objective
=================  =========================================================================

Every mode also has the protective break of the reference package: a sample whose objective grows
beyond ``protective_threshold * N * objective_0`` is stopped and flagged diverged, and a sample whose
residual becomes NaN/Inf is stopped and flagged non-finite (returning its best finite iterate).
Norms are L2 by default; ``norm="rms"`` divides by ``sqrt(N)`` so a tolerance means the same for a state
of 4 and of 100 000 numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Tuple, get_args

import torch
from torch import Tensor

from deqlab.state import batch_norm

TerminationMode = Literal[
    "abs", "abs_norm", "rel", "rel_norm", "norm",
    "abs_deq_default", "rel_deq_default", "abs_deq_best", "rel_deq_best",
]
NormKind = Literal["l2", "rms"]
TERMINATION_MODES: Tuple[str, ...] = get_args(TerminationMode)

_EPS = 1e-12


def _check_tol(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class TerminationCondition:
    """When a sample's solve is finished. A typed strategy object shared by every solver.

    Args:
        mode: one of ``TERMINATION_MODES`` (see the module docstring).
        abstol: absolute tolerance on ``du = f(u) - u``.
        reltol: relative tolerance.
        norm: ``"l2"`` or the dimension-independent ``"rms"``.
        patience: steps before the patience rule of the ``*_deq_*`` modes may fire.
        patience_objective_multiplier: the patience rule accepts objective <= this × tol.
        min_max_factor: the patience rule needs max/min of the last ``patience`` objectives below this.
        protective_threshold: divergence guard, objective >= threshold × N × objective_0.
    """

    mode: TerminationMode = "rel_deq_default"
    abstol: float = 1e-3
    reltol: float = 1e-3
    norm: NormKind = "l2"
    patience: int = 30
    patience_objective_multiplier: float = 3.0
    min_max_factor: float = 1.3
    protective_threshold: float = 1e3

    def __post_init__(self) -> None:
        if self.mode not in TERMINATION_MODES:
            raise ValueError(f"unknown termination mode {self.mode!r}; valid modes: {', '.join(TERMINATION_MODES)}")
        if self.norm not in get_args(NormKind):
            raise ValueError(f"norm must be 'l2' or 'rms', got {self.norm!r}")
        _check_tol("abstol_termination", self.abstol)
        _check_tol("reltol_termination", self.reltol)
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.protective_threshold <= 0:
            raise ValueError(f"protective_threshold must be > 0, got {self.protective_threshold}")

    @property
    def returns_best(self) -> bool:
        return self.mode.endswith("_best")

    @property
    def uses_patience(self) -> bool:
        return "_deq_" in self.mode

    def evaluate(self, z: Tensor, du: Tensor, fz: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-sample ``(objective, met, residual, rel_residual)`` for flat ``(B, N)`` ``z`` and ``du``.

        ``met`` is the tolerance test alone (the patience rule needs history and lives in the tracker).
        Pass ``fz = z + du`` when it is at hand, to save a full-size addition.
        """
        mode = self.mode
        res = batch_norm(du, self.norm)
        fz_norm = batch_norm(du + z if fz is None else fz, self.norm)
        rel = res / (fz_norm + _EPS)
        if mode == "abs":
            obj = du.abs().amax(dim=1)
            met = obj <= self.abstol
        elif mode == "abs_norm" or mode.startswith("abs_deq"):
            obj = res
            met = obj <= self.abstol
        elif mode == "rel":
            obj = (du.abs() / z.abs().clamp_min(_EPS)).amax(dim=1)
            met = (du.abs() <= self.reltol * z.abs()).all(dim=1)
        elif mode == "rel_norm":
            obj = rel
            met = obj <= self.reltol
        elif mode == "norm":
            obj = res
            met = (res <= self.abstol) & (res <= self.reltol * fz_norm)
        else:  # rel_deq_*
            obj = rel
            met = obj <= self.reltol
        return obj, met, res, rel

    @property
    def stops_on_objective(self) -> bool:
        """True when the tolerance test is ``objective <= tol`` (every mode but ``rel`` and ``norm``)."""
        return self.mode not in ("rel", "norm")

    @property
    def tol(self) -> float:
        """The tolerance the objective is compared against (for the patience rule)."""
        return self.abstol if self.mode.startswith("abs") or self.mode == "norm" else self.reltol


def resolve_termination(termination: Optional[TerminationCondition], *, owner: str,
                        default_abstol: float = 1e-3, default_reltol: float = 1e-3,
                        **flat: object) -> TerminationCondition:
    """The solver's :class:`TerminationCondition` from either ``termination=`` or the flat keywords.

    Why one helper: every solver takes the stop rule either as an object or as the flat keywords
    ``mode``, ``abstol_termination``, ``reltol_termination``, ``norm`` (``None`` = not given). Giving both
    is ambiguous (which wins?), so it raises naming the flat keywords instead of dropping them silently.
    """
    given = sorted(k for k, v in flat.items() if v is not None)
    if termination is not None:
        if not isinstance(termination, TerminationCondition):
            raise TypeError(f"{owner}: termination must be a TerminationCondition, got {type(termination).__name__}")
        if given:
            raise ValueError(
                f"{owner}: pass either termination=TerminationCondition(...) or the flat keywords, not both; "
                f"got termination= together with {', '.join(given)}. Set them on the TerminationCondition "
                f"(fields mode, abstol, reltol, norm) instead.")
        return termination
    unknown = set(flat) - {"mode", "abstol_termination", "reltol_termination", "norm"}
    if unknown:  # pragma: no cover - programming error inside deqlab
        raise TypeError(f"unknown termination keywords {sorted(unknown)}")

    def pick(key: str, default: object) -> object:
        value = flat.get(key)
        return default if value is None else value

    return TerminationCondition(mode=pick("mode", "rel_deq_default"),
                                abstol=pick("abstol_termination", default_abstol),
                                reltol=pick("reltol_termination", default_reltol),
                                norm=pick("norm", "l2"))


class TerminationTracker:
    """Per-solve bookkeeping: which samples are still active, what each returns, and the trace.

    Why one object: every solver (discrete or continuous) feeds it ``(z, du)`` after each evaluation and
    asks whether everything has stopped; the returned iterate, the convergence mask, the per-sample step
    counts and the status are then the same for all algorithms.

    Cost per call: the objective, a few ``(B,)`` comparisons and one host synchronisation (the number
    of active samples). Full-size copies happen only when a sample stops, or every step in the
    ``*_best`` modes, which must remember the best iterate. Algorithms must not modify ``z``/``du``
    in place after handing them over (the tracker keeps references to the previous pair).
    """

    def __init__(self, condition: TerminationCondition, batch: int, numel: int, *, device, dtype,
                 keep_trace: bool = True):
        self.cond = condition
        self.numel = numel
        self.batch = batch
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.converged = torch.zeros(batch, dtype=torch.bool, device=device)
        self.diverged = torch.zeros(batch, dtype=torch.bool, device=device)
        self.nonfinite = torch.zeros(batch, dtype=torch.bool, device=device)
        self.sample_steps = torch.zeros(batch, dtype=torch.long, device=device)
        self.keep_trace = keep_trace
        self.trace: list = []
        self.step = 0
        self.n_active = batch
        self._obj0: Optional[Tensor] = None
        self._prev: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None  # last (z, du, res, rel)
        self._ret: Optional[list] = None  # [z, du, res, rel] each sample returns
        self._best_obj: Optional[Tensor] = None
        self._history: Optional[Tensor] = None

    def update(self, z: Tensor, du: Tensor, mask: Optional[Tensor] = None, fz: Optional[Tensor] = None,
               diverged: Optional[Tensor] = None) -> bool:
        """Record the evaluation ``du = f(z) - z``; return True when every sample has stopped.

        ``mask`` restricts the update to samples that actually moved (continuous solvers reject steps
        per sample). ``fz`` (``= z + du``) saves a full-size addition when the caller has it.
        ``diverged`` flags samples the solver itself found diverging (stopped with that status).
        """
        cond = self.cond
        obj, met, res, rel = cond.evaluate(z, du, fz)
        live = self.active if mask is None else self.active & mask
        cur = (z, du, res, rel)
        if self._obj0 is None:
            finite0 = torch.isfinite(obj)
            self._obj0 = torch.where(finite0, obj, torch.zeros_like(obj))
            # One comparison per step then flags both divergence and NaN/Inf: NaN < x is False, and a
            # sample with objective_0 = 0 (it starts at its fixed point) only fails on non-finite values.
            self._threshold = torch.where(self._obj0 > 0, cond.protective_threshold * self.numel * self._obj0,
                                          torch.full_like(obj, math.inf))
            self._prev = cur
            self._ret = [z, du, res, rel]
        if self.keep_trace:
            self.trace.append(obj if mask is None or not self.trace else torch.where(mask, obj, self.trace[-1]))
        patience_met = self._patience_rule(obj, live) if cond.uses_patience else None
        if mask is None and not cond.returns_best and cond.stops_on_objective:
            # Fast path: a sample goes on while tol < objective < threshold (NaN fails both tests), so
            # three comparisons and one host sync decide whether anything stops this step.
            go = (obj > cond.tol) & (obj < self._threshold)
            if diverged is not None:
                go = go & ~diverged
            if patience_met is not None and self.step + 1 >= cond.patience:
                go = go & ~patience_met
            if self.n_active != self.batch:
                go = go | ~self.active
            if bool(go.all()):
                self._advance(cur, mask)
                return False
        if cond.returns_best:
            if self._best_obj is None:
                self._best_obj = torch.full_like(obj, math.inf)
            take = live & (obj < self._best_obj)  # NaN never improves the best
            self._best_obj = torch.where(take, obj, self._best_obj)
            self._ret = self._merge(self._ret, cur, take)
        if patience_met is not None:
            met = met | patience_met
        bad = ~(obj < self._threshold)
        if diverged is not None:
            bad = bad | diverged
            met = met & ~diverged
        stopping = (met | bad) & live
        if not bool(stopping.any()):  # the one host sync of a step in which no sample stops
            self._advance(cur, mask)
            return False
        finite = torch.isfinite(obj) & torch.isfinite(res)
        stop_conv = stopping & finite & met
        stop_nan = stopping & ~finite
        stop_div = stopping & ~stop_conv & ~stop_nan
        self.converged |= stop_conv
        self.diverged |= stop_div
        self.nonfinite |= stop_nan
        self.sample_steps = torch.where(stopping, torch.full_like(self.sample_steps, self.step), self.sample_steps)
        if not cond.returns_best:
            self._ret = self._merge(self._ret, cur, stop_conv | stop_div)
            if bool(stop_nan.any()):
                self._ret = self._merge(self._ret, self._prev, stop_nan)
        self.active = self.active & ~stopping
        self.n_active = int(self.active.sum())
        self._advance(cur, mask)
        return self.n_active == 0

    def _advance(self, cur, mask: Optional[Tensor]) -> None:
        self._prev = cur if mask is None else tuple(self._merge(list(self._prev), cur, mask))
        self.step += 1

    @staticmethod
    def _merge(dst, src, take: Tensor) -> list:
        t2 = take.unsqueeze(1)
        return [torch.where(t2 if d.dim() == 2 else take, s, d) for d, s in zip(dst, src)]

    def _patience_rule(self, obj: Tensor, live: Tensor) -> Tensor:
        cond = self.cond
        if self._history is None:
            self._history = obj.new_full((cond.patience, obj.shape[0]), math.nan)
        slot = self.step % cond.patience
        self._history[slot] = torch.where(live, obj, self._history[slot])
        if self.step + 1 < cond.patience:
            return torch.zeros_like(live)
        stalled = self._history.amax(dim=0) < cond.min_max_factor * self._history.amin(dim=0)
        return stalled & (obj <= cond.patience_objective_multiplier * cond.tol)

    def finish(self, z: Tensor, du: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The returned ``(z, du, residual, rel_residual)``: still-active samples give the last iterate
        (or their best one in ``*_best`` modes)."""
        if self.n_active and not self.cond.returns_best:
            self._ret = self._merge(self._ret, self._prev, self.active)
        self.sample_steps = torch.where(self.active, torch.full_like(self.sample_steps, self.step - 1), self.sample_steps)
        z_ret, du_ret, res, rel = self._ret
        return z_ret, du_ret, res, rel

    def trace_tensor(self) -> Optional[Tensor]:
        """``(steps, B)`` objectives; entries after a sample stopped repeat its final value."""
        if not self.trace:
            return None
        tr = torch.stack(self.trace)
        idx = torch.arange(tr.shape[0], device=tr.device).unsqueeze(1)
        last = tr.gather(0, self.sample_steps.clamp_max(tr.shape[0] - 1).unsqueeze(0))
        return torch.where(idx > self.sample_steps.unsqueeze(0), last, tr)

    def status(self):
        from deqlab.solvers.result import SolverStatus

        n_conv, n_nan, n_div = torch.stack(
            [self.converged.sum(), self.nonfinite.sum(), self.diverged.sum()]).tolist()
        if n_conv == self.batch:
            return SolverStatus.CONVERGED
        if n_nan:
            return SolverStatus.NONFINITE
        if n_div:
            return SolverStatus.DIVERGED
        return SolverStatus.MAX_STEPS
