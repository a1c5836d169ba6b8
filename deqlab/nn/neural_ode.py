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

from typing import Any, List, Literal, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from deqlab.state import flatten, per_sample_norm, unflatten
from deqlab.nn.deq import MultiScaleMap, _CheckedMap
from deqlab.nn.layers import EquilibriumStateful
from deqlab.nn.solution import DeepEquilibriumSolution
from deqlab.solvers.result import SolverStatus

__all__ = ["MultiScaleNeuralODE"]

_FIXED_STEP = {"euler", "midpoint", "rk4", "rk-4", "RungeKutta4", "Euler", "Midpoint"}


class _VectorField(nn.Module):
    """``(t, u_flat) -> flat(f(u, x)) − u_flat`` with an NFE counter; ``x`` set per forward."""

    def __init__(self, owner: "MultiScaleNeuralODE"):
        super().__init__()
        self.map = owner.model  # registered so torchdyn's adjoint sees the parameters
        self._owner = [owner]
        self.x: Optional[Tensor] = None
        self.like: List[Tensor] = []
        self.nfe = 0
        self.backward_nfe = 0
        self.in_backward = False
        self.checker: Optional[_CheckedMap] = None

    def forward(self, t: Tensor, u: Tensor, args: Any = None) -> Tensor:
        if self.in_backward:
            self.backward_nfe += 1
        else:
            self.nfe += 1
        z = unflatten(u, self.like)
        out = self.checker(z) if self.checker is not None and not self.checker.checked else self.map(z, self.x)
        return flatten(out) - u


class MultiScaleNeuralODE(nn.Module):
    """Multiscale neural ODE on ``t ∈ [0, 1]`` with the multiscale DEQ map (paper baseline).

    Args:
        main_layers, mapping_layers, post_fuse_layers, scales: as
            :class:`~deqlab.nn.MultiScaleDeepEquilibriumNetwork`.
        solver: a torchdyn method name (``"tsit5"``, ``"dopri5"``, ``"euler"``, ``"rk4"``) or a
            :class:`~deqlab.solvers.ContinuousDEQSolver` (its method, tolerances and ``dt`` are used; its
            termination settings are not: the interval is fixed).
        abstol, reltol: step-size controller tolerances (adaptive methods).
        dt: step of fixed-step methods.
        t_end: end of the interval (1 in the paper).
        sensitivity: ``"autograd"`` (default, exact for every parameter and ``x``), ``"adjoint"`` or
            ``"interpolated_adjoint"`` (torchdyn's; see the module docstring for why they are wrong here).

    ``forward(x)`` returns ``(list of u_i(1), solution)``; ``solution.nfe`` counts vector-field
    evaluations of the forward integration, ``solution.residual`` is ``||f(u(1)) − u(1)||`` per sample
    (how far from a fixed point the endpoint is; not counted in nfe), and ``solution.backward_nfe`` counts
    the evaluations re-run in the backward: 0 for ``"autograd"`` (it backpropagates the recorded graph);
    for the torchdyn adjoints read ``layer.last_backward_nfe`` after ``loss.backward()``.
    """

    def __init__(self, main_layers: Sequence[nn.Module], mapping_layers: Sequence[Sequence[Optional[nn.Module]]],
                 post_fuse_layers: Optional[Sequence[Optional[nn.Module]]], solver: Any,
                 scales: Sequence[Sequence[int]], *, abstol: Optional[float] = None, reltol: Optional[float] = None,
                 dt: Optional[float] = None, t_end: float = 1.0,
                 sensitivity: Literal["autograd", "adjoint", "interpolated_adjoint"] = "autograd"):
        super().__init__()
        self.model = MultiScaleMap(main_layers, mapping_layers, post_fuse_layers)
        if len(scales) != self.model.num_scales:
            raise ValueError(f"MultiScaleNeuralODE: got {len(scales)} scales for {self.model.num_scales} main layers")
        self.scales = [tuple(int(d) for d in s) for s in scales]
        if isinstance(solver, str):
            method, s_abstol, s_reltol, s_dt = solver, 1e-3, 1e-3, None
        else:
            method = getattr(solver, "ode_solver", None)
            if method is None:
                raise TypeError(f"MultiScaleNeuralODE: solver must be a torchdyn method name or a "
                                f"ContinuousDEQSolver, got {solver!r}")
            s_abstol, s_reltol, s_dt = solver.abstol, solver.reltol, getattr(solver, "dt", None)
        if sensitivity not in ("autograd", "adjoint", "interpolated_adjoint"):
            raise ValueError(f"MultiScaleNeuralODE: unknown sensitivity {sensitivity!r}")
        self.method = method
        self.abstol = float(abstol if abstol is not None else s_abstol)
        self.reltol = float(reltol if reltol is not None else s_reltol)
        self.dt = float(dt if dt is not None else (s_dt if s_dt is not None else 0.1))
        self.t_end = float(t_end)
        self.sensitivity = sensitivity
        self.vf = _VectorField(self)
        self._problem = None

    def _t_span(self, x: Tensor) -> Tensor:
        if self.method in _FIXED_STEP:
            n = max(1, int(round(self.t_end / self.dt)))
            return torch.linspace(0.0, self.t_end, n + 1, dtype=x.dtype, device=x.device)
        return torch.tensor([0.0, self.t_end], dtype=x.dtype, device=x.device)

    def _stateful(self) -> List[EquilibriumStateful]:
        return [m for m in self.modules() if isinstance(m, EquilibriumStateful)]

    def forward(self, x: Tensor) -> Tuple[List[Tensor], DeepEquilibriumSolution]:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"MultiScaleNeuralODE: expected a floating-point tensor x, got "
                             f"{getattr(x, 'dtype', type(x))}")
        stateful = self._stateful()
        for m in stateful:
            m.deq_begin()
        try:
            return self._forward(x)
        finally:
            for m in stateful:
                m.deq_end()

    def _forward(self, x: Tensor) -> Tuple[List[Tensor], DeepEquilibriumSolution]:
        from torchdyn.numerics import odeint

        u0 = [x.new_zeros((x.shape[0], *s)) for s in self.scales]
        vf = self.vf
        vf.x, vf.like, vf.nfe, vf.backward_nfe, vf.in_backward = x, u0, 0, 0, False
        checker = _CheckedMap(self, x)
        vf.checker = checker
        t_span = self._t_span(x)
        u0_flat = flatten(u0)
        if self.sensitivity == "autograd":
            _, traj = odeint(vf, u0_flat, t_span, solver=self.method, atol=self.abstol, rtol=self.reltol)
        else:
            if self._problem is None:
                from torchdyn.core.problems import ODEProblem

                self._problem = ODEProblem(vf, solver=self.method, atol=self.abstol, rtol=self.reltol,
                                           sensitivity=self.sensitivity)
            _, traj = self._problem.odeint(u0_flat, t_span)
        forward_nfe = vf.nfe
        vf.in_backward = True
        u1 = unflatten(traj[-1], u0)
        with torch.no_grad():
            f1 = self.model([u.detach() for u in u1], x.detach())
            residual = per_sample_norm([a - b for a, b in zip(f1, u1)])
        box = [0]
        solution = DeepEquilibriumSolution(
            z_star=u1, u0=u0, residual=residual, jacobian_loss=x.new_zeros(()), skip_loss=x.new_zeros(()),
            nfe=forward_nfe, converged=torch.isfinite(residual),
            status=SolverStatus.CONVERGED if bool(torch.isfinite(residual).all()) else SolverStatus.NONFINITE,
            solver_result=None, _backward_nfe=box)
        return u1, solution

    @property
    def last_backward_nfe(self) -> int:
        """Vector-field evaluations run by the last backward (torchdyn adjoints; 0 for ``"autograd"``)."""
        return self.vf.backward_nfe

    def _map(self, z, x):  # used by _CheckedMap
        return self.model(z, x)

    def extra_repr(self) -> str:
        return (f"method={self.method!r}, abstol={self.abstol}, reltol={self.reltol}, t_end={self.t_end}, "
                f"sensitivity={self.sensitivity!r}")

