"""What every solver returns: one record, whatever the algorithm.

Why a single record: the DEQ layers, the Lightning module and the benchmarks all read the same
numbers (NFE, per-sample residuals, convergence masks, an explicit status) without knowing which
algorithm produced them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, List, Optional

from torch import Tensor

from deqlab._compat import renamed_field
from deqlab.state import State


class SolverStatus(str, enum.Enum):
    """Why a solve ended. A ``str`` subclass so it logs and compares as plain text.

    When several samples end differently, the status is the worst case over the batch:
    ``nonfinite`` before ``diverged`` before ``max_steps`` before ``stalled``; it is ``converged`` only
    when every sample converged (per-sample detail is in `SolverResult.converged` and
    `SolverResult.stalled`).

    Attributes:
        CONVERGED: every sample met the termination condition (its tolerance).
        STALLED: the mildest failure: some sample was stopped by the patience rule of the ``*_deq_*``
            modes, its objective stuck near the tolerance (within ``patience_objective_multiplier``, 3x by
            default) but not within it. Stopping it was right (more steps would not help); calling it
            converged would not be: its residual is up to 3x the tolerance.
        MAX_STEPS: the step cap (or a continuous solver's ``t_max``) ended the solve first.
        DIVERGED: a sample hit a protective break (its residual grew far beyond the first one, or lost
            resolution), or a continuous solver's flow kept running away.
        NONFINITE: a sample's residual became NaN/Inf; it returns its last finite iterate.

    Example:
        >>> import torch
        >>> from deqlab.solvers import DiscreteDEQSolver, SolverStatus
        >>> ", ".join(s.value for s in SolverStatus)
        'converged, stalled, max_steps, diverged, nonfinite'
        >>> res = DiscreteDEQSolver("fixed_point", mode="abs_norm", max_steps=100)(
        ...     lambda z: 2 * z + 1, torch.zeros(2, 3))   # the fixed point -1 repels every iterate
        >>> res.status is SolverStatus.DIVERGED, res.status == "diverged", str(res.status)
        (True, True, 'diverged')
    """

    CONVERGED = "converged"
    STALLED = "stalled"
    MAX_STEPS = "max_steps"
    DIVERGED = "diverged"
    NONFINITE = "nonfinite"

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return self.value


@renamed_field("residual", "abs_residual", why="the absolute residual ||f(z) - z||; rel_residual is the relative one")
@dataclass
class SolverResult:
    """Outcome of ``solver(f, z0)``.

    Every solver returns one, whatever the algorithm; solvers build it, users read it.

    Attributes:
        z: the returned iterate, with the structure of ``z0`` (a tensor or a list of tensors).
        nfe: every evaluation of ``f`` (batched calls), including rejected ODE steps and line searches.
        steps: iterations (discrete) or stepper calls, accepted and rejected (continuous), of the solver loop.
        abs_residual: per-sample absolute residual ``||f(z) - z||`` at ``z`` (shape ``(B,)``), in the
            solver's norm (L2 or RMS). (Its old name ``residual`` still reads, with a ``DeprecationWarning``.)
        rel_residual: per-sample relative residual ``||f(z) - z|| / (||f(z)|| + eps)``.
        converged: per-sample bool mask: the sample met the termination condition's tolerance.
        status: ``converged`` when every sample converged, else why the solve ended.
        sample_steps: per-sample number of steps until the sample stopped (``(B,)`` long).
        trace: optional ``(steps + 1, B)`` tensor of the termination objective per step.
        fz: ``f(z)`` at the returned iterate when the solver has it for free, else ``None``.
        t: continuous solvers only: the per-sample integration time reached (``(B,)``).
        sample_weighted_nfe: evaluations weighted by the fraction of the batch each covered
            (``sum of rows evaluated / B``). Equal to ``nfe`` unless the solver evaluated sub-batches
            (``per_sample_exit=True``), where it is the work actually done; ``None`` when not recorded.
        reference_nfe: the NFE the paper's reference code would have reported for a solve this long, in
            the convention ``reference_counting`` (see `deqlab.solvers.counting`: it adds the final
            ``z* = f(u*)`` the reference always made, and maps start-up differences), for comparing with the
            paper's numbers; ``None`` from a solver that does not compute it. Not the cost: ``nfe`` is.
        reference_counting: ``"deqjl"`` or ``"fastdeq"``, the convention of ``reference_nfe``.
        stalled: per-sample bool mask: the patience rule stopped the sample near, not within, the
            tolerance (``converged`` is False for it); ``None`` when the solver does not record it.
        accepted_steps: continuous solvers only: the per-sample number of accepted (state-moving) steps,
            ``(B,)`` long; ``steps`` and ``sample_steps`` count rejected ones too. ``None`` for others.
        objective: per-sample value of the stopping test's own objective at ``z`` (what ``trace`` records
            and ``tolerance`` bounds: the relative residual for the ``rel_*`` modes, the absolute one for
            ``abs_*``; see ``objective_name``); ``None`` from a solver that does not record it.
        tolerance: the tolerance the objective is compared with. ``None`` when not recorded.
        objective_name: the objective in words (``TerminationCondition.objective_name``).
        iterates: the iterates kept at ``iterate_steps`` when the solve ran inside
            [`record_iterates`][deqlab.solvers.record_iterates] (one state per step, per sample: a sample
            that stopped earlier gives its returned ``z`` there); ``None`` otherwise.
        iterate_steps: the step indices of ``iterates``; ``None`` when nothing was recorded.
        reversible: [`ReversibleSolver`][deqlab.solvers.ReversibleSolver] only: the final ``y_N``, the start and
            the per-sample step counts its exact backward ([`ReversibleBackward`][deqlab.nn.ReversibleBackward])
            inverts (a [`ReversibleState`][deqlab.solvers.ReversibleState]); ``None`` from other solvers.

    Example:
        >>> import torch
        >>> from deqlab.solvers import DiscreteDEQSolver
        >>> solver = DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-10)
        >>> res = solver(lambda z: 0.5 * z + 1, torch.zeros(2, 3, dtype=torch.float64))
        >>> res.status, res.all_converged
        (<SolverStatus.CONVERGED: 'converged'>, True)
        >>> res.z.round(decimals=6)   # z* = 2 solves z = 0.5 z + 1
        tensor([[2., 2., 2.],
                [2., 2., 2.]], dtype=torch.float64)
        >>> res.nfe == res.steps + 1, res.converged.tolist()
        (True, [True, True])
        >>> res.reference_nfe == res.nfe + 1, res.reference_counting   # + the reference's final z* = f(z)
        (True, 'deqjl')
        >>> res.stats()["converged_fraction"], res.stats()["stalled_fraction"]
        (1.0, 0.0)
        >>> res.objective_name, res.tolerance, bool((res.objective <= res.tolerance).all())
        ('absolute residual ||f(z) - z||', 1e-10, True)
    """

    z: State
    nfe: int
    steps: int
    abs_residual: Tensor
    rel_residual: Tensor
    converged: Tensor
    status: SolverStatus
    sample_steps: Tensor
    trace: Optional[Tensor] = None
    fz: Optional[State] = field(default=None, repr=False)
    t: Optional[Tensor] = None
    sample_weighted_nfe: Optional[float] = None
    reference_nfe: Optional[int] = None
    reference_counting: Optional[str] = None
    stalled: Optional[Tensor] = None
    accepted_steps: Optional[Tensor] = None
    objective: Optional[Tensor] = None
    tolerance: Optional[float] = None
    objective_name: Optional[str] = None
    iterates: Optional[List[State]] = field(default=None, repr=False)
    iterate_steps: Optional[List[int]] = None
    reversible: Optional[Any] = field(default=None, repr=False)

    @property
    def all_converged(self) -> bool:
        """True when every sample converged (``status is SolverStatus.CONVERGED``)."""
        return self.status is SolverStatus.CONVERGED

    def stats(self) -> dict:
        """Scalar summary, convenient for logging (an empty batch gives zeros and a converged fraction of 1).

        Returns:
            A dict of floats: ``nfe``, ``steps``, ``abs_residual_mean``, ``abs_residual_max``,
            ``rel_residual_mean``, ``rel_residual_max``, ``converged_fraction`` and ``stalled_fraction``
            (fractions of the samples; stalled: stopped by the patience rule near the tolerance, 0 when not
            recorded).
        """
        if self.abs_residual.numel() == 0:
            return {
                "nfe": float(self.nfe),
                "steps": float(self.steps),
                "abs_residual_mean": 0.0,
                "abs_residual_max": 0.0,
                "rel_residual_mean": 0.0,
                "rel_residual_max": 0.0,
                "converged_fraction": 1.0,
                "stalled_fraction": 0.0,
            }
        return {
            "nfe": float(self.nfe),
            "steps": float(self.steps),
            "abs_residual_mean": float(self.abs_residual.mean()),
            "abs_residual_max": float(self.abs_residual.max()),
            "rel_residual_mean": float(self.rel_residual.mean()),
            "rel_residual_max": float(self.rel_residual.max()),
            "converged_fraction": float(self.converged.float().mean()),
            "stalled_fraction": 0.0 if self.stalled is None else float(self.stalled.float().mean()),
        }


class ConvergenceWarning(UserWarning):
    """Warned when a forward or backward solve ends without meeting its tolerance.

    A ``UserWarning`` subclass, so ``warnings.simplefilter("error", ConvergenceWarning)`` turns every
    unconverged solve into an exception, and ``"ignore"`` silences them. deqlab rate-limits it in training
    loops so a long run does not flood the log.

    Solvers themselves never warn (they report ``status``); the DEQ layers of `deqlab.nn` warn with
    this category under their default ``on_unconverged="warn"`` policy.

    Example:
        >>> import warnings
        >>> from deqlab.solvers import ConvergenceWarning
        >>> issubclass(ConvergenceWarning, UserWarning)
        True
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("error", ConvergenceWarning)   # every unconverged solve raises
        ...     try:
        ...         warnings.warn("the forward solve did not converge", ConvergenceWarning)
        ...     except ConvergenceWarning as err:
        ...         print("raised:", err)
        raised: the forward solve did not converge
    """


class SolverError(RuntimeError):
    """Raised by a solver called with ``throw=True`` when a solve does not converge.

    Also raised by a DEQ layer with ``on_unconverged="raise"``. A ``RuntimeError`` subclass; the message
    says which solver, the status, steps, evaluations and how many samples failed.

    Attributes:
        result: the full [`SolverResult`][deqlab.solvers.SolverResult] of the failed solve (its ``z`` is still finite and usable).

    Example:
        >>> import torch
        >>> from deqlab.solvers import DiscreteDEQSolver, SolverError
        >>> solver = DiscreteDEQSolver("fixed_point", mode="abs_norm", max_steps=5, throw=True)
        >>> try:
        ...     solver(lambda z: z + 1, torch.zeros(2, 3))   # z = z + 1 has no fixed point
        ... except SolverError as err:
        ...     print(err.result.status, err.result.nfe)
        max_steps 6
    """

    def __init__(self, message: str, result: SolverResult):
        super().__init__(message)
        self.result = result
