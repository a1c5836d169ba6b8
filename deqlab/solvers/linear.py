"""Linear solvers behind the [`LinearSolver`][deqlab.solvers.LinearSolver] contract.

* [`GMRES`][deqlab.solvers.GMRES]: batched matrix-free GMRES ([`deqlab.solvers.gmres`][deqlab.solvers.gmres]); the paper's adjoint solver.
  It solves ``(I - Jᵀ) g = v`` whether or not ``f`` is a contraction.
* [`FixedPointLinearSolver`][deqlab.solvers.FixedPointLinearSolver]: any fixed-point [`Solver`][deqlab.solvers.Solver] applied to
  ``x = x - A x + b`` (for ``A = I - M``: ``x = M x + b``), so Anderson, Broyden or plain iteration can
  serve as the adjoint solver under the same contract.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Optional, cast

import torch
from torch import Tensor

from deqlab.solvers.compiled import CompileOption, check_compile_option
from deqlab.solvers.krylov import gmres
from deqlab.solvers.protocols import LinearSolveResult, Solver
from deqlab.state import State, batch_norm

__all__ = ["FixedPointLinearSolver", "GMRES"]


def _check_budget(owner: str, tol: float, max_steps: int) -> None:
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"{owner}: tol must be a finite number >= 0, got {tol!r}")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise ValueError(f"{owner}: max_steps must be an int >= 1, got {max_steps!r}")


class GMRES:
    """Batched matrix-free GMRES as a [`LinearSolver`][deqlab.solvers.LinearSolver].

    The implicit backward's default adjoint solver: it solves ``(I - Jᵀ) g = v`` whether or not ``f`` is
    a contraction at ``z*``, and stops per sample at its tolerance. A thin wrapper of
    [`gmres`][deqlab.solvers.gmres] that states its budget in matrix-vector products.

    Args:
        tol: relative tolerance ``||b - A x|| <= tol * ||b||`` per sample. Default ``1e-6``: the gradient
            error then stays far below what the forward tolerance (``1e-3`` by default) already costs,
            at a few products more than a loose tolerance.
        max_steps: matrix-vector products at most (the VJP budget of an implicit backward). Default 50:
            a well-conditioned adjoint system converges in 10-20 products, so the cap only binds on a
            system that would otherwise cost far more than the forward solve.
        restart: Krylov subspace size per cycle; ``None`` (default) means one cycle of ``max_steps`` (no
            restart), which converges fastest per product as long as memory allows ``max_steps`` basis
            vectors. Set it when ``max_steps`` vectors of the state's size per sample do not fit.
        atol: absolute tolerance; a sample stops once its residual is below ``max(tol * ||b||, atol)``.
            Default ``0.0``: purely relative (a zero right-hand side needs no product either way).
        compile: each Arnoldi step's algebra as one compiled graph (`gmres`'s ``compile``; the products
            stay eager). Default ``False``.

    Raises:
        ValueError: ``tol`` is not a finite number >= 0, ``max_steps`` is not an int >= 1, ``restart`` is
            neither ``None`` nor an int >= 1, or ``atol`` is not a finite number >= 0.

    Example:
        >>> import torch
        >>> from deqlab.solvers import GMRES
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> solver = GMRES(tol=1e-10, max_steps=30)
        >>> solver
        GMRES(tol=1e-10, max_steps=30, restart=None, atol=0.0)
        >>> out = solver.solve(lambda v: v @ A.T, torch.tensor([[1.0, 2.0]], dtype=torch.float64))
        >>> out.x, out.matvecs, out.converged
        (tensor([[0.2000, 0.6000]], dtype=torch.float64), 2, tensor([True]))
    """

    def __init__(
        self,
        tol: float = 1e-6,
        max_steps: int = 50,
        *,
        restart: Optional[int] = None,
        atol: float = 0.0,
        compile: CompileOption = False,
    ):
        _check_budget("GMRES", tol, max_steps)
        if restart is not None and (not isinstance(restart, int) or restart < 1):
            raise ValueError(f"GMRES: restart must be an int >= 1 or None, got {restart!r}")
        if not math.isfinite(atol) or atol < 0:
            raise ValueError(f"GMRES: atol must be a finite number >= 0, got {atol!r}")
        self.tol = float(tol)
        self.max_steps = int(max_steps)
        self.restart = restart
        self.atol = float(atol)
        self.compile = check_compile_option("GMRES", compile)

    def solve(self, matvec: Callable[[Tensor], Tensor], b: Tensor, *, x0: Optional[Tensor] = None) -> LinearSolveResult:
        """Solve ``A x = b`` per sample within ``max_steps`` products.

        Args:
            matvec: maps a ``(B, N)`` batch of vectors ``v`` to ``A v`` per sample.
            b: the ``(B, N)`` right-hand sides.
            x0: initial guess; ``None`` starts from zeros (one product cheaper).

        Returns:
            The [`LinearSolveResult`][deqlab.solvers.LinearSolveResult]; ``residual`` is relative.

        Raises:
            ValueError: ``b`` is not ``(B, N)`` (from [`gmres`][deqlab.solvers.gmres]).
        """
        restart = min(self.restart or self.max_steps, self.max_steps)
        x, info = gmres(
            matvec,
            b,
            x0=x0,
            tol=self.tol,
            atol=self.atol,
            restart=restart,
            max_restarts=max(1, -(-self.max_steps // restart)),
            compile=self.compile,
        )
        return LinearSolveResult(
            x=x, matvecs=info.matvecs, iterations=info.iterations, residual=info.residual, converged=info.converged
        )

    def __repr__(self) -> str:
        return (
            f"GMRES(tol={self.tol}, max_steps={self.max_steps}, restart={self.restart}, atol={self.atol}"
            + (f", compile={self.compile!r}" if self.compile is not False else "")
            + ")"
        )


class _BudgetSpent(Exception):
    """Raised inside the wrapped solver's map when the product budget is spent (caught by `solve`)."""


class FixedPointLinearSolver:
    """Solve ``A x = b`` with a fixed-point [`Solver`][deqlab.solvers.Solver] on ``x = x - A x + b``.

    Converges when ``I - A`` is a contraction (for the adjoint system: when ``f`` is one at ``z*``).
    The fixed-point solver's own termination decides when to stop, within ``max_steps`` matrix-vector
    products that this class enforces: once they are spent the solve ends at the last iterate, so the
    reported budget is the one that governs. The reported ``residual``/``converged`` are recomputed from
    ``b - A x`` with one extra product (inside the budget), so they are true whatever the wrapped solver's
    stop rule is.

    Why: the adjoint system of a DEQ is a linear fixed-point problem ``g = Jᵀ g + v``, so the forward
    solver's own algorithm (Anderson, Broyden, plain iteration) can solve it, one VJP per step.

    Args:
        solver: the fixed-point [`Solver`][deqlab.solvers.Solver] to run on ``x = x - A x + b`` (e.g. a
            [`DiscreteDEQSolver`][deqlab.solvers.DiscreteDEQSolver]); required, there is no sensible default
            algorithm for every system. Its termination's ``tol`` becomes `tol`. Per-sample early exit
            (``DiscreteDEQSolver(per_sample_exit=True)``) is refused: the adjoint map is a plain function of
            the whole batch, which cannot be restricted to the samples still iterating. A solver built with
            ``compile=`` is used as a copy with ``compile_map=False``: its algebra is compiled around the
            eager products (a VJP cannot be traced); the object you pass is not changed.
        max_steps: matrix-vector products at most (each one VJP in the implicit backward), the residual
            check included. Default ``None``: taken from a
            [`DiscreteDEQSolver`][deqlab.solvers.DiscreteDEQSolver]'s own cap, ``solver.max_steps + 2`` (its
            first evaluation, one per step, and the check), so the solver is never cut short. For any other
            solver it must be given: the ``Solver`` contract does not say how many evaluations a solver
            spends (a continuous solver's ``max_steps`` counts ODE steps of several evaluations each), and a
            guessed budget would be reported without governing.

    Raises:
        TypeError: ``solver`` is not a [`Solver`][deqlab.solvers.Solver] (callable, with a ``termination``).
        ValueError: ``max_steps`` is not an int >= 1, or is ``None`` for a solver other than a
            ``DiscreteDEQSolver``; ``solver`` has ``per_sample_exit=True``.

    Example:
        >>> import torch
        >>> from deqlab.solvers import DiscreteDEQSolver, FixedPointLinearSolver
        >>> M = torch.tensor([[0.5, 0.1], [0.0, 0.3]], dtype=torch.float64)   # A = I - M, M contracts
        >>> lin = FixedPointLinearSolver(DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-10))
        >>> lin.tol, lin.max_steps                       # 50 steps: 51 evaluations + the residual check
        (1e-10, 52)
        >>> out = lin.solve(lambda v: v - v @ M.T, torch.tensor([[1.0, 1.0]], dtype=torch.float64))
        >>> out.x.round(decimals=6), out.all_converged   # x = (I - M)^-1 b
        (tensor([[2.2857, 1.4286]], dtype=torch.float64), True)
        >>> short = FixedPointLinearSolver(DiscreteDEQSolver("fixed_point", max_steps=100), max_steps=4)
        >>> short.solve(lambda v: v - v @ M.T, torch.tensor([[1.0, 1.0]], dtype=torch.float64)).matvecs
        4
    """

    def __init__(self, solver: Solver, *, max_steps: Optional[int] = None):
        from deqlab.solvers.discrete import DiscreteDEQSolver

        if not isinstance(solver, Solver):
            raise TypeError(
                f"FixedPointLinearSolver needs a fixed-point Solver (callable with a `termination`), got {solver!r}"
            )
        if isinstance(solver, DiscreteDEQSolver) and solver.per_sample_exit:
            raise ValueError(
                f"FixedPointLinearSolver: per-sample exit is not supported for linear (adjoint) solves: the "
                f"adjoint map g -> J^T g + v is a function of the whole batch and cannot be restricted to the "
                f"samples still iterating. Pass the solver with per_sample_exit=False, got {solver!r}"
            )
        if max_steps is None:
            if not isinstance(solver, DiscreteDEQSolver):
                raise ValueError(
                    f"FixedPointLinearSolver: cannot tell how many products {solver!r} may spend (the Solver "
                    f"contract has no evaluation budget); pass max_steps=N, the matrix-vector products at most "
                    f"(the residual check included), e.g. FixedPointLinearSolver(solver, max_steps=30)"
                )
            max_steps = int(solver.max_steps) + 2
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"FixedPointLinearSolver: max_steps must be an int >= 1, got {max_steps!r}")
        if isinstance(solver, DiscreteDEQSolver) and solver.compile is not False and solver.compile_map:
            # the matvec is an autograd VJP (and the budget check host code): neither can be traced, so a
            # compiled solver compiles its algebra around an eager matvec (compile_map=False)
            solver = copy.copy(solver)
            solver.compile_map = False
        self.solver = solver
        self.tol = float(solver.termination.tol)
        self.max_steps = int(max_steps)
        # Newton-Krylov with jvp="fd" differentiates the matvec by finite differences: in half precision the
        # implicit backward must then feed it products that resolve a ~3e-4 perturbation (deqlab.nn.implicit)
        from deqlab.solvers.algorithms import NewtonKrylov

        algorithm = solver.algorithm if isinstance(solver, DiscreteDEQSolver) else None
        self.finite_differences = isinstance(algorithm, NewtonKrylov) and algorithm.jvp == "fd"

    def solve(self, matvec: Callable[[Tensor], Tensor], b: Tensor, *, x0: Optional[Tensor] = None) -> LinearSolveResult:
        """Solve ``A x = b`` with the wrapped fixed-point solver within ``max_steps`` products.

        Args:
            matvec: maps a ``(B, N)`` batch of vectors ``v`` to ``A v`` per sample.
            b: the ``(B, N)`` right-hand sides.
            x0: initial guess; ``None`` starts from ``b`` (the first term of the Neumann series of
                ``(I - M)^-1 b``).

        Returns:
            The [`LinearSolveResult`][deqlab.solvers.LinearSolveResult]; ``matvecs`` counts every product, the final
            residual check included (never more than ``max_steps``).
        """
        count = 0
        x = b.clone() if x0 is None else x0
        last = x

        def step(z: Tensor) -> Tensor:
            nonlocal count, last
            if count >= self.max_steps - 1:  # keep one product for the residual check
                raise _BudgetSpent
            count += 1
            last = z - matvec(z) + b
            return last

        try:  # a tensor state: the solver hands step tensors and returns one
            res = self.solver(cast(Callable[[State], State], step), x)
            x, iterations = cast(Tensor, res.z), int(res.steps)
        except _BudgetSpent:
            x, iterations = last, count
        r = b - matvec(x)
        count += 1
        tiny = torch.finfo(b.dtype).tiny ** 0.5
        rel = batch_norm(r) / batch_norm(b).clamp_min(tiny)
        converged = rel <= self.tol * (1 + 1e-6) + tiny
        return LinearSolveResult(x=x, matvecs=count, iterations=iterations, residual=rel, converged=converged)

    def __repr__(self) -> str:
        return f"FixedPointLinearSolver({self.solver!r}, max_steps={self.max_steps})"
