"""Termination modes, evaluated per sample, with best-iterate bookkeeping.

The modes are those of the paper-era DeepEquilibriumNetworks.jl (``du = f(u) - u``):

=================  =========================================================================
``abs``            every ``|du| <= abstol``
``abs_norm``       ``||du|| <= abstol``
``rel``            every ``|du| <= reltol * |u|``
``rel_norm``       ``||du|| <= reltol * ||du + u||``
``norm``           ``abs_norm`` and ``rel_norm``
``*_deq_default``  objective ``||du||`` (abs) or ``||du|| / (||du + u|| + eps)`` (rel); stop when
                   objective <= tol (``converged``), or (after ``patience`` steps) objective <= 3 tol
                   while the recent objectives vary by less than ``min_max_factor`` (``stalled``)
``*_deq_best``     as ``*_deq_default`` but return the iterate with the lowest objective
=================  =========================================================================

Every mode also has the protective break of the reference package: a sample whose objective grows
beyond ``protective_threshold * N * objective_0`` is stopped and flagged diverged, and a sample whose
residual becomes NaN/Inf is stopped and flagged non-finite (returning its best finite iterate).
Norms are L2 by default; ``norm="rms"`` divides by ``sqrt(N)`` so a tolerance means the same for a state
of 4 and of 100 000 numbers.

``batch_wide=True`` evaluates all of this once for the whole batch instead of per sample (one norm over
the ``(B, N)`` tensor, as the reference package did): every sample then stops together, with one verdict.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Literal, Optional, Sequence, Tuple, get_args

import torch
from torch import Tensor

from deqlab.state import batch_norm

TerminationMode = Literal[
    "abs",
    "abs_norm",
    "rel",
    "rel_norm",
    "norm",
    "abs_deq_default",
    "rel_deq_default",
    "abs_deq_best",
    "rel_deq_best",
]
NormKind = Literal["l2", "rms"]
TERMINATION_MODES: Tuple[str, ...] = get_args(TerminationMode)

_EPS = 1e-12

_RECORD: "contextvars.ContextVar[Optional[list]]" = contextvars.ContextVar("deqlab_record_iterates", default=None)


@contextlib.contextmanager
def record_iterates(steps: Sequence[int]) -> Iterator[None]:
    """Ask the next solve started in this block to keep its iterates at the given step indices.

    The first [`TerminationTracker`][deqlab.solvers.TerminationTracker] created inside the block takes the
    request (a solver's inner solves, started later, do not); the solver's result then carries them as
    ``result.iterates`` (one state per index, in the order given) and ``result.iterate_steps``. Step ``0``
    is the starting guess, step ``i`` the iterate evaluated at the solver's ``i``-th update. Recording is
    per sample and cheap (one copy of the state per requested index): a sample that stopped before step
    ``i`` gives its returned iterate there, so every sample yields one state per index. Used by
    ``DeepEquilibriumNetwork(sample_states=k)``.

    Args:
        steps: the step indices (ints >= 0).

    Returns:
        A context manager (it yields nothing; read the iterates from the result).

    Raises:
        ValueError: a step is not an int >= 0.

    Example:
        >>> import torch
        >>> from deqlab.solvers import DiscreteDEQSolver, record_iterates
        >>> solver = DiscreteDEQSolver("fixed_point", mode="abs_norm", abstol_termination=1e-8, max_steps=60)
        >>> with record_iterates([0, 1, 2, 500]):
        ...     res = solver(lambda z: 0.5 * z + 1, torch.zeros(1, 1, dtype=torch.float64))
        >>> [round(float(z), 4) for z in res.iterates]   # z0, z1, z2, then the returned z* (stopped earlier)
        [0.0, 1.0, 1.5, 2.0]
    """
    steps = list(steps)
    for s in steps:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"record_iterates: step indices must be ints >= 0, got {s!r}")
    token = _RECORD.set([steps])  # a one-slot box: the first tracker empties it
    try:
        yield
    finally:
        _RECORD.reset(token)


def _check_tol(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class TerminationCondition:
    """When a sample's solve is finished. A typed strategy object shared by every solver.

    Frozen (immutable and hashable), so one condition can be shared by solvers and compared with ``==``.
    Pass it as ``termination=`` to a solver instead of the flat ``mode``/``*_termination``/``norm``
    keywords. The defaults are those of the reference package (DeepEquilibriumNetworks.jl's termination
    conditions), so a paper configuration behaves the same here.

    Args:
        mode: one of ``TERMINATION_MODES`` (see the module docstring). Default ``"rel_deq_default"``:
            scale-free, and the patience rule ends a stalled solve early (the training default).
        abstol: absolute tolerance on ``du = f(u) - u``, used by the ``abs*`` modes and ``norm``.
            Default ``1e-3``, loose enough for training.
        reltol: relative tolerance, used by the ``rel*`` modes and ``norm``. Default ``1e-3``.
        norm: ``"l2"`` (default, the reference's) or the dimension-independent ``"rms"``.
        patience: steps before the patience rule of the ``*_deq_*`` modes may fire, and the window it
            looks at. Default 30: a solve must have had the chance to converge normally first.
        patience_objective_multiplier: the patience rule stops a sample at objective <= this × tol.
            Default 3.0: a sample stalled within 3x the tolerance is stopped (more steps would not help)
            with status ``stalled``, not ``converged``: only a sample within the tolerance converged.
        min_max_factor: the patience rule needs max/min of the last ``patience`` objectives below this.
            Default 1.3: the objective has varied by less than 30 % over the window, i.e. it stalled.
        protective_threshold: divergence guard, objective >= threshold × N × objective_0. Default
            ``1e3``: far beyond any transient growth of a converging solve.
        batch_wide: evaluate the condition once over the whole batch (default ``False``: per sample).
            ``True`` reproduces the reference package, which tested e.g. ``||du|| <= reltol ||du + u||``
            with norms over the entire ``(B, N)`` batch tensor: the objective, the tolerance test, the
            patience rule and the protective breaks see the batch as one vector (``N`` above becomes
            ``B × N``; ``abs``/``rel`` take the worst entry of the batch), and every sample stops at the
            same step with the same verdict (``converged`` when the batch-wide test holds). The
            per-sample ``residual``/``rel_residual`` of the result still report each sample's own
            residual, so a sample may converge (batch-wide) with a residual above the tolerance when
            others are below it. At ``B = 1`` it is identical to the per-sample condition.

    Raises:
        ValueError: ``mode`` or ``norm`` is unknown, a tolerance is not a finite number >= 0,
            ``patience`` is < 1, or ``protective_threshold`` is not > 0.

    Example:
        >>> import torch
        >>> from deqlab.solvers import TerminationCondition
        >>> cond = TerminationCondition("abs_norm", abstol=1e-6)
        >>> z = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
        >>> du = torch.tensor([[3e-7, 4e-7], [0.3, 0.4]])   # f(z) - z per sample
        >>> objective, met, residual, rel_residual = cond.evaluate(z, du)
        >>> met, cond.tol
        (tensor([ True, False]), 1e-06)
        >>> TerminationCondition("relative")
        Traceback (most recent call last):
        ...
        ValueError: unknown termination mode 'relative'; valid modes: abs, abs_norm, rel, rel_norm, norm, ...
    """

    mode: TerminationMode = "rel_deq_default"
    abstol: float = 1e-3
    reltol: float = 1e-3
    norm: NormKind = "l2"
    patience: int = 30
    patience_objective_multiplier: float = 3.0
    min_max_factor: float = 1.3
    protective_threshold: float = 1e3
    batch_wide: bool = False

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
        if not isinstance(self.batch_wide, bool):
            raise ValueError(f"batch_wide must be True or False, got {self.batch_wide!r}")

    @property
    def returns_best(self) -> bool:
        """True for the ``*_best`` modes, which return each sample's lowest-objective iterate."""
        return self.mode.endswith("_best")

    @property
    def uses_patience(self) -> bool:
        """True for the ``*_deq_*`` modes, which also stop a stalled sample (the patience rule)."""
        return "_deq_" in self.mode

    def evaluate(self, z: Tensor, du: Tensor, fz: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-sample ``(objective, met, residual, rel_residual)`` for flat ``(B, N)`` ``z`` and ``du``.

        ``met`` is the tolerance test alone (the patience rule needs history and lives in the tracker).
        Pass ``fz = z + du`` when it is at hand, to save a full-size addition. For half-precision states
        the norms and ratios are computed in float32 (a float16 sum of squares overflows at 256). With
        ``batch_wide`` the objective and ``met`` are the whole batch's (the same value in every entry),
        the residuals still each sample's own.

        Args:
            z: the flat ``(B, N)`` iterates.
            du: ``f(z) - z``, same shape.
            fz: ``f(z)``, optional (computed as ``z + du`` when ``None``).

        Returns:
            Four ``(B,)`` tensors: the mode's objective, the bool tolerance test, the residual
            ``||du||`` and the relative residual ``||du|| / (||f(z)|| + eps)``.
        """
        return self._evaluate(z, du, fz)[:4]

    def _evaluate(
        self, z: Tensor, du: Tensor, fz: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """`evaluate` plus the per-sample ``||f(z)||`` (the tracker's runaway guard needs it)."""
        mode = self.mode
        res = batch_norm(du, self.norm)
        fz_norm = batch_norm(du + z if fz is None else fz, self.norm)
        rel = res / (fz_norm + _EPS)
        if mode == "abs":
            obj = du.abs().amax(dim=1).to(res.dtype)
            met = obj <= self.abstol
        elif mode == "abs_norm" or mode.startswith("abs_deq"):
            obj = res
            met = obj <= self.abstol
        elif mode == "rel":
            du_w, z_w = (du.float(), z.float()) if du.dtype != res.dtype else (du, z)
            obj = (du_w.abs() / z_w.abs().clamp_min(_EPS)).amax(dim=1)
            met = (du_w.abs() <= self.reltol * z_w.abs()).all(dim=1)
        elif mode == "rel_norm":
            obj = rel
            met = obj <= self.reltol
        elif mode == "norm":
            obj = res
            met = (res <= self.abstol) & (res <= self.reltol * fz_norm)
        else:  # rel_deq_*
            obj = rel
            met = obj <= self.reltol
        if self.batch_wide:
            obj, met = self._batch_objective(obj, met, res, fz_norm)
        return obj, met, res, rel, fz_norm

    def batch_norms(self, res: Tensor, fz_norm: Tensor) -> Tuple[Tensor, Tensor]:
        """The whole batch's ``(||du||, ||f(z)||)`` from the per-sample norms, broadcast to ``(B,)``.

        The L2 norm of the ``(B, N)`` tensor is the L2 norm of the per-sample L2 norms; its RMS norm (over
        ``B × N`` entries) is the root mean square of the per-sample RMS norms.
        """

        def agg(v: Tensor) -> Tensor:
            total = torch.linalg.vector_norm(v) if self.norm == "l2" else v.square().mean().sqrt()
            return total.expand_as(v)

        return agg(res), agg(fz_norm)

    def _batch_objective(self, obj: Tensor, met: Tensor, res: Tensor, fz_norm: Tensor) -> Tuple[Tensor, Tensor]:
        """``(objective, met)`` of the batch as one vector, broadcast to every sample."""
        mode = self.mode
        if mode in ("abs", "rel"):  # the worst entry of the batch
            return obj.amax().expand_as(obj), met.all().expand_as(met)
        res_b, fzn_b = self.batch_norms(res, fz_norm)
        if mode == "norm":
            return res_b, (res_b <= self.abstol) & (res_b <= self.reltol * fzn_b)
        if mode == "abs_norm" or mode.startswith("abs_deq"):
            return res_b, res_b <= self.abstol
        rel_b = res_b / (fzn_b + _EPS)
        return rel_b, rel_b <= self.reltol

    @property
    def relative(self) -> bool:
        """True when the tolerance test is relative only (``rel``, ``rel_norm``, ``rel_deq_*``): such a test
        is met by *any* state that is large enough, so the tracker also asks the residual to have fallen."""
        return self.mode.startswith("rel")

    @property
    def stops_on_objective(self) -> bool:
        """True when the tolerance test is ``objective <= tol`` (every mode but ``rel`` and ``norm``)."""
        return self.mode not in ("rel", "norm")

    @property
    def tol(self) -> float:
        """The tolerance the objective is compared against (for the patience rule)."""
        return self.abstol if self.mode.startswith("abs") or self.mode == "norm" else self.reltol

    @property
    def objective_name(self) -> str:
        """What the stopping test compares with `tol`, in words, for plots and messages (the trace of a
        solve records this quantity): e.g. ``"relative residual ||f(z) - z|| / ||f(z)||"``.

        Example:
            >>> from deqlab.solvers import TerminationCondition
            >>> TerminationCondition("rel_deq_default").objective_name
            'relative residual ||f(z) - z|| / ||f(z)||'
            >>> TerminationCondition("abs_norm", batch_wide=True).objective_name
            'absolute residual ||f(z) - z|| (over the batch)'
        """
        names = {
            "abs": "max |f(z) - z|",
            "rel": "max |f(z) - z| / |z|",
            "norm": "absolute residual ||f(z) - z|| (and the relative one)",
        }
        name = names.get(self.mode) or (
            "absolute residual ||f(z) - z||"
            if self.mode.startswith("abs")
            else "relative residual ||f(z) - z|| / ||f(z)||"
        )
        return name + (" (over the batch)" if getattr(self, "batch_wide", False) else "")


def resolve_termination(
    termination: Optional[TerminationCondition],
    *,
    owner: str,
    default_abstol: float = 1e-3,
    default_reltol: float = 1e-3,
    **flat: object,
) -> TerminationCondition:
    """The solver's [`TerminationCondition`][deqlab.solvers.TerminationCondition] from either ``termination=`` or the flat keywords.

    Why one helper: every solver takes the stop rule either as an object or as the flat keywords
    ``mode``, ``abstol_termination``, ``reltol_termination``, ``norm``, ``batch_wide`` (``None`` = not
    given). Giving both
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
                f"(fields mode, abstol, reltol, norm, batch_wide) instead."
            )
        return termination
    unknown = set(flat) - {"mode", "abstol_termination", "reltol_termination", "norm", "batch_wide"}
    if unknown:  # pragma: no cover - programming error inside deqlab
        raise TypeError(f"unknown termination keywords {sorted(unknown)}")

    def pick(key: str, default: Any) -> Any:  # the caller's value: TerminationCondition checks it
        value = flat.get(key)
        return default if value is None else value

    return TerminationCondition(
        mode=pick("mode", "rel_deq_default"),
        abstol=pick("abstol_termination", default_abstol),
        reltol=pick("reltol_termination", default_reltol),
        norm=pick("norm", "l2"),
        batch_wide=pick("batch_wide", False),
    )


class TerminationTracker:
    """Per-solve bookkeeping: which samples are still active, what each returns, and the trace.

    Why one object: every solver (discrete or continuous) feeds it ``(z, du)`` after each evaluation and
    asks whether everything has stopped; the returned iterate, the convergence mask, the per-sample step
    counts and the status are then the same for all algorithms.

    Cost per call: the objective, a few ``(B,)`` comparisons and one host synchronisation (the number
    of active samples). Full-size copies happen only when a sample stops, or every step in the
    ``*_best`` modes, which must remember the best iterate. Algorithms must not modify ``z``/``du``
    in place after handing them over (the tracker keeps references to the previous pair).

    A building block for writing a solver loop; the solvers create one per call. Feed it every
    evaluation with `update`, then read the returned iterate with `finish`, the status with
    `status`, and `converged`, `stalled`, `sample_steps` and `trace_tensor`. ``converged`` marks the
    samples that met the tolerance; ``stalled`` those the patience rule stopped near it (never both).

    Args:
        condition: the [`TerminationCondition`][deqlab.solvers.TerminationCondition] to apply.
        batch: the batch size ``B``.
        numel: ``N``, the per-sample number of entries (the protective break scales with it).
        device: where the per-sample masks live (the state's device).
        dtype: the state's dtype; its machine epsilon sets the resolution guard (``None``: float32's).
        keep_trace: record the objective of every update for `trace_tensor`. Default ``True``:
            one ``(B,)`` tensor per step, cheap next to the state.

    Example:
        >>> import torch
        >>> from deqlab.solvers import TerminationCondition, TerminationTracker
        >>> z = torch.tensor([[0.0], [1.9]], dtype=torch.float64)   # the second sample starts closer
        >>> tracker = TerminationTracker(TerminationCondition("abs_norm", abstol=1e-3), batch=2, numel=1,
        ...                              device=z.device, dtype=z.dtype)
        >>> done = False
        >>> while not done:   # plain iteration on z = 0.5 z + 1
        ...     fz = 0.5 * z + 1
        ...     done = tracker.update(z, fz - z, fz=fz)
        ...     z = fz
        >>> tracker.status(), tracker.sample_steps.tolist()   # each sample stopped on its own
        (<SolverStatus.CONVERGED: 'converged'>, [10, 6])
        >>> z_ret, du, residual, rel_residual = tracker.finish(z, 0.5 * z + 1 - z)
        >>> z_ret.round(decimals=4), bool((residual <= 1e-3).all())
        (tensor([[1.9980],
                [1.9984]], dtype=torch.float64), True)
    """

    def __init__(
        self, condition: TerminationCondition, batch: int, numel: int, *, device, dtype, keep_trace: bool = True
    ):
        self.cond = condition
        self.eps = torch.finfo(dtype if dtype is not None else torch.float32).eps  # of the state, not the norms
        self.numel = numel
        self.batch = batch
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.converged = torch.zeros(batch, dtype=torch.bool, device=device)
        self.stalled = torch.zeros(batch, dtype=torch.bool, device=device)
        self.diverged = torch.zeros(batch, dtype=torch.bool, device=device)
        self.nonfinite = torch.zeros(batch, dtype=torch.bool, device=device)
        self.sample_steps = torch.zeros(batch, dtype=torch.long, device=device)
        self.keep_trace = keep_trace
        self.trace: list = []
        self.step = 0
        self.n_active = batch
        self._n_active_stale = False  # True after update(sync=False): n_active is then refreshed lazily
        self._obj0: Optional[Tensor] = None
        self._prev: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None  # last (z, du, res, rel)
        self._ret: Optional[list] = None  # [z, du, res, rel] each sample returns
        self._best_obj: Optional[Tensor] = None
        self._history: Optional[Tensor] = None
        box = _RECORD.get()
        self.record_steps: Optional[List[int]] = box.pop() if box else None  # see record_iterates
        self._recorded: Dict[int, Tensor] = {}

    def update(
        self,
        z: Tensor,
        du: Tensor,
        mask: Optional[Tensor] = None,
        fz: Optional[Tensor] = None,
        diverged: Optional[Tensor] = None,
        sync: bool = True,
    ) -> bool:
        """Record the evaluation ``du = f(z) - z``; return True when every sample has stopped.

        ``mask`` restricts the update to samples that actually moved (continuous solvers reject steps
        per sample). ``fz`` (``= z + du``) saves a full-size addition when the caller has it.
        ``diverged`` flags samples the solver itself found diverging (stopped with that status).

        ``sync=False`` keeps every decision on the device: the per-sample masks, returned iterates and
        step counts are updated exactly as with ``sync=True`` (with ``torch.where`` instead of a host
        test of whether anything stopped), but nothing is read back and the call returns False; ask
        `all_stopped` (one host sync) when the answer is needed.
        """
        cond = self.cond
        if self.record_steps is not None and self.step in self.record_steps:
            self._recorded[self.step] = z.clone()
        obj, met, res, rel, fzn = cond._evaluate(z, du, fz)
        cur = (z, du, res, rel)  # what a sample returns: its own residuals, also when batch-wide
        numel = self.numel
        if cond.batch_wide:
            # One verdict for the batch: the guards below see the batch's norms, a step counts for every
            # sample when any sample moved, and a sample the solver flags diverged flags the batch.
            res, fzn = cond.batch_norms(res, fzn)
            numel = self.numel * self.batch
            if mask is not None:
                mask = mask.any().expand_as(mask)
            if diverged is not None:
                diverged = diverged.any().expand_as(diverged)
        live = self.active if mask is None else self.active & mask
        first = self._obj0 is None
        if first:
            finite0 = torch.isfinite(obj)
            self._obj0 = torch.where(finite0, obj, torch.zeros_like(obj))
            # One comparison per step then flags both divergence and NaN/Inf: NaN < x is False, and a
            # sample with objective_0 = 0 (it starts at its fixed point) only fails on non-finite values.
            self._threshold = torch.where(
                self._obj0 > 0, cond.protective_threshold * numel * self._obj0, torch.full_like(obj, math.inf)
            )
            res0 = torch.where(torch.isfinite(res), res, torch.zeros_like(res))
            fzn0 = torch.where(torch.isfinite(fzn), fzn, torch.zeros_like(fzn))
            inf = torch.full_like(res0, math.inf)
            # The same protective break on the absolute residual, so relative modes (whose objective
            # stays bounded while z -> 2z + 1 explodes) see divergence too.
            self._res_threshold = torch.where(res0 > 0, cond.protective_threshold * numel * res0, inf)
            # Resolution lost: once eps * ||f(z)|| reaches the first residual, rounding in f alone is as
            # large as where the solve started, so f(z) - z can no longer show progress (z -> z + 1 runs
            # until (z + 1) - z == 0). Only for an iterate that grew (not a warm start at the fixed point).
            self._lost_at = torch.where(res0 > 0, torch.maximum(res0 / self.eps, 2 * fzn0), inf)
            # A relative test is met by any state large enough: once ||f(z)|| has doubled, a later step
            # must also have halved the first residual (z -> z + 1 keeps ||f(z) - z|| constant while
            # ||f(z)|| grows until the relative test holds).
            self._res_fall = 0.5 * res0
            self._grown_at = 2 * fzn0
            # abs_norm / abs_deq_*: the objective is the residual, so the two breaks coincide
            self._obj_is_res = cond.mode == "abs_norm" or cond.mode.startswith("abs_deq")
            self._prev = cur
            self._ret = list(cur)
        if self.keep_trace:
            self.trace.append(obj if mask is None or not self.trace else torch.where(mask, obj, self.trace[-1]))
        patience_met = self._patience_rule(obj, live) if cond.uses_patience else None
        # quick: host tests may skip work when nothing stops. After updates with sync=False, a synced
        # step instead does every merge on the device and reads back only the number of active samples.
        quick = sync and not self._n_active_stale
        fell = None if first or not cond.relative else (res < self._res_fall) | (fzn <= self._grown_at)
        counted: Optional[Tuple[Tensor, int]] = None  # (the stopping mask, its size), read in one host sync
        if quick and mask is None and not cond.returns_best and cond.stops_on_objective:
            # Fast path: a sample goes on while it is not bad (objective below the protective threshold,
            # residual and ||f(z)|| sane; NaN fails every test) and has not met the test (tol < objective,
            # patience not met) -- or met a relative test although its residual has not fallen. That is
            # exactly the complement of the stop rule below, so the one host sync that counts the samples
            # stopping both decides whether anything stops and, when some do, gives the new number of
            # active samples (no second sync).
            ok = (obj < self._threshold) & (fzn < self._lost_at)
            if not self._obj_is_res:
                ok = ok & (res < self._res_threshold)
            if diverged is not None:
                ok = ok & ~diverged
            unmet = obj > cond.tol
            if patience_met is not None and self.step + 1 >= cond.patience:
                unmet = unmet & ~patience_met
            if fell is not None:
                unmet = unmet | ~fell
            stop = ~(ok & unmet)
            if self.n_active != self.batch:
                stop = stop & self.active
            n_stop = int(stop.sum())
            if n_stop == 0:
                self._advance(cur, mask)
                return False
            counted = (stop, n_stop)
        sane = (res < self._res_threshold) & (fzn < self._lost_at)  # False for NaN/Inf too
        lost = fzn >= self._lost_at  # finite-valued runaway (NaN/Inf are handled as non-finite below)
        if cond.returns_best:
            if self._best_obj is None:
                self._best_obj = torch.full_like(obj, math.inf)
            take = live & (obj < self._best_obj) & sane  # NaN never improves the best, nor a runaway
            self._best_obj = torch.where(take, obj, self._best_obj)
            self._ret = self._merge(self._ret, cur, take)
        within_tol = met  # the tolerance test proper: only these samples may be called converged
        if patience_met is not None:
            met = met | patience_met
        if fell is not None:
            met = met & fell
        bad = ~(obj < self._threshold) | ~sane
        if diverged is not None:
            bad = bad | diverged
        met = met & ~bad
        # The fast path's mask is this same rule; taking it keeps the count read there exact.
        stopping = (met | bad) & live if counted is None else counted[0]
        # From here on everything stays on the device (merges with an empty mask are no-ops), so a step on
        # which samples stop costs one host sync more than a step that takes the fast path: the count of
        # active samples below.
        finite = torch.isfinite(obj) & torch.isfinite(res) & torch.isfinite(fzn)
        stop_ok = stopping & finite & met  # stopped by the rule: within tolerance, or stalled near it
        stop_conv = stop_ok & within_tol
        stop_stall = stop_ok & ~within_tol  # the patience rule alone: near, not within, the tolerance
        stop_nan = stopping & ~finite
        stop_div = stopping & ~stop_ok & ~stop_nan
        self.converged |= stop_conv
        self.stalled |= stop_stall
        self.diverged |= stop_div
        self.nonfinite |= stop_nan
        self.sample_steps = torch.where(stopping, torch.full_like(self.sample_steps, self.step), self.sample_steps)
        if not cond.returns_best:
            # A runaway iterate's residual is lost to rounding: return the last iterate before it.
            use_prev = stop_nan | (stop_div & lost)
            self._ret = self._merge(self._ret, cur, stop_ok | (stop_div & ~lost))
            self._ret = self._merge(self._ret, self._prev, use_prev)
        self.active = self.active & ~stopping
        self._advance(cur, mask)
        if not sync:
            self._n_active_stale = True
            return False
        self.n_active = int(self.active.sum()) if counted is None else self.n_active - counted[1]
        self._n_active_stale = False
        return self.n_active == 0

    def all_stopped(self) -> bool:
        """True when every sample has stopped (one host sync); refreshes `n_active`."""
        self.n_active = int(self.active.sum())
        self._n_active_stale = False
        return self.n_active == 0

    def _advance(self, cur, mask: Optional[Tensor]) -> None:
        if mask is None:
            self._prev = cur
        else:
            assert self._prev is not None  # a mask comes with the second and later updates
            self._prev = tuple(self._merge(list(self._prev), cur, mask))
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

    def finish(
        self, z: Tensor, du: Tensor, last_step: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The returned ``(z, du, residual, rel_residual)``: still-active samples give the last iterate
        (or their best one in ``*_best`` modes). Their step count is that of the last update, or
        ``last_step`` (a 0-dim tensor) when the solver knows the loop had ended earlier in effect
        (a continuous solve that reached its horizon between two checks of ``check_every``)."""
        if self._n_active_stale:
            self.all_stopped()
        if self.n_active and not self.cond.returns_best:
            self._ret = self._merge(self._ret, self._prev, self.active)
        end = torch.full_like(self.sample_steps, self.step - 1)
        if last_step is not None:
            end = torch.where(last_step >= 0, torch.minimum(end, last_step), end)
        self.sample_steps = torch.where(self.active, end, self.sample_steps)
        assert self._ret is not None  # set by the first update, before any finish
        z_ret, du_ret, res, rel = self._ret
        return z_ret, du_ret, res, rel

    def iterates(self, z_ret: Tensor) -> Optional[List[Tensor]]:
        """The recorded flat iterates (after `finish`), one per step of `record_iterates` in its order:
        a sample that had stopped before a step (or a step the loop never reached) gives ``z_ret``, its
        returned iterate. ``None`` when nothing was requested."""
        if self.record_steps is None:
            return None
        out = []
        for s in self.record_steps:
            rec = self._recorded.get(s)
            if rec is None:
                out.append(z_ret.clone())
            else:
                reached = (self.sample_steps >= s).unsqueeze(1)
                out.append(torch.where(reached, rec, z_ret))
        return out

    def trace_tensor(self) -> Optional[Tensor]:
        """``(steps, B)`` objectives; entries after a sample stopped repeat its final value."""
        if not self.trace:
            return None
        tr = torch.stack(self.trace)
        idx = torch.arange(tr.shape[0], device=tr.device).unsqueeze(1)
        last = tr.gather(0, self.sample_steps.clamp_max(tr.shape[0] - 1).unsqueeze(0))
        return torch.where(idx > self.sample_steps.unsqueeze(0), last, tr)

    def status(self):
        """The solve's [`SolverStatus`][deqlab.solvers.SolverStatus]: ``converged`` when every sample converged,
        else the worst outcome (``nonfinite`` > ``diverged`` > ``max_steps`` > ``stalled``). One host sync."""
        from deqlab.solvers.result import SolverStatus

        n_conv, n_stall, n_nan, n_div = torch.stack(
            [self.converged.sum(), self.stalled.sum(), self.nonfinite.sum(), self.diverged.sum()]
        ).tolist()
        if n_conv == self.batch:
            return SolverStatus.CONVERGED
        if n_nan:
            return SolverStatus.NONFINITE
        if n_div:
            return SolverStatus.DIVERGED
        if n_conv + n_stall < self.batch:  # some sample was still running when the budget ran out
            return SolverStatus.MAX_STEPS
        return SolverStatus.STALLED


# ------------------------------------------------------------------------------ the compiled solver step
#
# `TerminationTracker.update(sync=False)` as a pure function of tensors, for `torch.compile`. Why a second
# spelling: `update` keeps Python state (a step counter, lazily built buffers, host tests on the fast path)
# that would make a compiled graph guard on -- and recompile for -- every step. This one takes every piece
# of per-solve state as a tensor and returns the new one, with no host synchronisation and no Python branch
# on a tensor's value, so `torch.compile(fullgraph=True)` fuses it with the algorithm's step. It is only
# ever called after the tracker's first (eager) update, with no ``mask``/``diverged`` (the discrete
# solver's loop), and makes exactly the decisions of the slow path of `update` (the equality tests of
# tests/solvers/test_compiled_step.py hold the two together).

#: the tracker's per-solve tensors a compiled step reads and returns (``prev``/``ret``: (z, du, res, rel))
_DEVICE_FIELDS = ("active", "converged", "stalled", "diverged", "nonfinite", "sample_steps")
_DEVICE_CONSTANTS = ("_threshold", "_res_threshold", "_lost_at", "_res_fall", "_grown_at")


def export_device_state(tracker: TerminationTracker) -> dict:
    """The tracker's per-solve state as a dict of tensors (after its first update), for `device_update`."""
    prev, ret = tracker._prev, tracker._ret  # set, with _obj0, by the first update
    if tracker._obj0 is None or prev is None or ret is None:
        raise RuntimeError("export_device_state needs a tracker that has seen its first update")
    state = {name: getattr(tracker, name) for name in _DEVICE_FIELDS}
    state.update({name: getattr(tracker, name) for name in _DEVICE_CONSTANTS})
    state["prev"] = tuple(prev)
    # After the first update the returned and the previous iterates are the same tensors; after a compiled
    # step they never are. Copies (once per solve) keep the aliasing of the inputs the same at every step,
    # else dynamo's aliasing guard would recompile the step after its first call.
    state["ret"] = tuple(t.clone() for t in ret)
    state["step"] = torch.tensor(tracker.step, dtype=torch.long, device=tracker.active.device)
    if tracker._best_obj is not None:
        state["best_obj"] = tracker._best_obj
    if tracker._history is not None:
        state["history"] = tracker._history
    return state


def load_device_state(tracker: TerminationTracker, state: dict, step: int) -> None:
    """Write a state returned by `device_update` back into ``tracker``, whose update counter becomes
    ``step`` (the host knows it, so nothing is read back). The number of active samples is left stale:
    `TerminationTracker.all_stopped` (or `finish`) reads it in one host sync."""
    for name in _DEVICE_FIELDS:
        setattr(tracker, name, state[name])
    tracker._prev = tuple(state["prev"])
    tracker._ret = list(state["ret"])
    if "best_obj" in state:
        tracker._best_obj = state["best_obj"]
    if "history" in state:
        tracker._history = state["history"]
    tracker.step = step
    tracker._n_active_stale = True


def device_update(
    cond: TerminationCondition,
    state: dict,
    z: Tensor,
    du: Tensor,
    fz: Optional[Tensor],
    mask: Optional[Tensor] = None,
    diverged: Optional[Tensor] = None,
) -> Tuple[dict, Tensor]:
    """One tracker update on the device: ``(new state, objective)`` for the evaluation ``du = f(z) - z``.

    The pure twin of `TerminationTracker.update` (``sync=False``): same stop rule, same merges, same step
    counts; the step counter is the tensor ``state["step"]``. ``mask`` (the samples that moved: a
    continuous solver's accepted steps) and ``diverged`` (samples the solver found diverging) as there.
    """
    obj, met, res, rel, fzn = cond._evaluate(z, du, fz)
    cur = (z, du, res, rel)
    if cond.batch_wide:
        res, fzn = cond.batch_norms(res, fzn)
        if mask is not None:
            mask = mask.any().expand_as(mask)
        if diverged is not None:
            diverged = diverged.any().expand_as(diverged)
    step = state["step"]
    live = state["active"] if mask is None else state["active"] & mask
    new = dict(state)
    patience_met = None
    if cond.uses_patience:
        hist = state["history"]
        slot = (step % cond.patience).view(1)
        row = torch.where(live, obj, hist.index_select(0, slot).squeeze(0))
        hist = hist.index_copy(0, slot, row.unsqueeze(0))
        new["history"] = hist
        stalled = hist.amax(dim=0) < cond.min_max_factor * hist.amin(dim=0)
        patience_met = stalled & (obj <= cond.patience_objective_multiplier * cond.tol) & (step + 1 >= cond.patience)
    fell = (res < state["_res_fall"]) | (fzn <= state["_grown_at"]) if cond.relative else None
    sane = (res < state["_res_threshold"]) & (fzn < state["_lost_at"])
    lost = fzn >= state["_lost_at"]
    ret = list(state["ret"])
    if cond.returns_best:
        take = live & (obj < state["best_obj"]) & sane
        new["best_obj"] = torch.where(take, obj, state["best_obj"])
        ret = TerminationTracker._merge(ret, cur, take)
    within_tol = met
    if patience_met is not None:
        met = met | patience_met
    if fell is not None:
        met = met & fell
    bad = ~(obj < state["_threshold"]) | ~sane
    if diverged is not None:
        bad = bad | diverged
    met = met & ~bad
    stopping = (met | bad) & live
    finite = torch.isfinite(obj) & torch.isfinite(res) & torch.isfinite(fzn)
    stop_ok = stopping & finite & met
    stop_conv = stop_ok & within_tol
    stop_stall = stop_ok & ~within_tol
    stop_nan = stopping & ~finite
    stop_div = stopping & ~stop_ok & ~stop_nan
    new["converged"] = state["converged"] | stop_conv
    new["stalled"] = state["stalled"] | stop_stall
    new["diverged"] = state["diverged"] | stop_div
    new["nonfinite"] = state["nonfinite"] | stop_nan
    new["sample_steps"] = torch.where(stopping, step, state["sample_steps"])
    if not cond.returns_best:
        ret = TerminationTracker._merge(ret, cur, stop_ok | (stop_div & ~lost))
        ret = TerminationTracker._merge(ret, state["prev"], stop_nan | (stop_div & lost))
    new["ret"] = tuple(ret)
    new["active"] = state["active"] & ~stopping
    new["prev"] = cur if mask is None else tuple(TerminationTracker._merge(list(state["prev"]), cur, mask))
    new["step"] = step + 1
    return new, obj
