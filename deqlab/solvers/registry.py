"""Named solvers: ``get_solver("anderson", max_steps=30)`` and ``register_solver(name, factory)``.

Why a registry: configs (YAML, LightningCLI) name solvers by string; researchers add their own without
editing deqlab. Unknown names and unknown keywords raise with the valid choices listed.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict

from deqlab.solvers.algorithms import ALGORITHMS
from deqlab.solvers.continuous import _METHODS, ContinuousDEQSolver
from deqlab.solvers.discrete import DiscreteDEQSolver

_REGISTRY: Dict[str, Callable[..., Any]] = {}


def register_solver(name: str, factory: Callable[..., Any], *, overwrite: bool = False) -> None:
    """Make ``factory(**options)`` available as ``get_solver(name, **options)``.

    ``factory`` must return a callable ``solver(f, z0) -> SolverResult``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("solver name must be a non-empty string")
    if not callable(factory):
        raise TypeError(f"factory for {name!r} must be callable, got {type(factory).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"a solver named {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def available_solvers() -> list:
    return sorted(_REGISTRY)


def get_solver(name: str, **options: Any):
    """Build the solver registered as ``name`` with keyword ``options``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown solver {name!r}; registered solvers: {', '.join(available_solvers())}")
    factory = _REGISTRY[name]
    try:
        return factory(**options)
    except TypeError as err:
        params = getattr(factory, "valid_options", None) or list(inspect.signature(factory).parameters)
        raise TypeError(f"invalid options for solver {name!r}: {err}. Valid options: {', '.join(params)}") from None


def _discrete_factory(algorithm: str) -> Callable[..., DiscreteDEQSolver]:
    def factory(**options: Any) -> DiscreteDEQSolver:
        return DiscreteDEQSolver(algorithm, **options)

    solver_params = [p for p in inspect.signature(DiscreteDEQSolver).parameters if p not in ("algorithm", "algorithm_options")]
    algo_params = list(inspect.signature(ALGORITHMS[algorithm]).parameters)
    factory.valid_options = solver_params + algo_params
    return factory


def _continuous_factory(method: str) -> Callable[..., ContinuousDEQSolver]:
    def factory(**options: Any) -> ContinuousDEQSolver:
        return ContinuousDEQSolver(method, **options)

    factory.valid_options = [p for p in inspect.signature(ContinuousDEQSolver).parameters if p != "ode_solver"]
    return factory


for _name in ALGORITHMS:
    register_solver(_name, _discrete_factory(_name))
for _name in _METHODS:
    register_solver(f"continuous_{_name}", _continuous_factory(_name))
register_solver("continuous", _continuous_factory("tsit5"))
