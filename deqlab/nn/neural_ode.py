"""The paper's neural-ODE baseline: the multiscale DEQ map integrated on a finite interval.

``du/dt = f(u, x) − u`` from ``u(0) = 0`` over ``t ∈ [0, 1]``; the output is ``u(1)``. Unlike a continuous
DEQ there is no steady state, so the implicit backward does not apply: gradients need an ODE adjoint or
backpropagation through the integrator.

Sensitivity (``sensitivity=``):

* ``"autograd"`` (default): backpropagate through torchdyn's solver steps. Exact gradients of the computed
  solution for *every* parameter, including the input-injection path ``x`` (so the stem trains) and any
  parameter the map uses; memory grows with the number of steps.
* ``"adjoint"`` / ``"interpolated_adjoint"``: torchdyn's continuous adjoints, provided for comparison only.
  They differentiate w.r.t. the parameters *owned by the vector field* and drop the gradient reaching
  ``x`` through the injection (the stem gets none), and their parameter gradients are those of the exact ODE
  solution, which differ from the computed solution's at loose tolerances (measured in
  ``tests/nn/test_nn_multiscale.py``).

torchdyn is imported lazily (its ``core`` package imports Lightning).
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any, List, Literal, Optional, Sequence, Tuple, cast

import torch
from torch import Tensor, nn

from deqlab._compat import deprecated, renamed
from deqlab.nn.deq import MultiScaleMap
from deqlab.nn.layers import equilibrium_session
from deqlab.nn.maps import CheckedMap
from deqlab.nn.running_stats import frozen_running_stats
from deqlab.nn.solution import DeepEquilibriumSolution, _BackpropCounter
from deqlab.solvers.result import SolverStatus
from deqlab.state import flatten, per_sample_norm, unflatten

__all__ = ["MultiScaleNeuralODE"]

_FIXED_STEP = {"euler", "midpoint", "rk4", "rk-4", "RungeKutta4", "Euler", "Midpoint"}


_IN_USE: "weakref.WeakSet" = weakref.WeakSet()
_IN_USE_LOCK = threading.Lock()


class _Integration:
    """One forward's integration: its injection, its state layout, its forward NFE and the record its
    backward fills. The vector field serves the integration installed in it; a backward re-installs its
    own forward's (`_begin_backward`), so two forwards in flight keep their injections and their counts
    apart."""

    def __init__(self, x: Tensor, like: List[Tensor], checker: CheckedMap):
        self.x = x
        self.like = like
        self.checker = checker
        self.nfe = 0
        #: ``True`` once this forward's backward started: evaluations are then a torchdyn adjoint's
        self.in_backward = False
        #: counts into the record: the backprop VJPs of ``"autograd"``, the adjoint's re-evaluations
        self.counter = _BackpropCounter()


class _VectorField(nn.Module):
    """``(t, u_flat) -> flat(f(u, x)) − u_flat`` for the installed `_Integration`: counts its forward
    evaluations, watches them for backprop VJPs, and counts the evaluations a torchdyn adjoint re-runs into
    the integration's record."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.map = model  # registered so torchdyn's adjoint sees the parameters
        self.run: Optional[_Integration] = None

    def forward(self, t: Tensor, u: Tensor, args: Any = None) -> Tensor:
        run = cast(_Integration, self.run)  # installed by the forward that integrates (or by its backward)
        if run.in_backward:
            run.counter.record(1, converged=True)  # an adjoint's evaluation of the field: one unit of backward work
        else:
            run.nfe += 1
        z = unflatten(u, run.like)
        if run.in_backward:  # an adjoint's re-evaluation: BatchNorm running statistics stay as the forward left them
            with frozen_running_stats([self.map]):
                out = run.checker(z) if not run.checker.checked else self.map(z, run.x)
        else:
            out = run.checker(z) if not run.checker.checked else self.map(z, run.x)
        du = flatten(cast(List[Tensor], out)) - u  # a multiscale state: a list
        if not run.in_backward:
            run.counter.watch([du])  # "autograd": backprop through this evaluation is one VJP
        return du


def _begin_backward(vf: _VectorField, run: _Integration, grad: Tensor) -> Tensor:
    """Tensor hook on the trajectory: this forward's backward starts. Re-install its integration (a
    torchdyn adjoint re-evaluates the field with this forward's ``x``) and mark the record: a fixed interval
    is integrated, so there is no tolerance the backward could miss."""
    vf.run = run
    run.in_backward = True
    run.counter.record(0, converged=True)
    return grad


class MultiScaleNeuralODE(nn.Module):
    """Multiscale neural ODE on ``t ∈ [0, 1]`` with the multiscale DEQ map (paper baseline).

    Args:
        main_layers: one module per scale, as in [`MultiScaleDeepEquilibriumNetwork`][deqlab.nn.MultiScaleDeepEquilibriumNetwork]
            (``main_layers[0](u_1, x)`` gets the injection). Required.
        mapping_layers: the ``n × n`` fusion matrix, as in
            [`MultiScaleDeepEquilibriumNetwork`][deqlab.nn.MultiScaleDeepEquilibriumNetwork]. Required.
        post_fuse_layers: per-scale post-fuse modules or ``None``, as in
            [`MultiScaleDeepEquilibriumNetwork`][deqlab.nn.MultiScaleDeepEquilibriumNetwork]. Required (positional), so the baseline is
            built with exactly the arguments of the DEQ it is compared with.
        solver: a torchdyn method name (``"tsit5"``, ``"dopri5"``, ``"euler"``, ``"rk4"``) or a
            [`ContinuousDEQSolver`][deqlab.solvers.ContinuousDEQSolver] (its method, ODE tolerances and ``dt`` are used; its
            termination settings are not: the interval is fixed). Required.
        scales: per-sample shapes of the state, one per main layer, e.g. ``[(8, 28, 28), (16, 14, 14)]``.
            Required.
        ode_abstol: absolute tolerance of the step-size controller (adaptive methods). Default ``None``: the
            ``ContinuousDEQSolver``'s ``ode_abstol``, or ``1e-3`` with a method name (loose enough for a
            training baseline, where the integrator's error is far below the model's).
        ode_reltol: relative tolerance of the step-size controller. Default ``None``: the solver's
            ``ode_reltol``, or ``1e-3`` with a method name (same reason).
        abstol: deprecated old name of ``ode_abstol`` (warns ``DeprecationWarning``). Default ``None``;
            passing both spellings raises ``ValueError``.
        reltol: deprecated old name of ``ode_reltol`` (warns). Default ``None``; passing both raises.
        dt: step of fixed-step methods (``"euler"``, ``"rk4"``, ...). Default ``None``: the solver's ``dt``,
            else ``0.1`` (ten steps over the paper's interval).
        t_end: end of the interval. Default ``1.0``, the paper's.
        sensitivity: ``"autograd"`` (default: exact for every parameter and ``x``), ``"adjoint"`` or
            ``"interpolated_adjoint"`` (torchdyn's; see the module docstring for why they are wrong here).

    ``forward(x)`` returns ``(list of u_i(1), solution)``; ``solution.nfe`` counts vector-field
    evaluations of the forward integration, ``solution.abs_residual`` is ``||f(u(1)) − u(1)||`` per sample
    (how far from a fixed point the endpoint is; not counted in nfe). When the backward runs it fills the
    record of *its own* forward (another forward in flight keeps its numbers and its ``x``), through
    [`DeepEquilibriumSolution.record_backward`][deqlab.nn.DeepEquilibriumSolution.record_backward] like the
    DEQ layers: ``solution.backward_nfe`` is the backward's work in map evaluations (``"autograd"``: one
    VJP per recorded forward evaluation the gradient flows through, so ``nfe`` for a fixed-step method;
    the torchdyn adjoints: the augmented-ODE evaluations they re-run), and ``backward_converged = True``
    (a fixed interval is integrated; there is no tolerance to miss).

    Raises:
        ValueError: both ``ode_abstol`` and ``abstol`` (or ``ode_reltol`` and ``reltol``) are given;
            ``len(scales)`` differs from the number of main layers; ``mapping_layers`` or
            ``post_fuse_layers`` have the wrong size; ``sensitivity`` is unknown; the method is ``"vcab3"``
            (a steady-state solver of deqlab's own, which torchdyn's fixed-interval integrator lacks).
        TypeError: ``solver`` is neither a method name nor a ``ContinuousDEQSolver``.

    Example:
        ``du/dt = f(u, x) − u`` with ``f = u/2 + x`` on scale 1 has ``u_1(1) = 2x (1 − e^{−1/2})``;
        RK4 with ``dt=0.25`` costs 4 steps × 4 evaluations:

        >>> import math
        >>> import torch
        >>> from torch import nn
        >>> from deqlab.nn import MultiScaleNeuralODE
        >>> class Half(nn.Module):
        ...     def forward(self, z, x=None):
        ...         return 0.5 * z if x is None else 0.5 * z + x
        >>> node = MultiScaleNeuralODE([Half(), Half()], [[None, nn.Linear(2, 3)], [None, None]], None,
        ...                            "rk4", [(2,), (3,)], dt=0.25)
        >>> x = torch.ones(4, 2, requires_grad=True)
        >>> us, solution = node(x)
        >>> [tuple(u.shape) for u in us], solution.nfe
        ([(4, 2), (4, 3)], 16)
        >>> u1 = us[0].detach()                      # scale 1 at t = 1
        >>> round(float(u1[0, 0]), 4), round(2 * (1 - math.exp(-0.5)), 4)
        (0.7869, 0.7869)
        >>> sum(u.sum() for u in us).backward()     # exact backprop through the 16 evaluations: 16 VJPs
        >>> solution.backward_nfe, solution.backward_converged, x.grad is not None
        (16, True, True)
    """

    def __init__(
        self,
        main_layers: Sequence[nn.Module],
        mapping_layers: Sequence[Sequence[Optional[nn.Module]]],
        post_fuse_layers: Optional[Sequence[Optional[nn.Module]]],
        solver: Any,
        scales: Sequence[Sequence[int]],
        *,
        ode_abstol: Optional[float] = None,
        ode_reltol: Optional[float] = None,
        abstol: Optional[float] = None,
        reltol: Optional[float] = None,
        dt: Optional[float] = None,
        t_end: float = 1.0,
        sensitivity: Literal["autograd", "adjoint", "interpolated_adjoint"] = "autograd",
    ):
        super().__init__()
        name = type(self).__name__
        ode_abstol = renamed(name, "ode_abstol", ode_abstol, "abstol", abstol)
        ode_reltol = renamed(name, "ode_reltol", ode_reltol, "reltol", reltol)
        self.model = MultiScaleMap(main_layers, mapping_layers, post_fuse_layers)
        if len(scales) != self.model.num_scales:
            raise ValueError(f"{name}: got {len(scales)} scales for {self.model.num_scales} main layers")
        self.scales = [tuple(int(d) for d in s) for s in scales]
        if isinstance(solver, str):
            method, s_abstol, s_reltol, s_dt = solver, 1e-3, 1e-3, None
        else:
            from deqlab.solvers.continuous import ContinuousDEQSolver

            if not isinstance(solver, ContinuousDEQSolver):
                raise TypeError(
                    f"{name}: solver must be a torchdyn method name or a ContinuousDEQSolver, got {solver!r}"
                )
            method, s_dt = solver.ode_solver, solver.dt
            s_abstol, s_reltol = solver.ode_abstol, solver.ode_reltol
        if method == "vcab3":
            raise ValueError(
                f"{name}: 'vcab3' is deqlab's steady-state solver; this layer integrates a fixed "
                "interval with torchdyn: use 'tsit5', 'dopri5', 'euler' or 'rk4'"
            )
        if sensitivity not in ("autograd", "adjoint", "interpolated_adjoint"):
            raise ValueError(f"{name}: unknown sensitivity {sensitivity!r}")
        self.method = method
        self.ode_abstol = float(ode_abstol if ode_abstol is not None else s_abstol)
        self.ode_reltol = float(ode_reltol if ode_reltol is not None else s_reltol)
        self.dt = float(dt if dt is not None else (s_dt if s_dt is not None else 0.1))
        self.t_end = float(t_end)
        self.sensitivity = sensitivity
        self.vf = _VectorField(self.model)
        self._problem: Optional[Any] = None  # torchdyn's ODEProblem, built at the first adjoint integration

    @property
    def abstol(self) -> float:
        """Deprecated old name of `ode_abstol` (the ODE step tolerance, not the termination one)."""
        return deprecated("MultiScaleNeuralODE", ".abstol", ".ode_abstol", self.ode_abstol)

    @property
    def reltol(self) -> float:
        """Deprecated old name of `ode_reltol` (the ODE step tolerance, not the termination one)."""
        return deprecated("MultiScaleNeuralODE", ".reltol", ".ode_reltol", self.ode_reltol)

    def _t_span(self, x: Tensor) -> Tensor:
        if self.method in _FIXED_STEP:
            n = max(1, int(round(self.t_end / self.dt)))
            return torch.linspace(0.0, self.t_end, n + 1, dtype=x.dtype, device=x.device)
        return torch.tensor([0.0, self.t_end], dtype=x.dtype, device=x.device)

    def forward(self, x: Tensor) -> Tuple[List[Tensor], DeepEquilibriumSolution]:
        """Integrate ``du/dt = f(u, x) − u`` from ``u(0) = 0`` to ``t_end``.

        Args:
            x: the injection, a batch-first floating-point tensor ``(B, ...)`` with ``B >= 1``.

        Returns:
            ``(list of u_i(t_end), solution)``, the endpoint per scale and its
            [`DeepEquilibriumSolution`][deqlab.nn.DeepEquilibriumSolution].

        Raises:
            ValueError: ``x`` is not a floating-point tensor of shape ``(B, ...)`` with ``B >= 1``.
            RuntimeError: the module is already running a forward in another thread (give each thread
                its own copy).
        """
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(
                f"MultiScaleNeuralODE: expected a floating-point tensor x, got {getattr(x, 'dtype', type(x))}"
            )
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(
                f"MultiScaleNeuralODE: expected x of shape (B, ...) with a non-empty batch "
                f"dimension first, got shape {tuple(x.shape)}"
            )
        with _IN_USE_LOCK:
            if self in _IN_USE:
                raise RuntimeError(
                    "MultiScaleNeuralODE: this module is already running a forward in another thread; its vector "
                    "field holds per-forward state (the injection x, the NFE counter), so one module serves one "
                    "thread at a time. Give each thread its own copy (copy.deepcopy(module))."
                )
            _IN_USE.add(self)
        try:
            with equilibrium_session([self]):
                return self._forward(x)
        finally:
            with _IN_USE_LOCK:
                _IN_USE.discard(self)

    def _forward(self, x: Tensor) -> Tuple[List[Tensor], DeepEquilibriumSolution]:
        from torchdyn.numerics import odeint

        u0 = [x.new_zeros((x.shape[0], *s)) for s in self.scales]
        vf = self.vf
        run = vf.run = _Integration(x, u0, CheckedMap(lambda z, x_: self.model(z, x_), x, name=type(self).__name__))
        t_span = self._t_span(x)
        u0_flat = flatten(u0)
        # As in the DEQ layers, a train-mode BatchNorm of the map records its running statistics once per
        # forward, at the returned state u(t_end) (the residual's evaluation below), not at every stage.
        with frozen_running_stats([self.model]):
            if self.sensitivity == "autograd":
                _, traj = odeint(vf, u0_flat, t_span, solver=self.method, atol=self.ode_abstol, rtol=self.ode_reltol)
            else:
                if self._problem is None:
                    from torchdyn.core.problems import ODEProblem

                    self._problem = ODEProblem(
                        vf, solver=self.method, atol=self.ode_abstol, rtol=self.ode_reltol, sensitivity=self.sensitivity
                    )
                _, traj = self._problem.odeint(u0_flat, t_span)
        forward_nfe = run.nfe
        u1 = unflatten(traj[-1], u0)
        with torch.no_grad():
            f1 = self.model([u.detach() for u in u1], x.detach())
            residual = per_sample_norm([a - b for a, b in zip(f1, u1)])
            rel_residual = residual / (per_sample_norm(list(f1)) + 1e-12)
        finite = torch.isfinite(residual)
        solution = DeepEquilibriumSolution(
            z_star=u1,
            u0=u0,
            abs_residual=residual,
            jacobian_loss=x.new_zeros(()),
            skip_loss=x.new_zeros(()),
            nfe=forward_nfe,
            converged=finite,
            status=SolverStatus.CONVERGED if bool(finite.all()) else SolverStatus.NONFINITE,
            solver_result=None,
            reference_nfe=forward_nfe + 1,
            rel_residual=rel_residual,
        )  # DeepEquilibriumNetworks.jl: the integrator's nf + 1
        run.counter.bind(solution)
        if traj.requires_grad:
            traj.register_hook(functools.partial(_begin_backward, vf, run))
        return u1, solution

    def extra_repr(self) -> str:
        return (
            f"method={self.method!r}, ode_abstol={self.ode_abstol}, ode_reltol={self.ode_reltol}, "
            f"t_end={self.t_end}, sensitivity={self.sensitivity!r}"
        )
