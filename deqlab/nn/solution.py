"""What a DEQ layer returns next to ``z_star``.

Named after the reference package's ``DeepEquilibriumSolution(z_star, u0, residual, jacobian_loss,
nfe)``; deqlab adds the skip loss, the convergence mask, the solver status and the backward NFE so the
Lightning module can compose the loss and log everything without knowing which layer produced it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union

from torch import Tensor

from deqlab.solvers.result import SolverResult, SolverStatus

from deqlab.state import State


@dataclass
class DeepEquilibriumSolution:
    """Everything a training loop needs about one DEQ solve.

    Attributes:
        z_star: the fixed point (tensor or list of tensors for multiscale models), carrying gradients.
        u0: the initial guess the solve started from (``shortcut(x)`` for Skip DEQ, ``f(0, x)`` for
            Skip Reg. DEQ, zeros otherwise).
        residual: per-sample ``||f(z*) - z*||`` (shape ``(B,)``), detached.
        jacobian_loss: Hutchinson estimate of ``||df/dz||_F^2`` at ``z*`` (scalar, differentiable), or a
            zero scalar when Jacobian regularization is off.
        skip_loss: ``mean |u0 - z*|`` (Skip variants; differentiable w.r.t. the shortcut), else zero.
        nfe: forward evaluations of f (``d`` exactly in fixed-depth mode).
        converged: per-sample bool mask.
        status: the solver's status (``SolverStatus``).
        solver_result: the full ``SolverResult`` (``None`` in fixed-depth mode).
        backward_nfe: evaluations of the VJP during the implicit backward; filled in by
            ``loss.backward()`` (a one-element list shared with the backward function, so it is
            readable afterwards through ``solution.backward_nfe``).
    """

    z_star: State
    u0: Optional[State]
    residual: Tensor
    jacobian_loss: Tensor
    skip_loss: Tensor
    nfe: int
    converged: Tensor
    status: SolverStatus
    solver_result: Optional[SolverResult] = None
    _backward_nfe: List[int] = field(default_factory=lambda: [0], repr=False)

    @property
    def backward_nfe(self) -> int:
        return int(self._backward_nfe[0])
