"""The typed contracts of deqlab's solvers: what a layer may rely on, and nothing more.

Why protocols: a DEQ layer, the implicit backward and the Lightning module must drive *any* solver a
researcher writes, not only deqlab's. They therefore talk to solvers through two small public contracts
instead of reaching into attributes:

* [`Solver`][deqlab.solvers.Solver] finds a fixed point: ``solver(f, z0) -> SolverResult`` and publishes its stop rule as
  ``solver.termination`` (a [`TerminationCondition`][deqlab.solvers.TerminationCondition], whose ``norm`` the layer uses
  for the residuals it reports itself, e.g. in fixed-depth mode).
* [`LinearSolver`][deqlab.solvers.LinearSolver] solves ``A x = b`` per sample from matrix-vector products:
  ``solver.solve(matvec, b) -> LinearSolveResult``. The implicit backward's adjoint system
  ``(I - Jᵀ) g = dL/dz*`` is such a system; [`GMRES`][deqlab.solvers.GMRES] solves it directly and
  [`FixedPointLinearSolver`][deqlab.solvers.FixedPointLinearSolver] turns any fixed-point [`Solver`][deqlab.solvers.Solver] into one.

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
    """A fixed-point solver: ``solver(f, z0)`` returns a [`SolverResult`][deqlab.solvers.SolverResult] for ``z* = f(z*)``.

    ``f`` maps a batch-first state (tensor or list of tensors) to a state of the same structure; the
    solver must not build an autograd graph (layers call it under ``torch.no_grad``), must stop within
    its own step budget, and must report an honest ``status``. ``termination`` describes its stop rule.

    A protocol, not a base class: any object with a ``termination`` attribute and that call signature is
    a ``Solver`` (no inheritance needed); ``isinstance(obj, Solver)`` checks that the attributes exist.

    Attributes:
        termination: the solver's stop rule; a layer reads its ``norm`` to report residuals the same way.

    Raises:
        TypeError: on ``Solver()`` itself: a protocol cannot be instantiated; write a class that has the
            attributes (or use [`DiscreteDEQSolver`][deqlab.solvers.DiscreteDEQSolver]).

    Example:
        >>> import torch
        >>> from deqlab.solvers import DiscreteDEQSolver, Solver, TerminationCondition
        >>> class TenPicardSteps:   # no inheritance: the attributes make it a Solver
        ...     termination = TerminationCondition("abs_norm", abstol=1e-2)
        ...     def __call__(self, f, z0):
        ...         return DiscreteDEQSolver("fixed_point", termination=self.termination, max_steps=10)(f, z0)
        >>> isinstance(TenPicardSteps(), Solver), isinstance(DiscreteDEQSolver(), Solver)
        (True, True)
        >>> res = TenPicardSteps()(lambda z: 0.5 * z + 1, torch.zeros(1, 2, dtype=torch.float64))
        >>> res.status, res.z.round(decimals=2)
        (<SolverStatus.CONVERGED: 'converged'>, tensor([[1.9900, 1.9900]], dtype=torch.float64))
    """

    termination: TerminationCondition

    def __call__(self, f: Callable[[State], State], z0: State) -> SolverResult:
        """Find ``z* = f(z*)`` for every sample, starting from ``z0``.

        Args:
            f: the map, from a state to a state of the same structure, shapes and dtype.
            z0: the batch-first initial guess (a tensor or a list of tensors).

        Returns:
            The [`SolverResult`][deqlab.solvers.SolverResult], its ``z`` structured like ``z0``.
        """
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

    Example:
        >>> import torch
        >>> from deqlab.solvers import GMRES
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> out = GMRES(tol=1e-10).solve(lambda v: v @ A.T, torch.tensor([[1.0, 2.0]], dtype=torch.float64))
        >>> out.x, out.matvecs, out.all_converged
        (tensor([[0.2000, 0.6000]], dtype=torch.float64), 2, True)
    """

    x: Tensor
    matvecs: int
    iterations: int
    residual: Tensor
    converged: Tensor

    @property
    def all_converged(self) -> bool:
        """True when every sample met the tolerance."""
        return bool(self.converged.all())


@runtime_checkable
class LinearSolver(Protocol):
    """Solves ``A x = b`` per sample for ``b`` of shape ``(B, N)`` given ``matvec(v) = A v``.

    ``tol`` (relative) and ``max_steps`` (matrix-vector products at most) are public so callers and
    logs can state the budget a solve had. Like [`Solver`][deqlab.solvers.Solver], a protocol: any object with these
    attributes and a ``solve`` method qualifies. In the implicit backward, ``matvec`` is one VJP.

    Attributes:
        tol: relative tolerance on ``||b - A x|| / ||b||`` per sample.
        max_steps: matrix-vector products at most.

    Raises:
        TypeError: on ``LinearSolver()`` itself: a protocol cannot be instantiated; use
            [`GMRES`][deqlab.solvers.GMRES] or [`FixedPointLinearSolver`][deqlab.solvers.FixedPointLinearSolver], or write
            a class with these attributes.

    Example:
        >>> import torch
        >>> from deqlab.solvers import GMRES, LinearSolver
        >>> solver = GMRES(tol=1e-10, max_steps=10)
        >>> isinstance(solver, LinearSolver), solver.tol, solver.max_steps
        (True, 1e-10, 10)
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> solver.solve(lambda v: v @ A.T, torch.tensor([[1.0, 2.0]], dtype=torch.float64)).x
        tensor([[0.2000, 0.6000]], dtype=torch.float64)
    """

    tol: float
    max_steps: int

    def solve(self, matvec: Callable[[Tensor], Tensor], b: Tensor, *, x0: Optional[Tensor] = None) -> LinearSolveResult:
        """Solve ``A x = b`` for every row of ``b``.

        Args:
            matvec: maps a ``(B, N)`` batch of vectors ``v`` to ``A v`` per sample.
            b: the ``(B, N)`` right-hand sides.
            x0: an initial guess (``None``: the solver's own, usually zeros or ``b``).

        Returns:
            The [`LinearSolveResult`][deqlab.solvers.LinearSolveResult].
        """
        ...
