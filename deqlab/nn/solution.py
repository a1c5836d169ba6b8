"""What a DEQ layer returns next to ``z_star``: the one record of a solve, forward and backward.

Named after the reference package's ``DeepEquilibriumSolution(z_star, u0, residual, jacobian_loss,
nfe)``; deqlab adds the skip loss, the convergence mask, the solver status and the backward's cost and
outcome, so a training loop composes the loss and logs everything from this record alone, without knowing
which layer produced it. The forward fills the forward fields; the backward, when it runs, fills the
``backward_*`` fields of the same object (there is no other copy on the layer).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from deqlab._compat import renamed_field
from deqlab.solvers.result import SolverResult, SolverStatus
from deqlab.state import State

__all__ = ["DeepEquilibriumSolution"]


@renamed_field("residual", "abs_residual", why="the absolute residual ||f(z*) - z*||; rel_residual is the relative one")
@dataclass
class DeepEquilibriumSolution:
    """Everything a training loop needs about one DEQ solve.

    Attributes:
        z_star: the fixed point (tensor or list of tensors for multiscale models), carrying gradients.
        u0: the initial guess the solve started from (``shortcut(x)`` for Skip DEQ, ``f(0, x)`` for
            Skip Reg. DEQ, zeros otherwise).
        abs_residual: per-sample absolute residual ``||f(z*) - z*||`` (shape ``(B,)``), detached. (Its old
            name ``residual`` still reads, with a ``DeprecationWarning``.)
        jacobian_loss: Hutchinson estimate of ``||df/dz||_F^2`` at ``z*`` (scalar, differentiable), or a
            zero scalar when Jacobian regularization is off.
        skip_loss: the initial guess's loss, e.g. ``mean |u0 - z*|`` (Skip variants; differentiable w.r.t.
            the shortcut), else zero.
        nfe: forward evaluations of f (``d`` exactly in fixed-depth mode).
        converged: per-sample bool mask: the sample met the solver's tolerance.
        status: the solver's status (``SolverStatus``).
        stalled: per-sample bool mask of the samples the patience rule stopped near, not within, the
            tolerance (read from ``solver_result``; ``None`` in fixed-depth mode). A property.
        solver_result: the full ``SolverResult`` (``None`` in fixed-depth mode).
        backward_nfe: VJPs (or map evaluations) spent by every backward through this solve so far; ``0``
            until ``loss.backward()`` reaches the layer.
        backward_residual: per-sample relative residual of the last adjoint solve (``None`` until a
            backward ran, and for backward modes without a solve).
        backward_converged: whether the last adjoint solve met its tolerance for every sample (``None``
            until a backward ran, and for modes without a solve: JFB, phantom gradient).
        rel_residual: per-sample relative residual ``||f(z*) - z*|| / ||f(z*)||``, detached (``None`` from a
            layer that does not compute it). Which of the two the solver's stopping test bounds, and by what
            tolerance, is ``solver_result.objective_name`` / ``solver_result.tolerance``.
        reference_nfe: the forward's NFE as the paper's reference code counted it, for comparing with the
            paper's tables: the solver's ``reference_nfe`` (see `deqlab.solvers.counting`), plus one with
            Jacobian regularization in the ``"deqjl"`` convention (that code counted the regularizer's
            evaluation); exactly ``d`` in fixed-depth mode, as there. ``None`` when the solver does not
            compute it. ``nfe`` is the true cost.
        spectral_radius: per-sample estimate of ``ρ(∂f/∂z)`` at ``z*`` (shape ``(B,)``, detached), from
            [`spectral_radius`][deqlab.nn.spectral_radius]; ``None`` unless the layer was built with
            ``spectral_radius=...`` (opt-in: it costs a graph of ``f`` and some VJPs per forward).
        states: the sampled states of a layer built with ``sample_states`` / ``sample_at`` (a list of
            differentiable states, first to last, the last ``z_star``; see `deqlab.nn.trajectory`), else
            ``None``. Feed them to [`fixed_point_correction_loss`][deqlab.nn.fixed_point_correction_loss].

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
        >>> type(solution).__name__, solution.status.value, solution.abs_residual.shape, solution.nfe > 0
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
    abs_residual: Tensor
    jacobian_loss: Tensor
    skip_loss: Tensor
    nfe: int
    converged: Tensor
    status: SolverStatus
    solver_result: Optional[SolverResult] = None
    backward_nfe: int = 0
    backward_residual: Optional[Tensor] = None
    backward_converged: Optional[bool] = None
    reference_nfe: Optional[int] = None
    rel_residual: Optional[Tensor] = None
    spectral_radius: Optional[Tensor] = None
    states: Optional[List[State]] = None

    @property
    def stalled(self) -> Optional[Tensor]:
        """Per-sample mask of the samples stopped by the patience rule near, not within, the tolerance
        (``converged`` is False for them); ``None`` without a solver result (fixed-depth mode)."""
        return None if self.solver_result is None else getattr(self.solver_result, "stalled", None)

    def record_backward(self, nfe: int, *, residual: Optional[Tensor] = None, converged: Optional[bool] = None) -> None:
        """Add what one backward (or one step of it) through this solve did: the one way every layer,
        deqlab's or a researcher's, writes the ``backward_*`` fields.

        Why one method: a layer's backward runs long after its forward returned, possibly after further
        forwards of the same layer; writing into the record the forward returned (never into the layer)
        is what keeps two forwards in flight from mixing their numbers.

        Args:
            nfe: VJPs (or map evaluations) spent; added to ``backward_nfe``, so every backward through the
                solve (``retain_graph=True``) is counted.
            residual: per-sample relative residual of the adjoint solve, or ``None`` when there was none.
            converged: whether the adjoint solve met its tolerance (``True`` for an exact backprop, which
                has no tolerance to miss), or ``None`` when there was no solve (JFB, phantom gradient).

        Example:
            >>> import torch
            >>> from deqlab.nn import DeepEquilibriumSolution
            >>> from deqlab.solvers import SolverStatus
            >>> sol = DeepEquilibriumSolution(z_star=torch.zeros(1, 2), u0=None, abs_residual=torch.zeros(1),
            ...                               jacobian_loss=torch.zeros(()), skip_loss=torch.zeros(()), nfe=3,
            ...                               converged=torch.ones(1, dtype=torch.bool),
            ...                               status=SolverStatus.CONVERGED)
            >>> sol.record_backward(4, residual=torch.tensor([1e-9]), converged=True)
            >>> sol.record_backward(4, residual=torch.tensor([2e-9]), converged=True)
            >>> sol.backward_nfe, sol.backward_converged
            (8, True)
        """
        self.backward_nfe += int(nfe)
        self.backward_residual = residual
        self.backward_converged = converged


class _BackpropCounter:
    """Counts, into a solution record, the VJPs an ordinary backprop runs through recorded map evaluations
    (and, through `record`, any other backward work of a forward whose record did not exist yet when its
    graph was built).

    Used where the gradient is autograd's own (a DEQ layer in fixed-depth mode, the neural ODE with
    ``sensitivity="autograd"``): each `watch`-ed evaluation's output gets a gradient hook, and every time
    the backward reaches it, that is one VJP through the map, written with
    `DeepEquilibriumSolution.record_backward` (``converged=True``: backprop has no tolerance to miss).
    The record is bound after the forward built it (`bind`) and held weakly, so a dropped record is not
    kept alive by the graph.
    """

    def __init__(self) -> None:
        self._ref: Optional["weakref.ReferenceType[DeepEquilibriumSolution]"] = None

    def bind(self, solution: DeepEquilibriumSolution) -> None:
        """Send the counted VJPs to ``solution``."""
        self._ref = weakref.ref(solution)

    def watch(self, outputs: Sequence[Tensor]) -> None:
        """Count one VJP each time a backward reaches ``outputs`` (the parts of one map evaluation)."""
        tensors = [t for t in outputs if isinstance(t, Tensor) and t.requires_grad]
        if not tensors:
            return
        if len(tensors) == 1:
            tensors[0].register_hook(self._reached)
        else:
            torch.autograd.graph.register_multi_grad_hook(tensors, self._reached, mode="any")

    def record(self, nfe: int, *, residual: Optional[Tensor] = None, converged: Optional[bool] = None) -> None:
        """`DeepEquilibriumSolution.record_backward` on the bound record (nothing when it was dropped)."""
        solution = self._ref() if self._ref is not None else None
        if solution is not None:
            solution.record_backward(nfe, residual=residual, converged=converged)

    def _reached(self, grad: object) -> None:
        self.record(1, converged=True)
