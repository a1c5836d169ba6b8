"""Batched fixed-point solvers (pure torch; importing this never imports Lightning)."""
from deqlab.solvers.result import SolverError, SolverResult, SolverStatus

__all__ = ["SolverError", "SolverResult", "SolverStatus"]
