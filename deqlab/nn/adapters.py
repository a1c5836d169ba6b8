"""Turn what a user passes as ``solver=`` into a [`Solver`][deqlab.solvers.Solver].

Why: a DEQ layer relies on the ``Solver`` contract (``solver(f, z0) -> SolverResult`` plus a public
``termination`` whose ``norm`` the layer uses for residuals it computes itself and whose ``tol`` is the
default adjoint tolerance). deqlab's solvers satisfy it; a researcher's plain function
``solve(f, z0) -> SolverResult`` does not declare a stop rule, so [`CallableSolver`][deqlab.nn.CallableSolver] wraps it with an
explicit, documented one instead of the layer guessing attributes.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from deqlab.solvers.protocols import Solver
from deqlab.solvers.result import SolverResult
from deqlab.solvers.termination import TerminationCondition
from deqlab.state import State

__all__ = ["CallableSolver", "as_solver"]


class CallableSolver:
    """A plain callable ``fn(f, z0) -> SolverResult`` as a [`Solver`][deqlab.solvers.Solver].

    A DEQ layer wraps a plain callable ``solver=`` in this class itself; build one explicitly to declare
    the stop rule your function applies.

    Args:
        fn: the solve, called as ``fn(f, z0)`` and returning a [`SolverResult`][deqlab.solvers.SolverResult].
            Required.
        termination: the stop rule ``fn`` applies, as a description (its ``norm`` is used for the residual
            of fixed-depth mode, its ``tol`` as the default adjoint tolerance). Default ``None``: absolute
            L2 norm, tolerance ``1e-6``: a plain function declares no rule, so a tight one is assumed;
            the adjoint, whose default tolerance this is, is then solved accurately rather than too
            loosely for a forward of unknown accuracy.

    Raises:
        TypeError: ``fn`` is not callable.

    Example:
        A researcher's own solve function (here delegating to Anderson) used as a layer's solver:

        >>> import torch
        >>> from torch import nn
        >>> from deqlab.nn import DEQ, CallableSolver
        >>> from deqlab.solvers import DiscreteDEQSolver
        >>> anderson = DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-6)
        >>> def my_solve(f, z0):
        ...     return anderson(f, z0)
        >>> solver = CallableSolver(my_solve)
        >>> solver.termination.mode, solver.termination.tol
        ('abs_norm', 1e-06)
        >>> class Half(nn.Module):
        ...     def forward(self, z, x):
        ...         return 0.5 * z + x
        >>> deq = DEQ(Half(), my_solve)                  # wrapped in a CallableSolver by the layer
        >>> type(deq.solver).__name__, deq(torch.ones(2, 3))[1].status.value
        ('CallableSolver', 'converged')
    """

    def __init__(
        self,
        fn: Callable[[Callable[[State], State], State], SolverResult],
        *,
        termination: Optional[TerminationCondition] = None,
    ):
        if not callable(fn):
            raise TypeError(f"CallableSolver: fn must be callable as fn(f, z0), got {fn!r}")
        self.fn = fn
        self.termination = (
            termination if termination is not None else TerminationCondition(mode="abs_norm", abstol=1e-6, reltol=1e-6)
        )

    def __call__(self, f: Callable[[State], State], z0: State) -> SolverResult:
        return self.fn(f, z0)

    def __repr__(self) -> str:
        return f"CallableSolver({self.fn!r})"


def as_solver(solver: Any, owner: str = "DEQ") -> Solver:
    """A registered name, a [`Solver`][deqlab.solvers.Solver], or a plain callable (wrapped in
    [`CallableSolver`][deqlab.nn.CallableSolver]); anything else raises ``TypeError``."""
    if isinstance(solver, type):
        raise TypeError(
            f"{owner}: solver is the class {solver.__name__}, not a solver; create one, e.g. "
            f"solver={solver.__name__}() (with its options in the parentheses)"
        )
    if isinstance(solver, str):
        from deqlab.solvers.registry import get_solver

        solver = get_solver(solver)
    if isinstance(solver, Solver):
        return solver
    if callable(solver):
        return CallableSolver(solver)
    raise TypeError(
        f"{owner}: solver must be a Solver (e.g. DiscreteDEQSolver(...)), a registered solver name "
        f"or a callable solver(f, z0) -> SolverResult, got {solver!r}"
    )
