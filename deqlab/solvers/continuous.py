"""``ContinuousDEQSolver``: the fixed point as the steady state of ``du/dt = f(u) - u``.

torchdyn supplies the Runge–Kutta steppers (Tsit5, Dopri5, Euler, RK4), `deqlab.solvers.adams` the
variable-coefficient Adams–Bashforth method VCAB3, and deqlab the loop, because torchdyn's own ``odeint``
has no step cap and no steady-state stop (``t_span`` to infinity never returns) and its event path hangs
at a steady state. The loop here:

* gives every sample its own step size (``dt`` has shape ``(B, 1)``), accepting or rejecting steps per
  sample, so one stiff sample does not slow the others (``per_sample_steps=False``: one step size for the
  batch, as an integrator that sees the batch as one vector);
* checks the termination condition after every accepted step at no extra cost, at the very point it
  returns: the first-same-as-last stage of Tsit5/Dopri5 *is* ``du = f(u) - u`` at the new point (the
  loop keeps that stage's point, not the stepper's separately rounded sum), and VCAB3 needs ``f`` at its
  new point for the next step anyway;
* stops at ``max_steps`` stepper calls (accepted or rejected) or when every sample reaches ``t_max``;
  it can never hang.

Gradients are not this solver's job: the DEQ layer's implicit backward differentiates the steady state.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Literal, Optional, Tuple

import torch
from torch import Tensor

from deqlab import instrument
from deqlab._compat import deprecated, renamed
from deqlab.solvers import adams
from deqlab.solvers._checks import check_int as _check_int
from deqlab.solvers._checks import check_number as _check_number
from deqlab.solvers._checks import checked_keywords
from deqlab.solvers._driver import CountedMap, build_result, check_first_step, check_max_steps, empty_result, prepare
from deqlab.solvers.compiled import (
    CompileOption,
    cached_compile,
    check_compile_option,
    compile_available,
    fallback_warning,
    unsupported,
)
from deqlab.solvers.counting import ReferenceCounting, check_reference_counting, reference_nfe
from deqlab.solvers.result import SolverResult
from deqlab.solvers.termination import (
    NormKind,
    TerminationCondition,
    TerminationMode,
    TerminationTracker,
    _check_tol,
    device_update,
    export_device_state,
    load_device_state,
    resolve_termination,
)
from deqlab.state import State

ODEMethod = Literal["tsit5", "dopri5", "euler", "rk4", "vcab3"]
# name -> (torchdyn class name, or "" for deqlab's own; adaptive?; order; evaluations per step given the
# first stage (VCAB3: after its two 3-evaluation start-up steps))
_METHODS: Dict[str, Tuple[str, bool, int, int]] = {
    "tsit5": ("Tsitouras45", True, 5, 6),
    "dopri5": ("DormandPrince45", True, 5, 6),
    "euler": ("Euler", False, 1, 0),
    "rk4": ("RungeKutta4", False, 4, 3),
    "vcab3": ("", True, adams.ORDER, 1),
}


def _stepper(name: str, dtype: torch.dtype):
    # Imported lazily: torchdyn pulls in torchcde/torchsde (~0.7 s) that discrete users never need.
    from torchdyn.numerics.solvers import ode

    return getattr(ode, _METHODS[name][0])(dtype=dtype)


def _tableau(name: str) -> Tuple[Tuple[Tuple[float, ...], ...], Tuple[float, ...], Tuple[float, ...]]:
    """torchdyn's Butcher tableau of Tsit5/Dopri5 as Python floats: ``(a rows of stages 2-6, b, b - b_hat)``."""
    from torchdyn.numerics.solvers._constants import construct_dopri5, construct_tsit5

    _, a, b, e = {"tsit5": construct_tsit5, "dopri5": construct_dopri5}[name](torch.float64)
    return tuple(tuple(row.tolist()) for row in a[:5]), tuple(b.tolist()), tuple(e.tolist())


def _fsal_step(
    vf: Callable[[Tensor], Tensor], u: Tensor, k1: Tensor, h: Tensor, tableau
) -> Tuple[Tensor, Tensor, Tensor]:
    """One step of a first-same-as-last 7-stage pair (Tsit5, Dopri5) with torchdyn's tableau.

    Why not torchdyn's ``step``: it evaluates the last stage at ``u + h a71 k1 + h a72 k2 + ...`` (each term
    rounded into the state on its own) and returns ``u + h (b . k)``, another rounding of the same point. In
    bfloat16 the two differ by far more than the tolerance, so the residual the termination test saw was
    not that of the returned state. Here the new point is computed once, increment first (in float32 for
    half-precision states, so small steps are not lost against ``u``), and the last stage is evaluated at
    exactly that point: ``du_new = f(u_new) - u_new`` belongs to the returned ``u_new``.

    Returns:
        ``(u_new, du_new, err)``: the new point, the vector field there, the embedded error estimate.
    """
    a, b, e = tableau
    wd = torch.float32 if u.dtype in (torch.float16, torch.bfloat16) else u.dtype
    uw, hc = u.to(wd), h.to(wd).unsqueeze(1)

    def combine(coefs, ks):
        out = None
        for c, k in zip(coefs, ks):
            if c != 0.0:
                out = c * k if out is None else out + c * k
        return out

    ks = [k1.to(wd)]
    for row in a:
        ks.append(vf((uw + hc * combine(row, ks)).to(u.dtype)).to(wd))
    u_new = (uw + hc * combine(b, ks)).to(u.dtype)
    du_new = vf(u_new)
    err = hc * (combine(e[:6], ks) + e[6] * du_new.to(wd))
    return u_new, du_new, err


class ContinuousDEQSolver:
    """Integrate ``du/dt = f(u) - u`` from ``u0`` until the termination condition holds.

    Follows the flow, so it converges whenever the flow is stable, even where fixed-point iteration does
    not (e.g. ``f(z) = -1.5 z + b``), usually at more evaluations than a discrete solver. Each sample has
    its own step size and stops on its own. The termination condition always holds at the returned ``z``
    itself (the test is made at the point returned, in the state's dtype).

    Args:
        ode_solver: ``"tsit5"`` (default: an efficient adaptive 5(4) pair whose last stage is the residual
            at the new point, so the termination test is free), ``"dopri5"`` (adaptive), ``"vcab3"``
            (adaptive Adams–Bashforth of order 3, `deqlab.solvers.adams`: one evaluation per step after
            two 3-evaluation start-up steps, the paper's solver for its multiscale models; cheapest at
            loose tolerances), ``"euler"`` or ``"rk4"`` (fixed step ``dt``; Euler with ``dt=1`` is exactly
            fixed-point iteration).
        mode: termination mode, checked after every accepted step; ``None`` (default) means
            ``"rel_deq_default"``, as for [`DiscreteDEQSolver`][deqlab.solvers.DiscreteDEQSolver].
        ode_abstol: the ODE stepper's absolute local error tolerance (how accurately the path is
            followed). ``None`` (default) means ``1e-3``: the steady state does not depend on it, so a
            loose, cheap value is fine. ``abstol`` is its deprecated old name (warns; giving both raises).
        ode_reltol: the ODE stepper's relative local error tolerance; ``None`` (default) means ``1e-3``,
            as for ``ode_abstol``. ``reltol`` is its deprecated old name.
        abstol_termination: absolute tolerance of the termination condition (how close to the fixed
            point the returned state is). ``None`` (default) means ``ode_abstol``, as in the reference
            package. Keep it at least 10x the ODE tolerance: near the steady state the iterates jitter
            at about the ODE tolerance, so a tighter termination is reached slowly or never.
        reltol_termination: relative tolerance of the termination condition; ``None`` (default) means
            ``ode_reltol``, as for ``abstol_termination``.
        max_steps: stepper calls at most (accepted and rejected), the hard guard against hanging.
            Default 100: each Tsit5/Dopri5 call costs 6 evaluations, so about 600 evaluations at most
            (VCAB3: 1 per call, 0 for a call in which every step was rejected, 3 in its start-up).
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
            (Runge–Kutta methods use the I-controller ``safety * ratio^(-1/order)``; VCAB3 uses
            OrdinaryDiffEq's PI controller with ``beta1 = 7/30``, ``beta2 = 2/15``, whose integral term damps
            the step-size oscillation of a step limited by stability.)
        min_factor: a rejected step shrinks by at most this factor, in ``(0, 1]``. Default 0.2 (at most
            5x smaller), so one bad error estimate does not collapse the step.
        max_factor: an accepted step grows by at most this factor, ``>= 1``. Default 10.0, so a lucky
            error estimate cannot throw the step far past the method's stability region.
        divergence_patience: Tsit5/Dopri5: a sample whose residual grew on this many consecutive
            accepted steps (each growth halves its step; steps whose change is below the dtype's rounding
            neither count nor reset) is stopped with status ``diverged``. Default 20:
            long enough that a transient growth of a stable flow is not mistaken for a runaway. VCAB3
            neither halves nor counts (its steps are small, so 20 of them can be a short stretch of a
            stable flow): its runaways meet the termination tracker's protective break.
        max_nonfinite_retries: adaptive methods: a sample whose steps produced NaN/Inf this many times
            is stopped with status ``nonfinite`` and returns its last finite state. Default 10: each retry
            shrinks the step, so ten failures mean the flow itself runs into a non-finite region. (VCAB3
            evaluates ``f`` only at an accepted point; a non-finite value there rejects the step after the
            fact, and counts as such a failure.)
        termination: a full [`TerminationCondition`][deqlab.solvers.TerminationCondition] instead of ``mode``, ``abstol_termination``,
            ``reltol_termination``, ``norm`` and ``batch_wide``; giving both raises ``ValueError``. Default ``None``.
        reference_counting: the convention of ``result.reference_nfe`` (the paper's count beside ``nfe``,
            see `deqlab.solvers.counting`): ``"deqjl"`` (default: OrdinaryDiffEq's ``nf`` + 1, as
            DeepEquilibriumNetworks.jl reported it; Tsit5 ``6a + 4`` for ``a`` attempted steps) or
            ``"fastdeq"`` (the January-2022 counter, ``6a + 5``). Only the reported number changes.
        check_every: test on the host whether every sample has stopped only every ``k`` stepper calls
            (see [`DiscreteDEQSolver`][deqlab.solvers.DiscreteDEQSolver]): the returned state is exactly that of
            ``k = 1``, with up to ``k - 1`` extra stepper calls after the last sample stopped. Default 1.
            (VCAB3 with ``k > 1`` also evaluates ``f`` in a call where every step was rejected, which it
            skips with ``k = 1``: knowing that needs a host sync.)
        batch_wide: evaluate the termination condition once over the whole batch, so every sample
            stops together (see [`TerminationCondition`][deqlab.solvers.TerminationCondition]); a sample's
            protective breaks (runaway flow, repeated NaN) then stop the whole batch too. ``None``
            (default) means ``False``: per sample.
        per_sample_steps: adaptive methods: ``True`` (default) gives every sample its own step size, error
            test and, for VCAB3, its own step history, so a sample's result does not depend on the rest of
            the batch. ``False`` uses one step size for the whole batch, accepted or rejected together,
            with the error ratio the RMS over every active sample's entries: the reference package's
            integrator, which sees the batch as one vector. The per-sample stop is the same either way.
        compile: Tsit5/Dopri5: run each stepper call (the seven stages, ``f`` included, the error control,
            the guards and the termination bookkeeping) as one graph compiled by
            ``torch.compile(fullgraph=True)``, as [`DiscreteDEQSolver`][deqlab.solvers.DiscreteDEQSolver]'s
            ``compile``: ``False`` (default) eager; ``True`` inductor; a string or callable another backend.
            Results, NFE and statuses equal the eager ones. Other methods (VCAB3's start-up is decided on
            the host; Euler/RK4 are torchdyn's steppers), a map that cannot be traced, a recording of
            `deqlab.instrument`, or a machine without a C++ compiler run eager (the first two warn
            `CompileFallbackWarning` once per solver). With ``check_every = k > 1`` the ``k`` stepper calls
            between two host checks are one graph.
        cuda_graphs: with ``compile`` and ``check_every = k > 1`` on CUDA, capture the block of ``k``
            stepper calls as one CUDA graph per solve and replay it (as
            [`DiscreteDEQSolver`][deqlab.solvers.DiscreteDEQSolver]'s ``cuda_graphs``; VCAB3's start-up runs
            before it, uncaptured). Default ``False``. Ignored on the CPU and without ``compile``.
        abstol: deprecated old name of ``ode_abstol`` (warns ``DeprecationWarning``); default ``None``.
        reltol: deprecated old name of ``ode_reltol`` (warns); default ``None``.

    Raises:
        ValueError: ``ode_solver`` is unknown; an ODE tolerance is given under both its names, is not a
            finite number >= 0, or both are 0; ``max_steps`` is not an int >= 0; ``t_max`` is not > 0;
            ``dt`` is not a finite number > 0; a controller option, ``divergence_patience``,
            ``max_nonfinite_retries`` or ``check_every`` is out of range; ``per_sample_steps`` is not a
            bool; or ``termination`` is given together with the flat keywords (or the flat ones are
            invalid).
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

        VCAB3 spends one evaluation per step once started (its first two steps cost 3 each), and reaches a
        tight termination tolerance from a loose ODE tolerance (its step stays inside AB3's stability
        interval, so the residual keeps falling):

        >>> vcab3 = ContinuousDEQSolver("vcab3", mode="abs_norm", ode_abstol=1e-3, ode_reltol=1e-3,
        ...                             abstol_termination=1e-8, max_steps=400)
        >>> res = vcab3(lambda z: 0.5 * z + 1, torch.zeros(2, 3, dtype=torch.float64))
        >>> res.status, res.z.round(decimals=6)[0]
        (<SolverStatus.CONVERGED: 'converged'>, tensor([2., 2., 2.], dtype=torch.float64))
        >>> start = 1 + 1 + 2 * 3   # f(z0), the initial step size, two Bogacki–Shampine steps
        >>> res.nfe == start + (int(res.accepted_steps.max()) - 2) * 1, res.nfe
        (True, 79)

    Why two names: "reltol" used to mean the ODE tolerance here and the termination tolerance everywhere
    else; ``ode_*`` and ``*_termination`` now say which one is meant. The old names (``abstol=``,
    ``solver.abstol``, ...) still read the ODE tolerances but warn ``DeprecationWarning``."""

    @checked_keywords
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
        per_sample_steps: bool = True,
        abstol: Optional[float] = None,
        reltol: Optional[float] = None,
        reference_counting: ReferenceCounting = "deqjl",
        compile: CompileOption = False,
        cuda_graphs: bool = False,
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
            termination,
            mode=mode,
            abstol_termination=abstol_termination,
            reltol_termination=reltol_termination,
            norm=norm,
            batch_wide=batch_wide,
            owner="ContinuousDEQSolver",
            default_abstol=self.ode_abstol,
            default_reltol=self.ode_reltol,
        )
        self.max_steps = check_max_steps(max_steps)
        if not isinstance(t_max, (int, float)) or isinstance(t_max, bool) or not (t_max > 0):
            raise ValueError(f"t_max must be > 0 (math.inf for no horizon), got {t_max!r}")
        self.t_max = float(t_max)
        _, adaptive, self.order, self.stage_evals = _METHODS[ode_solver]
        self.adaptive = adaptive
        if dt is not None and not (
            isinstance(dt, (int, float)) and not isinstance(dt, bool) and dt > 0 and math.isfinite(dt)
        ):
            raise ValueError(f"dt must be a finite number > 0, got {dt!r}")
        self.dt = dt if dt is not None or adaptive else 1.0
        # The step-size controller (Runge–Kutta): h_new = h * clip(safety * ratio^(-1/order), min_factor,
        # max_factor); VCAB3: the PI controller of `adams.pi_factor` with the same three options.
        self.safety = _check_number(owner, "safety", safety, low=0.0, high=1.0, low_open=True)
        self.min_factor = _check_number(owner, "min_factor", min_factor, low=0.0, high=1.0, low_open=True)
        self.max_factor = _check_number(owner, "max_factor", max_factor, low=1.0)
        self.divergence_patience = _check_int(owner, "divergence_patience", divergence_patience, low=1)
        self.max_nonfinite_retries = _check_int(owner, "max_nonfinite_retries", max_nonfinite_retries, low=1)
        self.check_every = _check_int(owner, "check_every", check_every, low=1)
        if not isinstance(per_sample_steps, bool):
            raise ValueError(f"{owner}: per_sample_steps must be True or False, got {per_sample_steps!r}")
        self.per_sample_steps = per_sample_steps
        self.throw = bool(throw)
        self.keep_trace = bool(keep_trace)
        self.reference_counting = check_reference_counting(owner, reference_counting)
        self.compile = check_compile_option(owner, compile)
        self._compile_failed = False  # set after the one fallback warning: this solver then stays eager
        self.cuda_graphs = bool(cuda_graphs)
        self._graphs_failed = False  # set after a capture failed (warned once): this solver then stops trying

    @property
    def abstol(self) -> float:
        """Deprecated old name of `ode_abstol` (the ODE step tolerance, not the termination one)."""
        return deprecated("ContinuousDEQSolver", ".abstol", ".ode_abstol", self.ode_abstol)

    @property
    def reltol(self) -> float:
        """Deprecated old name of `ode_reltol` (the ODE step tolerance, not the termination one)."""
        return deprecated("ContinuousDEQSolver", ".reltol", ".ode_reltol", self.ode_reltol)

    def __repr__(self) -> str:
        return (
            f"ContinuousDEQSolver({self.ode_solver!r}, mode={self.termination.mode!r}, "
            f"ode_abstol={self.ode_abstol}, ode_reltol={self.ode_reltol}, "
            f"abstol_termination={self.termination.abstol}, reltol_termination={self.termination.reltol}, "
            f"norm={self.termination.norm!r}, max_steps={self.max_steps}, t_max={self.t_max}"
            + (", batch_wide=True" if self.termination.batch_wide else "")
            + (f", compile={self.compile!r}" if self.compile is not False else "")
            + (", cuda_graphs=True" if self.cuda_graphs else "")
            + ")"
        )

    @torch.no_grad()
    def __call__(self, f: Callable[[State], State], z0: State) -> SolverResult:
        """Integrate ``du/dt = f(u) - u`` from ``u(0) = z0`` until every sample stops.

        Args:
            f: maps a state to a state of the same structure, shapes and dtype (checked on the first call).
            z0: the batch-first initial state: a floating-point tensor ``(B, ...)`` or a list of them.

        Returns:
            The [`SolverResult`][deqlab.solvers.SolverResult], with ``t`` the time each sample reached and
            ``accepted_steps`` the steps that moved each sample.

        Raises:
            TypeError: ``z0`` or ``f(z0)`` is not a state of floating-point tensors shaped like ``z0``.
            ValueError: ``z0`` contains NaN/Inf, or ``f`` returns other shapes or another dtype.
            SolverError: with ``throw=True``, when some sample did not converge.
        """
        with instrument.region("solver"):
            return self._solve(f, z0)

    def _solve(self, f: Callable[[State], State], z0: State) -> SolverResult:
        with instrument.region("solver.setup"):
            packer, u = prepare(z0)
            if packer.batch == 0:
                return empty_result(packer, u, continuous=True, reference_counting=self.reference_counting)
            F = CountedMap(f, packer)
            stepper = None
            if not self.adaptive:
                stepper = _stepper(self.ode_solver, u.dtype)
                u, _ = stepper.sync_device_dtype(u, torch.zeros(1, dtype=u.dtype, device=u.device))
            B = u.shape[0]
            tracker = TerminationTracker(
                self.termination, B, packer.numel, device=u.device, dtype=u.dtype, keep_trace=self.keep_trace
            )

        def vf(x: Tensor) -> Tensor:  # the autonomous vector field
            return F(x) - x

        du = vf(u)
        done = instrument.wrap("termination", tracker.update)(u, du)
        check_first_step(tracker, u)
        estimated_dt = self.adaptive and self.dt is None and not done
        if done:
            dt = u.new_ones(B)
        else:
            with instrument.region("stepper.init"):
                dt = self._initial_dt(vf, u, du, tracker.active)
        run = _Run(u, du, dt, tracker, done)
        if self.ode_solver == "vcab3":
            self._loop_vcab3(run, vf, F)
        elif not self._loop_compiled(run, F):
            self._loop_rk(run, vf, stepper)
        with instrument.region("solver.result"):
            return build_result(
                tracker,
                packer,
                run.u,
                run.du,
                nfe=F.nfe,
                steps=run.steps,
                throw=self.throw,
                solver_name=f"ContinuousDEQSolver({self.ode_solver})",
                t=run.t,
                last_step=run.horizon_step,
                accepted_steps=run.accepted,
                reference_nfe=reference_nfe(
                    self.reference_counting,
                    calls=self._reference_calls(F.nfe, run.steps, estimated_dt),
                    uncounted=1 if self.ode_solver == "vcab3" else 0,
                ),
                reference_counting=self.reference_counting,
            )

    def _reference_calls(self, nfe: int, steps: int, estimated_dt: bool) -> int:
        """The evaluations OrdinaryDiffEq would make for a solve of ``steps`` stepper calls: its
        initial-step heuristic evaluates ``f`` twice where deqlab's evaluates once (reusing ``f(u0)``), it
        runs even when ``u0`` already meets the condition, and the steady-state callback is never tested at
        ``t = 0``, so at least one step is taken (VCAB3's first is a Bogacki–Shampine step, 3 evaluations)."""
        calls = nfe
        if self.adaptive and self.dt is None:
            calls += 1 if estimated_dt else 2
        if steps == 0:
            calls += 3 if self.ode_solver == "vcab3" else max(self.stage_evals, 1)
        return calls

    # ------------------------------------------------------------------ the two loops

    def _loop_rk(self, run: "_Run", vf: Callable[[Tensor], Tensor], stepper) -> None:
        """Runge–Kutta steps until every sample has stopped: Tsit5/Dopri5 by `_fsal_step`, whose last stage
        is the residual at the very point returned; Euler/RK4 by torchdyn's steppers."""
        t0 = torch.zeros(1, dtype=run.u.dtype, device=run.u.device)
        tableau = _tableau(self.ode_solver) if self.adaptive else None
        rec = instrument.current()  # None when nothing records: two `is not None` tests per step, nothing else
        while not run.done and run.steps < self.max_steps:
            token = rec.begin("stepper.step") if rec is not None else 0
            u, du = run.u, run.du
            h = self._clamp_to_horizon(run)
            if self.adaptive:
                u_new, du_new, err = _fsal_step(vf, u, du, h, tableau)
                live = run.tracker.active & (h > 0)
                ratio_ps = self._error_ratio(err, u, u_new)
                ratio = self._pool(ratio_ps, live)
                accept = ratio <= 1.0
                run.dt = h * self._i_factor(ratio, accept)
                run.moving = accept
                accept, u_new, du_new, grew = self._guard(run, h, accept, ratio_ps, u_new, du_new, live)
                run.dt = torch.where(grew, torch.minimum(run.dt, 0.5 * h), run.dt)
            else:
                u_new = stepper.step(lambda t, x, args=None: vf(x), u, t0, h.unsqueeze(1), k1=du)[1]
                du_new = vf(u_new)
                accept = torch.ones_like(run.tracker.active)
            self._advance(run, h, accept, u_new, du_new)
            if rec is not None:
                rec.end(token)

    def _compiled_step(self, calls: int = 1) -> Optional[Callable[..., Tuple[dict, dict, Tensor]]]:
        """The compiled stepper call of this solver's method (``calls > 1``: that many calls unrolled into one
        graph, returning their ``(calls, B)`` objectives), or ``None`` to run eager (see ``compile``)."""
        if self.compile is False or self._compile_failed or instrument.current() is not None:
            return None
        if not compile_available() or self.ode_solver not in ("tsit5", "dopri5", "vcab3"):
            self._compile_failed = True
            missing = f"{self.ode_solver} has no compiled step (tsit5, dopri5 and vcab3 have one)"
            unsupported("ContinuousDEQSolver", missing, stacklevel=5)
            return None
        fused = self._device_call()
        key = ("ContinuousDEQSolver", _solver_key(self))
        if calls == 1:
            return cached_compile(key, fused, self.compile)

        def block(F, fields, tstate):
            objs = []
            for _ in range(calls):  # unrolled when traced: one graph for the block
                fields, tstate, obj = fused(F, fields, tstate)
                objs.append(obj)
            return fields, tstate, torch.stack(objs)

        return cached_compile((key, "block", calls), block, self.compile)

    def _device_call(self) -> Callable[..., Tuple[dict, dict, Tensor]]:
        """One stepper call of this solver's method as a pure function ``(F, fields, tstate) -> (fields,
        tstate, objective)``, uncompiled (what `_compiled_step` compiles)."""
        solver, cond = self, self.termination
        if self.ode_solver == "vcab3":

            def fused(F, fields, tstate):
                return _vcab3_device_step(solver, cond, F, fields, tstate)

        else:
            tableau = _tableau(self.ode_solver)

            def fused(F, fields, tstate):
                return _rk_device_step(solver, cond, tableau, F, fields, tstate)

        return fused

    def _block_runner(self, F: CountedMap, device: torch.device, record) -> Optional[Callable[..., tuple]]:
        """``(fields, tstate) -> (fields, tstate, objectives)`` for ``check_every`` stepper calls at once (one
        graph; a CUDA graph with ``cuda_graphs`` on a GPU), or ``None`` for single calls: ``check_every ==
        1`` or recorded iterates (the host keeps iterates between checks)."""
        k = self.check_every
        if k == 1 or record is not None:
            return None
        block = self._compiled_step(k)
        if block is None:  # pragma: no cover - the single call compiled, so the block can be built
            return None
        flat = F.flat
        if not (self.cuda_graphs and device.type == "cuda" and not self._graphs_failed):
            return lambda fields, tstate: block(flat, fields, tstate)
        from deqlab.solvers.cuda_graphs import CapturedBlock

        def as_state(fields, tstate):
            fields, tstate, objs = block(flat, fields, tstate)
            return (fields, tstate), objs

        captured = CapturedBlock(as_state, owner="ContinuousDEQSolver")

        def replay(fields, tstate):
            (fields, tstate), objs = captured(fields, tstate)
            return fields, tstate, objs

        replay.captured = captured  # type: ignore[attr-defined]
        return replay

    def _loop_compiled(self, run: "_Run", F: CountedMap, extra: Optional[dict] = None) -> bool:
        """The rest of the solve with each stepper call one compiled graph; ``False`` (nothing done) when it
        cannot be compiled (warned once), so the caller goes on eager from the same state.

        The host loop is the eager one's: it counts evaluations (Tsit5/Dopri5: 6 per call; VCAB3 after its
        start-up: 1, also in a call whose every step was rejected, as the eager loop with ``check_every > 1``),
        keeps the trace and the iterates that `record_iterates` asks for, and every ``check_every`` calls
        asks the device whether every sample has stopped or reached ``t_max``. With ``check_every = k > 1``
        the ``k`` calls between two checks are one graph (`_block_runner`). ``extra``: VCAB3's history.
        """
        if run.done or run.steps >= self.max_steps:
            return False
        step = self._compiled_step()
        if step is None:
            return False
        tracker, device = run.tracker, run.u.device
        fields = dict(
            u=run.u, du=run.du, dt=run.dt, t=run.t, du_norm=run.du_norm, growths=run.growths,
            nonfinite_tries=run.nonfinite_tries, accepted=run.accepted,
            steps=torch.tensor(run.steps, dtype=torch.long, device=device),
            horizon=run.horizon_step if run.horizon_step is not None else torch.full((), -1, dtype=torch.long, device=device),
            # a copy: the last update's objective may be the tracker's own residual tensor, and an aliasing
            # that holds at the first call only would make dynamo recompile the step after it
            trace_last=(tracker.trace[-1] if tracker.keep_trace and tracker.trace else run.du_norm).clone(),
            **(extra or {}),
        )  # fmt: skip
        tstate = export_device_state(tracker)
        # likewise the previous iterate: after an eager update it is the state itself, after a compiled call
        # (the masked merge) never
        tstate["prev"] = tuple(t.clone() for t in tstate["prev"])
        first_step, batch = tracker.step, run.u.shape[0]
        evals = 1 if self.ode_solver == "vcab3" else self.stage_evals
        record = tracker.record_steps
        block = self._block_runner(F, device, record)
        horizon = math.isfinite(self.t_max)
        k = self.check_every
        calls, done, uncompiled = 0, False, False
        while not done and run.steps + calls < self.max_steps:
            at = run.steps + calls
            # a block of k calls between two checks when aligned to them and the budget has room for it
            n = k if block is not None and at % k == 0 and self.max_steps - at >= k else 1
            try:
                if block is not None and n > 1:
                    fields, tstate, obj = block(fields, tstate)
                else:
                    fields, tstate, obj = step(F.flat, fields, tstate)
            except Exception as error:  # compilation failed: tracing f, or the backend (no C++ compiler)
                if uncompiled:  # the uncompiled call raised: an error of f or of the step itself
                    raise
                self._compile_failed = uncompiled = True
                fallback_warning("ContinuousDEQSolver", error)
                if calls == 0:
                    return False  # the eager loop goes on from the same state
                # a later graph failed to compile (the call did not run): finish with the uncompiled call
                step, block = self._device_call(), None
                continue
            F.nfe += n * evals
            F.rows += n * evals * batch
            if tracker.keep_trace:
                tracker.trace.extend(obj.unbind(0)) if n > 1 else tracker.trace.append(obj)
            calls += n
            if record is not None and first_step + calls - 1 in record:  # n == 1 whenever iterates are recorded
                tracker._recorded[first_step + calls - 1] = fields["u"].clone()
            if (run.steps + calls) % k == 0:
                load_device_state(tracker, tstate, first_step + calls)
                done = tracker.all_stopped() or (horizon and bool(fields["horizon"] >= 0))
        if getattr(getattr(block, "captured", None), "failed", False):
            self._graphs_failed = True  # warned once; later solves run their blocks uncaptured
        load_device_state(tracker, tstate, first_step + calls)
        run.u, run.du, run.dt, run.t = fields["u"], fields["du"], fields["dt"], fields["t"]
        run.accepted, run.steps, run.done = fields["accepted"], run.steps + calls, done
        if horizon and self.check_every > 1:
            run.horizon_step = fields["horizon"]
        return True

    def _loop_vcab3(self, run: "_Run", vf: Callable[[Tensor], Tensor], F: Optional[CountedMap] = None) -> None:
        """VCAB3 steps (`deqlab.solvers.adams`) until every sample has stopped.

        One stepper call per iteration for every active sample. While some sample is in its start-up, the
        call evaluates ``f`` three times for the whole batch (the Bogacki–Shampine stages; a sample already
        past its start-up has its new point evaluated in the third); afterwards once, and not at all when
        every step was rejected (known before ``f`` is called).
        """
        u = run.u
        wd = adams.work_dtype(u.dtype)
        hist = adams.AdamsHistory.empty(u)
        qold = u.new_full((u.shape[0],), adams.PI_QOLD_INIT, dtype=wd)
        lam = u.new_zeros(u.shape[0], dtype=wd)  # |λ| of the flow's Jacobian along the path; 0 = unknown
        started = False  # on the host: every active sample is past its start-up (then it stays so)
        rec = instrument.current()  # None when nothing records: two `is not None` tests per step, nothing else
        while not run.done and run.steps < self.max_steps:
            if started and F is not None and self.compile is not False:
                # past the start-up (decided on the host): the rest of the solve may run compiled
                extra = dict(phi1=hist.phi1, phi2=hist.phi2, h1=hist.h1, h2=hist.h2, n=hist.n, qold=qold, lam=lam)
                if self._loop_compiled(run, F, extra):
                    return
                F = None  # not compilable (warned): eager from here, without asking again
            token = rec.begin("stepper.step") if rec is not None else 0
            u, du = run.u, run.du
            h = self._clamp_to_horizon(run)
            live = run.tracker.active & (h > 0)
            u_ab, err_ab, phi2_star = hist.propose(u, du, h)
            ratio_ps = self._error_ratio(err_ab, u, u_ab)
            startup = hist.startup
            if not started:
                started = not bool((startup & live).any())
            if not started:
                # Start-up call: the Bogacki–Shampine stages for the samples starting up, evaluated for the
                # whole batch; a sample past its start-up has its (already accepted) new point evaluated in
                # the last stage, the others sit at their current point.
                pre = live & ~startup & (ratio_ps <= 1.0)
                s2 = startup.unsqueeze(1)
                k2 = vf(torch.where(s2, adams.bs3_points(u, du, h, 2), u))
                k3 = vf(torch.where(s2, adams.bs3_points(u, du, h, 3, (k2,)), u))
                u_new = torch.where(s2, adams.bs3_points(u, du, h, 4, (k2, k3)), torch.where(pre.unsqueeze(1), u_ab, u))
                du_new = vf(u_new)
                err_bs = adams.bs3_error(du, k2, k3, du_new, h)
                ratio_ps = torch.where(startup, self._error_ratio(err_bs, u, u_new), ratio_ps)
                ratio = self._pool(ratio_ps, live)
                accept = (ratio <= 1.0) & live
            else:
                ratio = self._pool(ratio_ps, live)
                accept = (ratio <= 1.0) & live
                if self.check_every > 1 or bool(accept.any()):
                    u_new = torch.where(accept.unsqueeze(1), u_ab, u)
                    du_new = vf(u_new)
                else:  # every step rejected before f was needed: no evaluation
                    u_new, du_new = u, du
            accept, u_new, du_new, qold, lam = self._vcab3_settle(
                run, hist, h, live, u, du, u_new, du_new, phi2_star, ratio_ps, ratio, accept, qold, lam
            )
            self._advance(run, h, accept, u_new, du_new)
            if rec is not None:
                rec.end(token)

    # ------------------------------------------------------------------ shared pieces

    def _vcab3_settle(
        self, run: Any, hist: "adams.AdamsHistory", h: Tensor, live: Tensor, u: Tensor, du: Tensor, u_new: Tensor,
        du_new: Tensor, phi2_star: Tensor, ratio_ps: Tensor, ratio: Tensor, accept: Tensor, qold: Tensor, lam: Tensor,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        """The end of a VCAB3 call once ``f`` was evaluated at the new point (shared by the eager loop and the
        compiled call): the non-finite verdict, the PI controller, the guards, the stability cap and the
        history. Returns ``(accept, u_new, du_new, qold, lam)``; ``run.dt`` and ``run.moving`` are set."""
        wd = qold.dtype
        # An accepted point where f is not finite: the step is rejected after the fact (in a shared step,
        # for the whole batch), and counts towards the sample's non-finite retries.
        bad = accept & ~torch.isfinite(du_new).all(dim=1)
        ratio_ps = torch.where(bad, torch.full_like(ratio_ps, math.inf), ratio_ps)
        if not self.per_sample_steps:
            bad = accept & bad.any()
        ratio = torch.where(bad, torch.full_like(ratio, math.inf), ratio)
        accept = accept & ~bad
        factor = adams.pi_factor(
            ratio.to(wd), qold, accept, safety=self.safety, min_factor=self.min_factor, max_factor=self.max_factor
        )
        qold = torch.where(accept, ratio.to(wd).clamp_min(adams.PI_QOLD_INIT), qold)
        run.dt = (h.to(wd) * factor).to(h.dtype)
        moved = run.moving = accept
        # The non-finite guard. Unlike the Runge–Kutta loop, a growing residual neither halves the step
        # nor counts towards `divergence_patience`: with AB3's small steps that rule squeezed the steps
        # of a stable flow whose residual grows for a while (a non-normal or non-contractive f) into a
        # geometric series that never got past the growth, and called the sample diverged (measured in
        # the guide). Without the halving, a runaway flow keeps its pace and meets the tracker's
        # protective break (objective >= 1e3 N objective_0) or its resolution guard.
        accept, u_new, du_new, _ = self._guard(run, h, accept, ratio_ps, u_new, du_new, live, count_growth=False)
        # Stability instead: keep h |λ| inside AB3's interval, |λ| estimated from the last accepted step
        # as ||Δ(f(u) - u)|| / ||Δu|| (a Rayleigh quotient of the flow's Jacobian; it sees a fast mode as
        # soon as it grows, long before the residual does), remembered with a decay so the step does not
        # jump straight back out of the interval when that mode has been damped.
        lam = self._track_lambda(lam, moved, u, u_new, du, du_new, live)
        hist.commit(moved, du, phi2_star, h)
        nxt_ab = (hist.n >= 2) & (lam > 0)
        cap = (adams.AB3_STABLE / lam.clamp_min(1e-30)).to(run.dt.dtype)
        run.dt = torch.where(nxt_ab, torch.minimum(run.dt, cap), run.dt)
        return accept, u_new, du_new, qold, lam

    def _advance(self, run: "_Run", h: Tensor, accept: Tensor, u_new: Tensor, du_new: Tensor) -> None:
        """Move the accepted samples, feed the tracker, and stop at the horizon."""
        # A sample already at t_max takes zero-length steps while others finish; those must not
        # reach the tracker (repeated identical objectives would fire the patience rule).
        tracker = run.tracker
        accept = accept & tracker.active & (h > 0)
        a2 = accept.unsqueeze(1)
        run.u = torch.where(a2, u_new, run.u)
        run.du = torch.where(a2, du_new, run.du)
        run.t = torch.where(accept, run.t + h, run.t)
        # (a sample that gave up on non-finite values is "accepted" with a NaN residual but does not move)
        run.accepted = run.accepted + (accept if run.moving is None else accept & run.moving).long()
        run.steps += 1
        sync = run.steps % self.check_every == 0
        run.done = run.update(run.u, run.du, mask=accept, diverged=run.diverging, sync=sync)
        if math.isfinite(self.t_max) and not run.done:
            at_horizon = ((run.t >= self.t_max * (1 - 1e-12)) | ~tracker.active).all()
            if sync and run.horizon_step is None:
                if bool(at_horizon):
                    run.done = True
            else:
                # Between host checks, remember on the device the step at which every running sample
                # reached the horizon (where a check_every=1 loop would have stopped).
                if run.horizon_step is None:
                    run.horizon_step = torch.full((), -1, dtype=torch.long, device=run.u.device)
                run.horizon_step = torch.where(
                    (run.horizon_step < 0) & at_horizon, torch.full_like(run.horizon_step, run.steps), run.horizon_step
                )
                if sync and bool(run.horizon_step >= 0):
                    run.done = True

    def _clamp_to_horizon(self, run: "_Run") -> Tensor:
        """The step each sample attempts: its step size, cut so that no sample passes ``t_max``."""
        return torch.minimum(run.dt, self.t_max - run.t) if math.isfinite(self.t_max) else run.dt

    def _guard(
        self,
        run: "_Run",
        h: Tensor,
        accept: Tensor,
        ratio_ps: Tensor,
        u_new: Tensor,
        du_new: Tensor,
        live: Tensor,
        count_growth: bool = True,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The residual-growth, runaway and non-finite guards of the adaptive methods.

        Returns ``(accept, u_new, du_new, grew)``: samples that gave up on non-finite values are accepted
        with a NaN residual (the tracker then stops them as ``nonfinite`` with their last finite state);
        ``grew`` marks the samples whose next step must be at most half this one (the Runge–Kutta rule;
        with ``count_growth=False`` growth is not counted towards ``divergence_patience``).
        """
        # Near the steady state a loose error tolerance lets the step outgrow the method's
        # stability region, and the iterates oscillate with a residual that creeps up while the
        # error estimate stays small. Along the true flow of a contractive f the residual
        # decreases, so a growing residual halves the next step.
        new_norm = torch.linalg.vector_norm(du_new, dim=1)
        du_norm = run.du_norm
        if self.per_sample_steps:
            grew = accept & (new_norm > du_norm)
        else:  # the norm of the batch as one vector (of the active samples)
            zero = torch.zeros_like(new_norm)
            grew = accept & (
                torch.linalg.vector_norm(torch.where(live, new_norm, zero))
                > torch.linalg.vector_norm(torch.where(live, du_norm, zero))
            )
        # A residual that keeps growing although every growth halved the step is the flow
        # itself running away: the sample diverges (the reference's protective break would
        # never fire, since the halved steps make the growth ever slower). Only a decrease larger
        # than the dtype's rounding ends the streak: in float32/bfloat16 the halved steps soon make
        # the growth per step unresolvable (the norm repeats or jitters by an ulp), and those
        # steps must neither count as growth nor reset the count, or a runaway flow ends max_steps.
        # A residual at the rounding level of f(z) - z (a stable flow stuck at the dtype's noise
        # floor, common in bfloat16) jitters up and down: its growth is no evidence of a runaway.
        if count_growth:
            eps = torch.finfo(u_new.dtype).eps
            grew_ps = accept & (new_norm > du_norm)
            shrank = accept & (new_norm < du_norm * (1.0 - 2.0 * eps))
            scale = torch.linalg.vector_norm(u_new, dim=1) + torch.linalg.vector_norm(u_new + du_new, dim=1)
            counted = grew_ps & (new_norm > 8.0 * eps * scale)
            run.growths = torch.where(
                counted, run.growths + 1, torch.where(shrank, torch.zeros_like(run.growths), run.growths)
            )
            run.diverging = run.growths >= self.divergence_patience
        run.du_norm = torch.where(accept, new_norm, du_norm)
        # A NaN/Inf stage makes the error estimate infinite and the step is rejected; when steps
        # keep failing that way, the flow runs into a region where f has no finite value: end
        # the sample as non-finite (the tracker then returns its last finite iterate) instead of
        # creeping towards that region until max_steps.
        nonfinite = ~torch.isfinite(new_norm) | torch.isinf(ratio_ps)
        run.nonfinite_tries = run.nonfinite_tries + (nonfinite & ~accept & live).long()
        give_up = run.nonfinite_tries >= self.max_nonfinite_retries
        accept = accept | give_up
        du_new = torch.where(give_up.unsqueeze(1), torch.full_like(du_new, math.nan), du_new)
        u_new = torch.where(give_up.unsqueeze(1), run.u, u_new)
        return accept, u_new, du_new, grew

    def _track_lambda(
        self, lam: Tensor, moved: Tensor, u: Tensor, u_new: Tensor, du: Tensor, du_new: Tensor, live: Tensor
    ) -> Tensor:
        """VCAB3's running estimate of the fastest rate ``|λ|`` of the flow, per sample (the batch's largest
        with one shared step): ``max(||Δdu|| / ||Δu||, decay * previous)`` over the samples that moved."""
        wd = lam.dtype
        step = torch.linalg.vector_norm((u_new.to(wd) - u.to(wd)), dim=1)
        change = torch.linalg.vector_norm((du_new.to(wd) - du.to(wd)), dim=1)
        est = torch.where(step > 0, change / step.clamp_min(1e-30), torch.zeros_like(step))
        est = torch.where(torch.isfinite(est), est, torch.zeros_like(est))
        if not self.per_sample_steps:  # one step for the batch: the fastest sample sets the limit
            est = torch.where(moved & live, est, torch.zeros_like(est)).amax().expand_as(est)
        return torch.where(moved, torch.maximum(est, _LAMBDA_DECAY * lam), lam)

    def _pool(self, ratio_ps: Tensor, live: Tensor) -> Tensor:
        """The error ratio that decides: each sample's own, or (``per_sample_steps=False``) the RMS over the
        entries of every live sample (the mean of their mean squares; exactly the sample's own at B = 1)."""
        if self.per_sample_steps:
            return ratio_ps
        ms = torch.where(live, ratio_ps.pow(2), torch.zeros_like(ratio_ps))
        pooled = (ms.sum() / live.sum().clamp_min(1).to(ms.dtype)).sqrt()
        pooled = torch.where(torch.isfinite(pooled), pooled, torch.full_like(pooled, math.inf))
        return pooled.expand_as(ratio_ps)

    def _scale(self, a: Tensor, b: Optional[Tensor] = None) -> Tensor:
        mag = a.abs() if b is None else torch.maximum(a.abs(), b.abs())
        return self.ode_abstol + self.ode_reltol * mag

    def _error_ratio(self, err: Tensor, u: Tensor, u_new: Tensor) -> Tensor:
        r = err / self._scale(u, u_new)
        ratio = r.pow(2).mean(dim=1).sqrt()
        return torch.where(torch.isfinite(ratio), ratio, torch.full_like(ratio, math.inf))

    def _i_factor(self, ratio: Tensor, accept: Tensor) -> Tensor:
        """The Runge–Kutta step-size factor ``safety * ratio^(-1/order)``, at least 1 on acceptance (a step
        is never shrunk after succeeding), at least ``min_factor`` on rejection, at most ``max_factor``."""
        factor = self.safety * ratio.clamp_min(1e-10).pow(-1.0 / self.order)
        lo = torch.where(accept, torch.ones_like(ratio), torch.full_like(ratio, self.min_factor))
        factor = torch.minimum(torch.maximum(factor, lo), torch.full_like(ratio, self.max_factor))
        return torch.where(ratio == 0, torch.full_like(ratio, self.max_factor), factor)

    def _initial_dt(self, vf: Callable[[Tensor], Tensor], u: Tensor, du: Tensor, active: Tensor) -> Tensor:
        """Per-sample Hairer–Wanner starting step (one extra evaluation) for adaptive methods
        (``per_sample_steps=False``: one for the batch, from the RMS norms of the active samples)."""
        B = u.shape[0]
        if self.dt is not None:
            return u.new_full((B,), self.dt)
        scale = self._scale(u)

        def rms(v: Tensor) -> Tensor:
            ms = v.pow(2).mean(dim=1)
            if not self.per_sample_steps:
                ms = (
                    torch.where(active, ms, torch.zeros_like(ms)).sum() / active.sum().clamp_min(1).to(ms.dtype)
                ).expand_as(ms)
            return ms.sqrt()

        d0, d1 = rms(u / scale), rms(du / scale)
        h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-30))
        du1 = vf(u + h0.unsqueeze(1) * du)
        d2 = rms((du1 - du) / scale) / h0
        dmax = torch.maximum(d1, d2)
        h1 = torch.where(
            dmax <= 1e-15,
            torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3),
            (0.01 / dmax.clamp_min(1e-30)).pow(1.0 / (self.order + 1)),
        )
        h = torch.minimum(100 * h0, h1)
        return torch.where(torch.isfinite(h) & (h > 0), h, torch.full_like(h, 1e-3))


def _solver_key(solver: "ContinuousDEQSolver") -> tuple:
    """Everything the compiled step reads from the solver (its graphs are shared by equal solvers)."""
    return (
        solver.ode_solver, solver.termination, solver.ode_abstol, solver.ode_reltol, solver.t_max, solver.order,
        solver.safety, solver.min_factor, solver.max_factor, solver.divergence_patience,
        solver.max_nonfinite_retries, solver.per_sample_steps,
    )  # fmt: skip


class _StepFields:
    """The per-sample state of a solve as plain attributes, so the compiled step reuses the eager loop's
    guards (`ContinuousDEQSolver._guard` reads and writes these names on its ``run``)."""

    def __init__(self, fields: dict) -> None:
        self.u, self.du, self.dt, self.t = fields["u"], fields["du"], fields["dt"], fields["t"]
        self.du_norm, self.growths = fields["du_norm"], fields["growths"]
        self.nonfinite_tries, self.accepted = fields["nonfinite_tries"], fields["accepted"]
        self.diverging: Optional[Tensor] = None
        self.moving: Optional[Tensor] = None


def _rk_device_step(
    solver: "ContinuousDEQSolver", cond: TerminationCondition, tableau, F: Callable[[Tensor], Tensor], fields: dict,
    tstate: dict,
) -> Tuple[dict, dict, Tensor]:  # fmt: skip
    """One Runge–Kutta stepper call of `ContinuousDEQSolver._loop_rk` and its `_advance`, as a pure function
    of tensors (the twin the compiled loop runs): ``(fields, tracker state, objective for the trace)``."""
    run = _StepFields(fields)

    def vf(x: Tensor) -> Tensor:
        return F(x) - x

    u, du = run.u, run.du
    h = solver._clamp_to_horizon(run)  # type: ignore[arg-type]
    u_new, du_new, err = _fsal_step(vf, u, du, h, tableau)
    live = tstate["active"] & (h > 0)
    ratio_ps = solver._error_ratio(err, u, u_new)
    ratio = solver._pool(ratio_ps, live)
    accept = ratio <= 1.0
    run.dt = h * solver._i_factor(ratio, accept)
    run.moving = accept
    accept, u_new, du_new, grew = solver._guard(run, h, accept, ratio_ps, u_new, du_new, live)  # type: ignore[arg-type]
    run.dt = torch.where(grew, torch.minimum(run.dt, 0.5 * h), run.dt)
    return _device_advance(solver, cond, run, fields, tstate, h, accept, u_new, du_new, {})


def _vcab3_device_step(
    solver: "ContinuousDEQSolver", cond: TerminationCondition, F: Callable[[Tensor], Tensor], fields: dict,
    tstate: dict,
) -> Tuple[dict, dict, Tensor]:  # fmt: skip
    """One VCAB3 stepper call after the start-up (`ContinuousDEQSolver._loop_vcab3`'s second branch, ``f``
    evaluated at the new point whatever the verdict, as with ``check_every > 1``) and its `_advance`, as a
    pure function of tensors."""
    run = _StepFields(fields)
    hist = adams.AdamsHistory(fields["phi1"], fields["phi2"], fields["h1"], fields["h2"], fields["n"])
    qold, lam = fields["qold"], fields["lam"]
    u, du = run.u, run.du
    h = solver._clamp_to_horizon(run)  # type: ignore[arg-type]
    live = tstate["active"] & (h > 0)
    u_ab, err_ab, phi2_star = hist.propose(u, du, h)
    ratio_ps = solver._error_ratio(err_ab, u, u_ab)
    ratio = solver._pool(ratio_ps, live)
    accept = (ratio <= 1.0) & live
    u_new = torch.where(accept.unsqueeze(1), u_ab, u)
    du_new = F(u_new) - u_new
    settle = solver._vcab3_settle
    accept, u_new, du_new, qold, lam = settle(
        run, hist, h, live, u, du, u_new, du_new, phi2_star, ratio_ps, ratio, accept, qold, lam
    )
    extra = dict(phi1=hist.phi1, phi2=hist.phi2, h1=hist.h1, h2=hist.h2, n=hist.n, qold=qold, lam=lam)
    return _device_advance(solver, cond, run, fields, tstate, h, accept, u_new, du_new, extra)


def _device_advance(
    solver: "ContinuousDEQSolver", cond: TerminationCondition, run: "_StepFields", fields: dict, tstate: dict,
    h: Tensor, accept: Tensor, u_new: Tensor, du_new: Tensor, extra: dict,
) -> Tuple[dict, dict, Tensor]:  # fmt: skip
    """`ContinuousDEQSolver._advance` with the tracker's device update: the new fields, the tracker state
    and the objective the trace records."""
    accept = accept & tstate["active"] & (h > 0)
    a2 = accept.unsqueeze(1)
    u = torch.where(a2, u_new, run.u)
    du = torch.where(a2, du_new, run.du)
    t = torch.where(accept, run.t + h, run.t)
    accepted = run.accepted + (accept & run.moving).long()  # type: ignore[operator]
    tstate, obj = device_update(cond, tstate, u, du, None, mask=accept, diverged=run.diverging)
    steps = fields["steps"] + 1
    horizon = fields["horizon"]
    if math.isfinite(solver.t_max):
        at_horizon = ((t >= solver.t_max * (1 - 1e-12)) | ~tstate["active"]).all()
        horizon = torch.where((horizon < 0) & at_horizon, steps, horizon)
    moved = accept.any().expand_as(accept) if cond.batch_wide else accept
    out = dict(
        u=u, du=du, dt=run.dt, t=t, du_norm=run.du_norm, growths=run.growths, nonfinite_tries=run.nonfinite_tries,
        accepted=accepted, steps=steps, horizon=horizon, trace_last=torch.where(moved, obj, fields["trace_last"]),
        **extra,
    )  # fmt: skip
    return out, tstate, out["trace_last"]


#: The |λ| estimate of VCAB3's stability cap forgets at this rate per accepted step: the cap may at most
#: double per step once the fast modes that set it have died out. Not slower: near z0 = 0 a normalised map
#: (the MDEQs' GroupNorm/BatchNorm) has |λ| ~ 1e4, falling by ~20 % per step as the state grows; a decay
#: of 0.9 held the step back for 50 steps there (64 evaluations instead of 38 to the same residual).
_LAMBDA_DECAY = 0.5


class _Run:
    """The mutable state of one solve, shared by the loops and the guards."""

    def __init__(self, u: Tensor, du: Tensor, dt: Tensor, tracker: TerminationTracker, done: bool):
        B = u.shape[0]
        self.u, self.du, self.dt, self.tracker, self.done = u, du, dt, tracker, done
        self.update = instrument.wrap("termination", tracker.update)  # the method itself when nothing records
        self.t = u.new_zeros(B)
        self.du_norm = torch.linalg.vector_norm(du, dim=1)
        self.growths = torch.zeros(B, dtype=torch.long, device=u.device)
        self.nonfinite_tries = torch.zeros(B, dtype=torch.long, device=u.device)
        self.accepted = torch.zeros(B, dtype=torch.long, device=u.device)
        self.diverging: Optional[Tensor] = None
        self.moving: Optional[Tensor] = None  # the step's truly accepted samples (None: every accepted one)
        self.horizon_step: Optional[Tensor] = None
        self.steps = 0
