"""Named solvers: ``get_solver("anderson", max_steps=30)`` and ``register_solver(name, factory)``.

Why a registry: configs (YAML, LightningCLI) name solvers by string; researchers add their own without
editing deqlab. Unknown names and unknown keywords raise with the valid choices listed.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, cast

from deqlab.solvers.algorithms import ALGORITHMS
from deqlab.solvers.continuous import _METHODS, ContinuousDEQSolver, ODEMethod
from deqlab.solvers.discrete import DiscreteDEQSolver
from deqlab.solvers.reversible import ReversibleSolver

_REGISTRY: Dict[str, Callable[..., Any]] = {}


def register_solver(name: str, factory: Callable[..., Any], *, overwrite: bool = False) -> None:
    """Make ``factory(**options)`` available as ``get_solver(name, **options)``.

    ``factory`` must return a callable ``solver(f, z0) -> SolverResult``. Registered names work wherever
    deqlab takes a solver name (configs, LightningCLI, the implicit backward's ``solver=``).

    Args:
        name: the non-empty name to register.
        factory: a callable taking keyword options and returning a solver (a class works). If it has a
            ``valid_options`` attribute (a list of names), [`get_solver`][deqlab.solvers.get_solver] lists those when a caller
            passes an unknown option; otherwise the signature's parameters are listed.
        overwrite: replace a solver already registered under ``name``. Default ``False``: a typo or a
            second import must not silently replace another solver (e.g. the built-in ``"anderson"``).

    Raises:
        ValueError: ``name`` is not a non-empty string, or is taken and ``overwrite`` is ``False``.
        TypeError: ``factory`` is not callable.

    Example:
        >>> import torch
        >>> from deqlab.solvers import DiscreteDEQSolver, get_solver, register_solver
        >>> def slow_picard(damping=0.5, **options):
        ...     return DiscreteDEQSolver("fixed_point", damping=damping, **options)
        >>> register_solver("slow_picard", slow_picard, overwrite=True)   # overwrite: re-runnable here
        >>> res = get_solver("slow_picard", mode="abs_norm", abstol_termination=1e-8, max_steps=200)(
        ...     lambda z: 0.5 * z + 1, torch.zeros(1, 2, dtype=torch.float64))
        >>> res.status, res.z.round(decimals=6)
        (<SolverStatus.CONVERGED: 'converged'>, tensor([[2., 2.]], dtype=torch.float64))
        >>> register_solver("anderson", slow_picard)
        Traceback (most recent call last):
        ...
        ValueError: a solver named 'anderson' is already registered; pass overwrite=True to replace it
    """
    if not isinstance(name, str) or not name:
        raise ValueError("solver name must be a non-empty string")
    if not callable(factory):
        raise TypeError(f"factory for {name!r} must be callable, got {type(factory).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"a solver named {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def available_solvers() -> list:
    """The names [`get_solver`][deqlab.solvers.get_solver] accepts: the built-ins and every
    [`register_solver`][deqlab.solvers.register_solver] name.

    Returns:
        A new, sorted list of the registered names.

    Example:
        >>> from deqlab.solvers import available_solvers
        >>> available_solvers()   # the built-ins (and any solver registered since)
        ['anderson', 'broyden', 'continuous', 'continuous_dopri5', 'continuous_euler', 'continuous_rk4',
         'continuous_tsit5', 'continuous_vcab3', 'fixed_point', 'lbroyden', 'newton_krylov', 'reversible'...]
    """
    return sorted(_REGISTRY)


def get_solver(name: str, **options: Any):
    """Build the solver registered as ``name`` with keyword ``options``.

    Why by name: configs (YAML, LightningCLI) name solvers by string. The built-in discrete names
    (``"anderson"``, ``"lbroyden"``, ...) build a [`DiscreteDEQSolver`][deqlab.solvers.DiscreteDEQSolver] and take its
    options and the algorithm's together; ``"continuous"`` (Tsit5) and ``"continuous_<method>"`` build a
    [`ContinuousDEQSolver`][deqlab.solvers.ContinuousDEQSolver]; ``"reversible"`` builds a
    [`ReversibleSolver`][deqlab.solvers.ReversibleSolver] (a DEQ layer given it picks its
    [`ReversibleBackward`][deqlab.nn.ReversibleBackward]).

    Args:
        name: a registered name (see [`available_solvers`][deqlab.solvers.available_solvers]).
        **options: keyword options for the solver's factory (e.g. ``max_steps=30``, ``memory=5``).

    Returns:
        The solver the factory built: a callable ``solver(f, z0) -> SolverResult``.

    Raises:
        ValueError: ``name`` is not registered (the message lists the registered names).
        TypeError: the factory rejects an option (the message lists the valid options).

    Example:
        >>> import torch
        >>> from deqlab.solvers import get_solver
        >>> solver = get_solver("anderson", memory=3, mode="abs_norm", abstol_termination=1e-10)
        >>> solver
        DiscreteDEQSolver(Anderson(memory=3, mixing=1.0, regularization=1e-08), mode='abs_norm',
            abstol_termination=1e-10, reltol_termination=0.001, norm='l2', max_steps=50)
        >>> solver(lambda z: 0.5 * z + 1, torch.zeros(1, 2, dtype=torch.float64)).z.round(decimals=6)
        tensor([[2., 2.]], dtype=torch.float64)
        >>> get_solver("andersen")
        Traceback (most recent call last):
        ...
        ValueError: unknown solver 'andersen'; registered solvers: anderson, broyden, ...
    """
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

    solver_params = [
        p for p in inspect.signature(DiscreteDEQSolver).parameters if p not in ("algorithm", "algorithm_options")
    ]
    algo_params = list(inspect.signature(ALGORITHMS[algorithm]).parameters)
    factory.valid_options = solver_params + algo_params  # type: ignore[attr-defined]  # read back by get_solver
    return factory


def _continuous_factory(method: str) -> Callable[..., ContinuousDEQSolver]:
    def factory(**options: Any) -> ContinuousDEQSolver:
        return ContinuousDEQSolver(cast(ODEMethod, method), **options)  # a key of _METHODS

    valid = [p for p in inspect.signature(ContinuousDEQSolver).parameters if p != "ode_solver"]
    factory.valid_options = valid  # type: ignore[attr-defined]  # a function attribute, read back by get_solver
    return factory


for _name in ALGORITHMS:
    register_solver(_name, _discrete_factory(_name))
for _name in _METHODS:
    register_solver(f"continuous_{_name}", _continuous_factory(_name))
register_solver("continuous", _continuous_factory("tsit5"))
register_solver("reversible", ReversibleSolver)
