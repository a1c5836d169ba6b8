"""The typed contracts of deqlab's solvers: what a layer may rely on, and nothing more.

Why protocols: a DEQ layer, the implicit backward and the Lightning module must drive *any* solver a
researcher writes, not only deqlab's. They therefore talk to solvers through two small public contracts
instead of reaching into attributes:

* :class:`Solver` finds a fixed point: ``solver(f, z0) -> SolverResult`` and publishes its stop rule as
  ``solver.termination`` (a :class:`~deqlab.solvers.TerminationCondition`, whose ``norm`` the layer uses
  for the residuals it reports itself, e.g. in fixed-depth mode).
* :class:`LinearSolver` solves ``A x = b`` per sample from matrix-vector products:
  ``solver.solve(matvec, b) -> LinearSolveResult``. The implicit backward's adjoint system
  ``(I - Jᵀ) g = dL/dz*`` is such a system; :class:`~deqlab.solvers.GMRES` solves it directly and
  :class:`~deqlab.solvers.FixedPointLinearSolver` turns any fixed-point :class:`Solver` into one.

Both are ``runtime_checkable``: ``isinstance(obj, Solver)`` checks the attributes exist.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, runtime_checkable

from torch import Tensor

from deqlab.solvers.result import SolverResult
from deqlab.solvers.termination import TerminationCondition
from deqlab.state import State

__all__ = ["LinearSolveResult", "LinearSolver", "Solver"]


@runtime_checkable
class Solver(Protocol):
    """A fixed-point solver: ``solver(f, z0)`` returns a :class:`SolverResult` for ``z* = f(z*)``.

    ``f`` maps a batch-first state (tensor or list of tensors) to a state of the same structure; the
    solver must not build an autograd graph (layers call it under ``torch.no_grad``), must stop within
    its own step budget, and must report an honest ``status``. ``termination`` describes its stop rule.
    """

    termination: TerminationCondition

    def __call__(self, f: Callable[[State], State], z0: State) -> SolverResult:
        ...


@dataclass
class LinearSolveResult:
    """What a linear solve did.

    Attributes:
        x: the solution, ``(B, N)``.
        matvecs: matrix-vector products spent (each one VJP in the implicit backward).
        iterations: solver iterations.
        residual: per-sample relative residual ``||b - A x|| / ||b||`` (shape ``(B,)``).
        converged: per-sample bool mask: the residual met the tolerance.
    """

    x: Tensor
    matvecs: int
    iterations: int
    residual: Tensor
    converged: Tensor

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


@runtime_checkable
class LinearSolver(Protocol):
    """Solves ``A x = b`` per sample for ``b`` of shape ``(B, N)`` given ``matvec(v) = A v``.

    ``tol`` (relative) and ``max_steps`` (matrix-vector products at most) are public so callers and
    logs can state the budget a solve had.
    """

    tol: float
    max_steps: int

    def solve(self, matvec: Callable[[Tensor], Tensor], b: Tensor, *, x0: Optional[Tensor] = None
              ) -> LinearSolveResult:
        ...
