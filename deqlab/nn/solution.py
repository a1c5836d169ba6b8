"""What a DEQ layer returns next to ``z_star``: the one record of a solve, forward and backward.

Named after the reference package's ``DeepEquilibriumSolution(z_star, u0, residual, jacobian_loss,
nfe)``; deqlab adds the skip loss, the convergence mask, the solver status and the backward's cost and
outcome, so a training loop composes the loss and logs everything from this record alone, without knowing
which layer produced it. The forward fills the forward fields; the backward, when it runs, fills the
``backward_*`` fields of the same object (there is no other copy on the layer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from deqlab.solvers.result import SolverResult, SolverStatus
from deqlab.state import State

__all__ = ["DeepEquilibriumSolution"]


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
        skip_loss: the initial guess's loss, e.g. ``mean |u0 - z*|`` (Skip variants; differentiable w.r.t.
            the shortcut), else zero.
        nfe: forward evaluations of f (``d`` exactly in fixed-depth mode).
        converged: per-sample bool mask.
        status: the solver's status (``SolverStatus``).
        solver_result: the full ``SolverResult`` (``None`` in fixed-depth mode).
        backward_nfe: VJPs (or map evaluations) spent by every backward through this solve so far; ``0``
            until ``loss.backward()`` reaches the layer.
        backward_residual: per-sample relative residual of the last adjoint solve (``None`` until a
            backward ran, and for backward modes without a solve).
        backward_converged: whether the last adjoint solve met its tolerance for every sample (``None``
            until a backward ran, and for modes without a solve: JFB, phantom gradient).

    Example:
        The record a layer returns next to ``z_star``; the backward fills its ``backward_*`` fields:

        >>> import torch
        >>> from torch import nn
        >>> from deqlab.nn import DEQ
        >>> from deqlab.solvers import DiscreteDEQSolver
        >>> class Half(nn.Module):
        ...     def forward(self, z, x):
        ...         return 0.5 * z + x
        >>> solver = DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-6, max_steps=30)
        >>> z_star, solution = DEQ(Half(), solver)(torch.ones(2, 3, requires_grad=True))
        >>> type(solution).__name__, solution.status.value, solution.residual.shape, solution.nfe > 0
        ('DeepEquilibriumSolution', 'converged', torch.Size([2]), True)
        >>> float(solution.skip_loss), float(solution.jacobian_loss)      # no Skip guess, no regularization
        (0.0, 0.0)
        >>> solution.backward_nfe, solution.backward_converged            # before the backward
        (0, None)
        >>> z_star.sum().backward()
        >>> solution.backward_nfe > 0, solution.backward_converged
        (True, True)
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
    backward_nfe: int = 0
    backward_residual: Optional[Tensor] = None
    backward_converged: Optional[bool] = None
