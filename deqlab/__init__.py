"""deqlab: Deep Equilibrium Networks (DEQ, Skip DEQ, Skip Reg. DEQ, continuous DEQ) for PyTorch.

``import deqlab`` never imports Lightning: the Lightning integration (``DEQLightningModule`` and
friends) is loaded on first access.
"""
from deqlab.solvers import (
    ContinuousDEQSolver,
    DiscreteDEQSolver,
    SolverError,
    SolverResult,
    SolverStatus,
    get_solver,
    register_solver,
)

__version__ = "0.1.0"

__all__ = [
    "ContinuousDEQSolver",
    "DiscreteDEQSolver",
    "SolverError",
    "SolverResult",
    "SolverStatus",
    "get_solver",
    "register_solver",
]
