"""``ContinuousDEQSolver``: the fixed point as the steady state of ``du/dt = f(u) - u``.

torchdyn supplies the Runge–Kutta steppers (Tsit5, Dopri5, Euler, RK4); deqlab supplies the loop,
because torchdyn's own ``odeint`` has no step cap and no steady-state stop (``t_span`` to infinity never
returns) and its event path hangs at a steady state. The loop here:

* gives every sample its own step size (``dt`` has shape ``(B, 1)``), accepting or rejecting steps per
  sample, so one stiff sample does not slow the others;
* checks the termination condition after every accepted step at no extra cost: the first-same-as-last
  stage of Tsit5/Dopri5 *is* ``du = f(u) - u`` at the new point;
* stops at ``max_steps`` stepper calls (accepted or rejected) or when every sample reaches ``t_max``;
  it can never hang.

Gradients are not this solver's job: the DEQ layer's implicit backward differentiates the steady state.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Literal, Optional, Tuple

import torch
from torch import Tensor

from deqlab.solvers._checks import check_int as _check_int, check_number as _check_number, renamed
from deqlab.solvers._driver import (CountedMap, build_result, check_first_step, check_max_steps, empty_result,
                                    prepare)
from deqlab.state import State
from deqlab.solvers.counting import ReferenceCounting, check_reference_counting, reference_nfe
from deqlab.solvers.result import SolverResult
from deqlab.solvers.termination import (NormKind, TerminationCondition, TerminationMode, TerminationTracker,
                                        _check_tol, resolve_termination)

ODEMethod = Literal["tsit5", "dopri5", "euler", "rk4"]
# name -> (torchdyn class name, adaptive?, order, evaluations per step given the first stage)
_METHODS: Dict[str, Tuple[str, bool, int, int]] = {
    "tsit5": ("Tsitouras45", True, 5, 6),
    "dopri5": ("DormandPrince45", True, 5, 6),
    "euler": ("Euler", False, 1, 0),
    "rk4": ("RungeKutta4", False, 4, 3),
}


def _stepper(name: str, dtype: torch.dtype):
    # Imported lazily: torchdyn pulls in torchcde/torchsde (~0.7 s) that discrete users never need.
    from torchdyn.numerics.solvers import ode

    return getattr(ode, _METHODS[name][0])(dtype=dtype)


class ContinuousDEQSolver:
    """Integrate ``du/dt = f(u) - u`` from ``u0`` until the termination condition holds.

    Follows the flow, so it converges whenever the flow is stable, even where fixed-point iteration does
    not (e.g. ``f(z) = -1.5 z + b``), usually at more evaluations than a discrete solver. Each sample has
    its own step size and stops on its own.

    Args:
        ode_solver: ``"tsit5"`` (default: an efficient adaptive 5(4) pair whose last stage is the residual
            at the new point, so the termination test is free), ``"dopri5"`` (adaptive), ``"euler"`` or
            ``"rk4"`` (fixed step ``dt``; Euler with ``dt=1`` is exactly fixed-point iteration).
        mode: termination mode, checked after every accepted step; ``None`` (default) means
            ``"rel_deq_default"``, as for [`DiscreteDEQSolver`][deqlab.solvers.DiscreteDEQSolver].
        ode_abstol: the ODE stepper's absolute local error tolerance (how accurately the path is
            followed). ``None`` (default) means ``1e-3``: the steady state does not depend on it, so a
            loose, cheap value is fine. ``abstol`` is accepted as its old name (giving both raises).
        ode_reltol: the ODE stepper's relative local error tolerance; ``None`` (default) means ``1e-3``,
            as for ``ode_abstol``. ``reltol`` is accepted as its old name.
        abstol_termination: absolute tolerance of the termination condition (how close to the fixed
            point the returned state is). ``None`` (default) means ``ode_abstol``, as in the reference
            package. Keep it at least 10x the ODE tolerance: near the steady state the iterates jitter
            at about the ODE tolerance, so a tighter termination is reached slowly or never.
        reltol_termination: relative tolerance of the termination condition; ``None`` (default) means
            ``ode_reltol``, as for ``abstol_termination``.
        max_steps: stepper calls at most (accepted and rejected), the hard guard against hanging.
            Default 100: each Tsit5/Dopri5 call costs 6 evaluations, so about 600 evaluations at most.
        t_max: integration horizon; ``inf`` (default) integrates until convergence or ``max_steps`` (the
            steady state lies at ``t -> inf``); a finite value follows the flow to that time.
        dt: step size of the fixed-step methods; also the first step of adaptive ones when given.
            ``None`` (default): 1.0 for Euler/RK4, and a per-sample Hairer–Wanner estimate (one extra
            evaluation) for the adaptive methods.
        norm: ``"l2"`` or ``"rms"`` for the termination condition; ``None`` (default) means ``"l2"``.
        throw: raise [`SolverError`][deqlab.solvers.SolverError] instead of returning an unconverged result. Default ``False``,
            as for [`DiscreteDEQSolver`][deqlab.solvers.DiscreteDEQSolver].
        keep_trace: record the termination objective of every step in ``result.trace``. Default ``True``
            (cheap: ``(steps, B)``).
        safety: step-size controller: the next step aims at ``safety`` times the step the error estimate
            allows, in ``(0, 1]``. Default 0.9, the standard choice, so the next step is rarely rejected.
        min_factor: a rejected step shrinks by at most this factor, in ``(0, 1]``. Default 0.2 (at most
            5x smaller), so one bad error estimate does not collapse the step.
        max_factor: an accepted step grows by at most this factor, ``>= 1``. Default 10.0, so a lucky
            error estimate cannot throw the step far past the method's stability region.
        divergence_patience: adaptive methods: a sample whose residual grew on this many consecutive
            accepted steps (each growth halves its step; steps whose change is below the dtype's rounding
            neither count nor reset) is stopped with status ``diverged``. Default 20:
            long enough that a transient growth of a stable flow is not mistaken for a runaway.
        max_nonfinite_retries: adaptive methods: a sample whose steps produced NaN/Inf this many times
            is stopped with status ``nonfinite`` and returns its last finite state. Default 10: each retry
            shrinks the step, so ten failures mean the flow itself runs into a non-finite region.
        termination: a full [`TerminationCondition`][deqlab.solvers.TerminationCondition] instead of ``mode``, ``abstol_termination``,
            ``reltol_termination``, ``norm`` and ``batch_wide``; giving both raises ``ValueError``. Default ``None``.
        reference_counting: the convention of ``result.reference_nfe`` (the paper's count beside ``nfe``,
            see `deqlab.solvers.counting`): ``"deqjl"`` (default: OrdinaryDiffEq's ``nf`` + 1, as
            DeepEquilibriumNetworks.jl reported it; Tsit5 ``6a + 4`` for ``a`` attempted steps) or
            ``"fastdeq"`` (the January-2022 counter, ``6a + 5``). Only the reported number changes.
        check_every: test on the host whether every sample has stopped only every ``k`` stepper calls
            (see [`DiscreteDEQSolver`][deqlab.solvers.DiscreteDEQSolver]): the returned state is exactly that of
            ``k = 1``, with up to ``k - 1`` extra stepper calls after the last sample stopped. Default 1.
        batch_wide: evaluate the termination condition once over the whole batch, so every sample
            stops together (see [`TerminationCondition`][deqlab.solvers.TerminationCondition]); a sample's
            protective breaks (runaway flow, repeated NaN) then stop the whole batch too. ``None``
            (default) means ``False``: per sample.
        abstol: old name of ``ode_abstol``, kept so old code runs; default ``None`` (not given).
        reltol: old name of ``ode_reltol``; default ``None`` (not given).

    Raises:
        ValueError: ``ode_solver`` is unknown; an ODE tolerance is given under both its names, is not a
            finite number >= 0, or both are 0; ``max_steps`` is not an int >= 0; ``t_max`` is not > 0;
            ``dt`` is not a finite number > 0; a controller option, ``divergence_patience``,
            ``max_nonfinite_retries`` or ``check_every`` is out of range; or ``termination`` is given
            together with the flat keywords (or the flat ones are invalid).
        TypeError: ``termination`` is not a [`TerminationCondition`][deqlab.solvers.TerminationCondition].

    Example:
        >>> import torch
        >>> from deqlab.solvers import ContinuousDEQSolver
        >>> solver = ContinuousDEQSolver("tsit5", mode="abs_norm", ode_abstol=1e-8, ode_reltol=1e-8,
        ...                              abstol_termination=1e-6, max_steps=200)
        >>> res = solver(lambda z: 0.5 * z + 1, torch.zeros(2, 3, dtype=torch.float64))   # du/dt = 1 - u/2
        >>> res.status, res.z.round(decimals=5)
        (<SolverStatus.CONVERGED: 'converged'>, tensor([[2., 2., 2.],
                [2., 2., 2.]], dtype=torch.float64))
        >>> res.t.round(decimals=1)   # integration time reached by each sample
        tensor([31.2000, 31.2000], dtype=torch.float64)

    Why two names: "reltol" used to mean the ODE tolerance here and the termination tolerance everywhere
    else; ``ode_*`` and ``*_termination`` now say which one is meant. ``solver.abstol``/``solver.reltol``
    stay readable (they are the ODE tolerances) for old code.
    """

    def __init__(
        self,
        ode_solver: ODEMethod = "tsit5",
        *,
        mode: Optional[TerminationMode] = None,
        ode_abstol: Optional[float] = None,
        ode_reltol: Optional[float] = None,
        abstol_termination: Optional[float] = None,
        reltol_termination: Optional[float] = None,
        max_steps: int = 100,
        t_max: float = math.inf,
        dt: Optional[float] = None,
        norm: Optional[NormKind] = None,
        throw: bool = False,
        keep_trace: bool = True,
        safety: float = 0.9,
        min_factor: float = 0.2,
        max_factor: float = 10.0,
        divergence_patience: int = 20,
        max_nonfinite_retries: int = 10,
        termination: Optional[TerminationCondition] = None,
        check_every: int = 1,
        batch_wide: Optional[bool] = None,
        abstol: Optional[float] = None,
        reltol: Optional[float] = None,
        reference_counting: ReferenceCounting = "deqjl",
    ):
        owner = "ContinuousDEQSolver"
        if ode_solver not in _METHODS:
            raise ValueError(f"unknown ode_solver {ode_solver!r}; valid: {', '.join(_METHODS)}")
        self.ode_solver = ode_solver
        self.ode_abstol = _check_tol("ode_abstol", renamed(owner, "ode_abstol", ode_abstol, "abstol", abstol, 1e-3))
        self.ode_reltol = _check_tol("ode_reltol", renamed(owner, "ode_reltol", ode_reltol, "reltol", reltol, 1e-3))
        if self.ode_abstol == 0 and self.ode_reltol == 0:
            raise ValueError("ode_abstol and ode_reltol cannot both be 0: the step-size controller needs a tolerance")
        self.termination: TerminationCondition = resolve_termination(
            termination, mode=mode, abstol_termination=abstol_termination, reltol_termination=reltol_termination,
            norm=norm, batch_wide=batch_wide, owner="ContinuousDEQSolver", default_abstol=self.ode_abstol, default_reltol=self.ode_reltol)
        self.max_steps = check_max_steps(max_steps)
        if not isinstance(t_max, (int, float)) or isinstance(t_max, bool) or not (t_max > 0):
            raise ValueError(f"t_max must be > 0 (math.inf for no horizon), got {t_max!r}")
        self.t_max = float(t_max)
        _, adaptive, self.order, self.stage_evals = _METHODS[ode_solver]
        self.adaptive = adaptive
        if dt is not None and not (isinstance(dt, (int, float)) and not isinstance(dt, bool) and dt > 0
                                   and math.isfinite(dt)):
            raise ValueError(f"dt must be a finite number > 0, got {dt!r}")
        self.dt = dt if dt is not None or adaptive else 1.0
        # The step-size controller: h_new = h * clip(safety * ratio^(-1/order), min_factor, max_factor).
        self.safety = _check_number(owner, "safety", safety, low=0.0, high=1.0, low_open=True)
        self.min_factor = _check_number(owner, "min_factor", min_factor, low=0.0, high=1.0, low_open=True)
        self.max_factor = _check_number(owner, "max_factor", max_factor, low=1.0)
        self.divergence_patience = _check_int(owner, "divergence_patience", divergence_patience, low=1)
        self.max_nonfinite_retries = _check_int(owner, "max_nonfinite_retries", max_nonfinite_retries, low=1)
        self.check_every = _check_int(owner, "check_every", check_every, low=1)
        self.throw = bool(throw)
        self.keep_trace = bool(keep_trace)
        self.reference_counting = check_reference_counting(owner, reference_counting)

    @property
    def abstol(self) -> float:
        """Old name of `ode_abstol` (the ODE step tolerance, not the termination one)."""
        return self.ode_abstol

    @property
    def reltol(self) -> float:
        """Old name of `ode_reltol` (the ODE step tolerance, not the termination one)."""
        return self.ode_reltol

    def __repr__(self) -> str:
        return (f"ContinuousDEQSolver({self.ode_solver!r}, mode={self.termination.mode!r}, "
                f"ode_abstol={self.ode_abstol}, ode_reltol={self.ode_reltol}, "
                f"abstol_termination={self.termination.abstol}, reltol_termination={self.termination.reltol}, "
                f"norm={self.termination.norm!r}, max_steps={self.max_steps}, t_max={self.t_max}"
                + (", batch_wide=True)" if self.termination.batch_wide else ")"))

    @torch.no_grad()
    def __call__(self, f: Callable[[State], State], z0: State) -> SolverResult:
        """Integrate ``du/dt = f(u) - u`` from ``u(0) = z0`` until every sample stops.

        Args:
            f: maps a state to a state of the same structure, shapes and dtype (checked on the first call).
            z0: the batch-first initial state: a floating-point tensor ``(B, ...)`` or a list of them.

        Returns:
            The [`SolverResult`][deqlab.solvers.SolverResult], with ``t`` the time each sample reached.

        Raises:
            TypeError: ``z0`` or ``f(z0)`` is not a state of floating-point tensors shaped like ``z0``.
            ValueError: ``z0`` contains NaN/Inf, or ``f`` returns other shapes or another dtype.
            SolverError: with ``throw=True``, when some sample did not converge.
        """
        packer, u = prepare(z0)
        if packer.batch == 0:
            return empty_result(packer, u, continuous=True, reference_counting=self.reference_counting)
        F = CountedMap(f, packer)

        def vf(t, x, args=None):  # torchdyn's stepper signature; autonomous field
            return F(x) - x

        stepper = _stepper(self.ode_solver, u.dtype)
        t0 = torch.zeros(1, dtype=u.dtype, device=u.device)
        u, _ = stepper.sync_device_dtype(u, t0)
        B = u.shape[0]
        du = vf(None, u)
        tracker = TerminationTracker(self.termination, B, packer.numel, device=u.device, dtype=u.dtype,
                                     keep_trace=self.keep_trace)
        done = tracker.update(u, du)
        check_first_step(tracker, u)
        t = u.new_zeros(B)
        estimated_dt = self.adaptive and self.dt is None and not done
        dt = self._initial_dt(vf, u, du) if not done else u.new_ones(B)
        du_norm = torch.linalg.vector_norm(du, dim=1)
        nonfinite_tries = torch.zeros(B, dtype=torch.long, device=u.device)
        growths = torch.zeros(B, dtype=torch.long, device=u.device)
        diverging = None
        horizon_step: Optional[Tensor] = None
        steps = 0
        while not done and steps < self.max_steps:
            h = torch.minimum(dt, self.t_max - t) if math.isfinite(self.t_max) else dt
            out = stepper.step(vf, u, t0, h.unsqueeze(1), k1=du)
            u_new, err = out[1], out[2]
            if self.adaptive:
                du_new = out[0]  # first-same-as-last stage: f(u_new) - u_new
                ratio = self._error_ratio(err, u, u_new)
                accept = ratio <= 1.0
                dt = self._adapt(h, ratio, accept)
                # Near the steady state a loose error tolerance lets the step outgrow the method's
                # stability region, and the iterates oscillate with a residual that creeps up while the
                # error estimate stays small. Along the true flow of a contractive f the residual
                # decreases, so a growing residual halves the next step.
                new_norm = torch.linalg.vector_norm(du_new, dim=1)
                grew = accept & (new_norm > du_norm)
                dt = torch.where(grew, torch.minimum(dt, 0.5 * h), dt)
                # A residual that keeps growing although every growth halved the step is the flow
                # itself running away: the sample diverges (the reference's protective break would
                # never fire, since the halved steps make the growth ever slower). Only a decrease larger
                # than the dtype's rounding ends the streak: in float32/bfloat16 the halved steps soon make
                # the growth per step unresolvable (the norm repeats or jitters by an ulp), and those
                # steps must neither count as growth nor reset the count, or a runaway flow ends max_steps.
                # A residual at the rounding level of f(z) - z (a stable flow stuck at the dtype's noise
                # floor, common in bfloat16) jitters up and down: its growth is no evidence of a runaway.
                eps = torch.finfo(u.dtype).eps
                shrank = accept & (new_norm < du_norm * (1.0 - 2.0 * eps))
                scale = torch.linalg.vector_norm(u_new, dim=1) + torch.linalg.vector_norm(u_new + du_new, dim=1)
                counted = grew & (new_norm > 8.0 * eps * scale)
                growths = torch.where(counted, growths + 1, torch.where(shrank, torch.zeros_like(growths), growths))
                du_norm = torch.where(accept, new_norm, du_norm)
                diverging = growths >= self.divergence_patience
                # A NaN/Inf stage makes the error estimate infinite and the step is rejected; when steps
                # keep failing that way, the flow runs into a region where f has no finite value: end
                # the sample as non-finite (the tracker then returns its last finite iterate) instead of
                # creeping towards that region until max_steps.
                nonfinite = ~torch.isfinite(new_norm) | torch.isinf(ratio)
                nonfinite_tries = nonfinite_tries + (nonfinite & ~accept).long()
                give_up = nonfinite_tries >= self.max_nonfinite_retries
                accept = accept | give_up
                du_new = torch.where(give_up.unsqueeze(1), torch.full_like(du_new, math.nan), du_new)
                u_new = torch.where(give_up.unsqueeze(1), u, u_new)
            else:
                du_new = vf(None, u_new)
                accept = torch.ones(B, dtype=torch.bool, device=u.device)
            # A sample already at t_max takes zero-length steps while others finish; those must not
            # reach the tracker (repeated identical objectives would fire the patience rule).
            accept = accept & tracker.active & (h > 0)
            a2 = accept.unsqueeze(1)
            u = torch.where(a2, u_new, u)
            du = torch.where(a2, du_new, du)
            t = torch.where(accept, t + h, t)
            steps += 1
            sync = steps % self.check_every == 0
            done = tracker.update(u, du, mask=accept, diverged=diverging, sync=sync)
            if math.isfinite(self.t_max) and not done:
                at_horizon = ((t >= self.t_max * (1 - 1e-12)) | ~tracker.active).all()
                if sync and horizon_step is None:
                    if bool(at_horizon):
                        break
                else:
                    # Between host checks, remember on the device the step at which every running sample
                    # reached the horizon (where a check_every=1 loop would have stopped).
                    if horizon_step is None:
                        horizon_step = torch.full((), -1, dtype=torch.long, device=u.device)
                    horizon_step = torch.where((horizon_step < 0) & at_horizon,
                                               torch.full_like(horizon_step, steps), horizon_step)
                    if sync and bool(horizon_step >= 0):
                        break
        return build_result(tracker, packer, u, du, nfe=F.nfe, steps=steps, throw=self.throw,
                            solver_name=f"ContinuousDEQSolver({self.ode_solver})", t=t, last_step=horizon_step,
                            reference_nfe=reference_nfe(self.reference_counting,
                                                        calls=self._reference_calls(F.nfe, steps, estimated_dt)),
                            reference_counting=self.reference_counting)

    def _reference_calls(self, nfe: int, steps: int, estimated_dt: bool) -> int:
        """The evaluations OrdinaryDiffEq would make for a solve of ``steps`` stepper calls: its
        initial-step heuristic evaluates ``f`` twice where deqlab's evaluates once (reusing ``f(u0)``), it
        runs even when ``u0`` already meets the condition, and the steady-state callback is never tested at
        ``t = 0``, so at least one step is taken."""
        calls = nfe
        if self.adaptive and self.dt is None:
            calls += 1 if estimated_dt else 2
        if steps == 0:
            calls += max(self.stage_evals, 1)
        return calls

    def _scale(self, a: Tensor, b: Optional[Tensor] = None) -> Tensor:
        mag = a.abs() if b is None else torch.maximum(a.abs(), b.abs())
        return self.ode_abstol + self.ode_reltol * mag

    def _error_ratio(self, err: Tensor, u: Tensor, u_new: Tensor) -> Tensor:
        r = err / self._scale(u, u_new)
        ratio = r.pow(2).mean(dim=1).sqrt()
        return torch.where(torch.isfinite(ratio), ratio, torch.full_like(ratio, math.inf))

    def _adapt(self, h: Tensor, ratio: Tensor, accept: Tensor) -> Tensor:
        factor = self.safety * ratio.clamp_min(1e-10).pow(-1.0 / self.order)
        lo = torch.where(accept, torch.ones_like(h), torch.full_like(h, self.min_factor))
        factor = torch.minimum(torch.maximum(factor, lo), torch.full_like(h, self.max_factor))
        factor = torch.where(ratio == 0, torch.full_like(h, self.max_factor), factor)
        return h * factor

    def _initial_dt(self, vf, u: Tensor, du: Tensor) -> Tensor:
        """Per-sample Hairer–Wanner starting step (one extra evaluation) for adaptive methods."""
        B = u.shape[0]
        if self.dt is not None:
            return u.new_full((B,), self.dt)
        scale = self._scale(u)
        rms = lambda v: v.pow(2).mean(dim=1).sqrt()  # noqa: E731
        d0, d1 = rms(u / scale), rms(du / scale)
        h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-30))
        du1 = vf(None, u + h0.unsqueeze(1) * du)
        d2 = rms((du1 - du) / scale) / h0
        dmax = torch.maximum(d1, d2)
        h1 = torch.where(dmax <= 1e-15, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3),
                         (0.01 / dmax.clamp_min(1e-30)).pow(1.0 / (self.order + 1)))
        h = torch.minimum(100 * h0, h1)
        return torch.where(torch.isfinite(h) & (h > 0), h, torch.full_like(h, 1e-3))
