"""Linear solvers behind the :class:`~deqlab.solvers.LinearSolver` contract.

* :class:`GMRES`: batched matrix-free GMRES (:func:`deqlab.solvers.gmres`); the paper's adjoint solver.
  It solves ``(I - Jᵀ) g = v`` whether or not ``f`` is a contraction.
* :class:`FixedPointLinearSolver`: any fixed-point :class:`~deqlab.solvers.Solver` applied to
  ``x = x - A x + b`` (for ``A = I - M``: ``x = M x + b``), so Anderson, Broyden or plain iteration can
  serve as the adjoint solver under the same contract.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from deqlab.solvers.krylov import gmres
from deqlab.solvers.protocols import LinearSolveResult, Solver
from deqlab.state import batch_norm

__all__ = ["FixedPointLinearSolver", "GMRES"]


def _check_budget(owner: str, tol: float, max_steps: int) -> None:
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"{owner}: tol must be a finite number >= 0, got {tol!r}")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise ValueError(f"{owner}: max_steps must be an int >= 1, got {max_steps!r}")


class GMRES:
    """Batched matrix-free GMRES as a :class:`~deqlab.solvers.LinearSolver`.

    Args:
        tol: relative tolerance ``||b - A x|| <= tol * ||b||`` per sample.
        max_steps: matrix-vector products at most (the VJP budget of an implicit backward).
        restart: Krylov subspace size per cycle; ``None`` means one cycle of ``max_steps`` (no restart),
            which converges fastest per product as long as memory allows ``max_steps`` basis vectors.
        atol: absolute tolerance, so a zero right-hand side needs no product.

    Example::

        solver = GMRES(tol=1e-6, max_steps=30)
        out = solver.solve(lambda v: v @ A.T, b)   # out.x, out.matvecs, out.converged
    """

    def __init__(self, tol: float = 1e-6, max_steps: int = 50, *, restart: Optional[int] = None,
                 atol: float = 0.0):
        _check_budget("GMRES", tol, max_steps)
        if restart is not None and (not isinstance(restart, int) or restart < 1):
            raise ValueError(f"GMRES: restart must be an int >= 1 or None, got {restart!r}")
        if not math.isfinite(atol) or atol < 0:
            raise ValueError(f"GMRES: atol must be a finite number >= 0, got {atol!r}")
        self.tol = float(tol)
        self.max_steps = int(max_steps)
        self.restart = restart
        self.atol = float(atol)

    def solve(self, matvec: Callable[[Tensor], Tensor], b: Tensor, *, x0: Optional[Tensor] = None
              ) -> LinearSolveResult:
        restart = min(self.restart or self.max_steps, self.max_steps)
        x, info = gmres(matvec, b, x0=x0, tol=self.tol, atol=self.atol, restart=restart,
                        max_restarts=max(1, -(-self.max_steps // restart)))
        return LinearSolveResult(x=x, matvecs=info.matvecs, iterations=info.iterations, residual=info.residual,
                                 converged=info.converged)

    def __repr__(self) -> str:
        return f"GMRES(tol={self.tol}, max_steps={self.max_steps}, restart={self.restart}, atol={self.atol})"


class FixedPointLinearSolver:
    """Solve ``A x = b`` with a fixed-point :class:`~deqlab.solvers.Solver` on ``x = x - A x + b``.

    Converges when ``I - A`` is a contraction (for the adjoint system: when ``f`` is one at ``z*``).
    The fixed-point solver's own termination decides when to stop; ``tol`` and ``max_steps`` here only
    describe the budget (read from the wrapped solver's termination and step cap). The reported
    ``residual``/``converged`` are recomputed from ``b - A x`` with one extra product, so they are true
    whatever the wrapped solver's stop rule is.
    """

    def __init__(self, solver: Solver):
        if not isinstance(solver, Solver):
            raise TypeError(f"FixedPointLinearSolver needs a fixed-point Solver (callable with a `termination`), "
                            f"got {solver!r}")
        self.solver = solver
        self.tol = float(solver.termination.tol)
        self.max_steps = int(getattr(solver, "max_steps", 0) or 0) + 1

    def solve(self, matvec: Callable[[Tensor], Tensor], b: Tensor, *, x0: Optional[Tensor] = None
              ) -> LinearSolveResult:
        count = 0

        def step(x: Tensor) -> Tensor:
            nonlocal count
            count += 1
            return x - matvec(x) + b

        res = self.solver(step, b.clone() if x0 is None else x0)
        x = res.z
        r = b - matvec(x)
        count += 1
        tiny = torch.finfo(b.dtype).tiny ** 0.5
        rel = batch_norm(r) / batch_norm(b).clamp_min(tiny)
        converged = rel <= self.tol * (1 + 1e-6) + tiny
        return LinearSolveResult(x=x, matvecs=count, iterations=int(res.steps), residual=rel, converged=converged)

    def __repr__(self) -> str:
        return f"FixedPointLinearSolver({self.solver!r})"
