"""How a DEQ layer solves and differentiates, as values: `SolverSpec` and `BackwardSpec`.

Why values: the paper models, the zoo and paper_repro all choose "L-Broyden or a continuous solve at
tolerance ``tol`` within ``max_steps``, and the GMRES adjoint within 15 VJPs"; written as keyword sets in each
of them, a tolerance from the command line was renamed five times on its way down and reached the adjoint
twice. Here each setting has one name and one default, and `deqlab.models.build_solver` /
`deqlab.models.build_backward` are the one builder of each.

**The adjoint's tolerance has one route**: `BackwardSpec.tol` is ``None`` unless set, meaning "the forward
solver's termination tolerance", which the DEQ layer hands to its backward mode when the backward runs
(``ImplicitBackward(tol=None)``). Nothing copies it in between.

Example:
    >>> from deqlab.spec import BackwardSpec, SolverSpec
    >>> spec = SolverSpec(kind="continuous", ode_solver="vcab3", tol=5e-2, max_steps=18, mode="rel_norm")
    >>> spec.ode_tolerance, spec.name
    (0.05, 'vcab3')
    >>> BackwardSpec(max_steps=20).tol is None   # the forward's tolerance, handed over by the layer
    True
    >>> SolverSpec(kind="discret")
    Traceback (most recent call last):
    ...
    ValueError: SolverSpec: kind must be one of 'continuous', 'discrete', got 'discret' (did you mean 'discrete'?)
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Tuple

__all__ = [
    "SolverSpec",
    "BackwardSpec",
    "SolverKind",
    "SOLVER_KINDS",
    "ODESolverName",
    "ODE_SOLVERS",
    "PAPER_TOL",
    "choose",
]

SolverKind = Literal["continuous", "discrete"]
#: ``continuous``: integrate ``du/dt = f(u) - u`` to its steady state; ``discrete``: a root finder
SOLVER_KINDS: Tuple[str, ...] = ("continuous", "discrete")
ODESolverName = Literal["tsit5", "vcab3"]
#: the continuous solver's integrators a spec names: Tsit5 (the paper's MNIST table and v1 experiments)
#: and VCAB3 (its multiscale experiments: one evaluation per step)
ODE_SOLVERS: Tuple[str, ...] = ("tsit5", "vcab3")
#: the paper's termination tolerance (abs = rel) of the MNIST forward solves
PAPER_TOL = 5e-3


def choose(owner: str, name: str, value: object, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a ``ValueError`` naming ``name``, the choices and the
    closest one (a misspelt option is an error, never a silent default)."""
    if value not in choices:
        close = difflib.get_close_matches(str(value), list(choices), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{owner}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}{hint}")
    return str(value)


def _positive(owner: str, name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _count(owner: str, name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{owner}: {name} must be an int >= 0, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class SolverSpec:
    """The forward solve of a DEQ layer.

    Attributes:
        kind: ``discrete`` (default: a root finder, ``algorithm``) or ``continuous`` (the steady state of
            ``du/dt = f(u) - u`` with ``ode_solver``).
        algorithm: the discrete algorithm. Default ``lbroyden``, the paper's.
        ode_solver: the continuous integrator, ``tsit5`` (default) or ``vcab3``.
        tol: termination tolerance, absolute = relative. Default 5e-3, the paper's MNIST value.
        max_steps: solver iterations, or integrator calls (accepted and rejected). Default 50, the paper's.
        mode: termination mode (`deqlab.solvers.TERMINATION_MODES`). Default ``rel_deq_default``.
        ode_tol: the integrator's error tolerance (abs = rel). Default ``None``: ``tol``, as the paper-era code.
        reference_counting: the convention of ``reference_nfe`` (`deqlab.solvers.counting`). Default
            ``deqjl``.
        batch_wide: one termination test over the whole batch (the reference code's). Default ``False``.
        compile: run each solver iteration as one compiled graph (the solvers' ``compile=True``,
            `docs/performance.md`). Default ``False``.
        check_every: ask the device whether every sample has stopped every ``k`` steps (the solvers'
            ``check_every``; with ``compile``, the ``k`` steps are one graph). Default 1.
        cuda_graphs: on CUDA, replay the ``check_every`` steps as one CUDA graph (the solvers'
            ``cuda_graphs``; the continuous solver needs ``compile``). Default ``False``.

    Raises:
        ValueError: a choice or number is out of range (the message names it).
    """

    kind: SolverKind = "discrete"
    algorithm: str = "lbroyden"
    ode_solver: ODESolverName = "tsit5"
    tol: float = PAPER_TOL
    max_steps: int = 50
    mode: str = "rel_deq_default"
    ode_tol: Optional[float] = None
    reference_counting: str = "deqjl"
    batch_wide: bool = False
    compile: bool = False
    check_every: int = 1
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        owner = "SolverSpec"
        for name in ("compile", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}: {name} must be True or False, got {getattr(self, name)!r}")
        if _count(owner, "check_every", self.check_every) < 1:
            raise ValueError(f"{owner}: check_every must be an int >= 1, got {self.check_every!r}")
        choose(owner, "kind", self.kind, SOLVER_KINDS)
        choose(owner, "ode_solver", self.ode_solver, ODE_SOLVERS)
        object.__setattr__(self, "tol", _positive(owner, "tol", self.tol))
        object.__setattr__(self, "max_steps", _count(owner, "max_steps", self.max_steps))
        if self.ode_tol is not None:
            object.__setattr__(self, "ode_tol", _positive(owner, "ode_tol", self.ode_tol))

    @property
    def name(self) -> str:
        """The solver's name for `deqlab.models.build_solver`: the integrator, or the discrete algorithm."""
        return self.ode_solver if self.kind == "continuous" else self.algorithm

    @property
    def ode_tolerance(self) -> float:
        """The integrator's tolerance: ``ode_tol``, else ``tol``."""
        return self.tol if self.ode_tol is None else self.ode_tol


@dataclass(frozen=True)
class BackwardSpec:
    """The implicit backward of a DEQ layer: ``(I − Jᵀ) g = dL/dz*`` solved with ``solver``.

    Attributes:
        solver: the adjoint linear solver (``gmres``, the paper's; or a fixed-point solver's name).
        max_steps: VJP budget. Default 15, the paper's ``min(maxiters, 15)``.
        tol: adjoint tolerance. Default ``None``: the forward solver's termination tolerance, handed over by
            the layer at backward time (the one route; see the module docstring).
        compile: each adjoint step's algebra as compiled graphs (``gmres``: the Arnoldi step; ``anderson``,
            ``fixed_point``, ``broyden``, ``lbroyden``: the algorithm's step around each VJP); the VJPs stay
            eager. Default ``False``.

    Raises:
        ValueError: ``max_steps`` or ``tol`` is out of range; ``compile`` is not a bool.
    """

    solver: str = "gmres"
    max_steps: int = 15
    tol: Optional[float] = None
    compile: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.compile, bool):
            raise ValueError(f"BackwardSpec: compile must be True or False, got {self.compile!r}")
        object.__setattr__(self, "max_steps", _count("BackwardSpec", "max_steps", self.max_steps))
        if self.tol is not None:
            object.__setattr__(self, "tol", _positive("BackwardSpec", "tol", self.tol))
