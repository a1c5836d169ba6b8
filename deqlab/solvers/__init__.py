"""Batched fixed-point solvers (pure torch; importing this never imports Lightning).

Every solver is called as ``solver(f, z0) -> SolverResult``; ``f`` maps a batch-first state (a tensor of
any trailing shape, or a list of tensors for multiscale models) to a state of the same structure.
"""

from deqlab.solvers.algorithms import (
    Anderson,
    Broyden,
    FixedPointAlgorithm,
    FixedPointIteration,
    LimitedMemoryBroyden,
    NewtonKrylov,
)
from deqlab.solvers.compiled import CompileFallbackWarning
from deqlab.solvers.continuous import ContinuousDEQSolver
from deqlab.solvers.discrete import DiscreteDEQSolver
from deqlab.solvers.krylov import GMRESInfo, gmres
from deqlab.solvers.linear import GMRES, FixedPointLinearSolver
from deqlab.solvers.protocols import LinearSolver, LinearSolveResult, Solver
from deqlab.solvers.registry import available_solvers, get_solver, register_solver
from deqlab.solvers.result import ConvergenceWarning, SolverError, SolverResult, SolverStatus
from deqlab.solvers.reversible import ReversibleSolver, ReversibleState
from deqlab.solvers.sub_batch import PerSampleMap, SubBatchMap
from deqlab.solvers.termination import TERMINATION_MODES, TerminationCondition, TerminationTracker, record_iterates

__all__ = [
    "Anderson",
    "Broyden",
    "CompileFallbackWarning",
    "ContinuousDEQSolver",
    "ConvergenceWarning",
    "DiscreteDEQSolver",
    "FixedPointAlgorithm",
    "FixedPointIteration",
    "FixedPointLinearSolver",
    "GMRES",
    "GMRESInfo",
    "LimitedMemoryBroyden",
    "LinearSolveResult",
    "LinearSolver",
    "NewtonKrylov",
    "PerSampleMap",
    "ReversibleSolver",
    "ReversibleState",
    "Solver",
    "SolverError",
    "SolverResult",
    "SolverStatus",
    "SubBatchMap",
    "TERMINATION_MODES",
    "TerminationCondition",
    "TerminationTracker",
    "available_solvers",
    "get_solver",
    "gmres",
    "record_iterates",
    "register_solver",
]
