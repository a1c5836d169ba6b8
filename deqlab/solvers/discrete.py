"""``DiscreteDEQSolver``: one loop for every discrete algorithm."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from deqlab.solvers._driver import CountedMap, build_result, check_first_step, check_max_steps, prepare
from deqlab.state import State
from deqlab.solvers.algorithms import ALGORITHMS, FixedPointAlgorithm
from deqlab.solvers.result import SolverResult
from deqlab.solvers.termination import (NormKind, TerminationCondition, TerminationMode, TerminationTracker,
                                        resolve_termination)


def make_algorithm(algorithm: Union[str, FixedPointAlgorithm], **options) -> FixedPointAlgorithm:
    if isinstance(algorithm, FixedPointAlgorithm):
        if options:
            raise TypeError(f"algorithm options {sorted(options)} given with an algorithm object; set them on the object")
        return algorithm
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; valid: {', '.join(ALGORITHMS)}")
    cls = ALGORITHMS[algorithm]
    try:
        return cls(**options)
    except TypeError as err:
        import inspect

        valid = [p for p in inspect.signature(cls).parameters]
        raise TypeError(f"{err}; valid options for {algorithm!r}: {', '.join(valid)}") from None


class DiscreteDEQSolver:
    """Find ``z* = f(z*)`` with a discrete algorithm, per sample, without building a graph.

    Args:
        algorithm: ``"lbroyden"`` (default, the paper's choice), ``"broyden"``, ``"anderson"``,
            ``"fixed_point"``, ``"newton_krylov"``, or an algorithm object.
        mode: termination mode (see :mod:`deqlab.solvers.termination`); default ``"rel_deq_default"``.
        abstol_termination, reltol_termination: tolerances of the termination condition (default 1e-3).
        max_steps: iterations after the first evaluation; NFE of fixed-point iteration is ``steps + 1``.
        norm: ``"l2"`` (default) or dimension-independent ``"rms"``.
        throw: raise :class:`SolverError` instead of returning an unconverged result.
        keep_trace: record the termination objective of every step (cheap: ``(steps, B)``).
        termination: a full :class:`TerminationCondition` instead of the four flat keywords above; giving
            both raises ``ValueError`` (one way to set the stop rule, never one silently dropped).
        **algorithm_options: forwarded to the named algorithm (e.g. ``memory=5`` for Anderson).

    Calling ``solver(f, z0)`` returns a :class:`SolverResult`.
    """

    def __init__(
        self,
        algorithm: Union[str, FixedPointAlgorithm] = "lbroyden",
        *,
        mode: Optional[TerminationMode] = None,
        abstol_termination: Optional[float] = None,
        reltol_termination: Optional[float] = None,
        max_steps: int = 50,
        norm: Optional[NormKind] = None,
        throw: bool = False,
        keep_trace: bool = True,
        termination: Optional[TerminationCondition] = None,
        **algorithm_options,
    ):
        for old, new in (("abstol", "abstol_termination"), ("reltol", "reltol_termination")):
            if old in algorithm_options:
                raise TypeError(f"DiscreteDEQSolver has no {old!r} option: its tolerances are those of the "
                                f"termination condition, pass {new}=...")
        self.algorithm = make_algorithm(algorithm, **algorithm_options)
        self.termination: TerminationCondition = resolve_termination(
            termination, mode=mode, abstol_termination=abstol_termination, reltol_termination=reltol_termination,
            norm=norm, owner="DiscreteDEQSolver")
        self.max_steps = check_max_steps(max_steps)
        self.throw = bool(throw)
        self.keep_trace = bool(keep_trace)

    def __repr__(self) -> str:
        return (f"DiscreteDEQSolver({self.algorithm!r}, mode={self.termination.mode!r}, "
                f"abstol_termination={self.termination.abstol}, reltol_termination={self.termination.reltol}, "
                f"norm={self.termination.norm!r}, max_steps={self.max_steps})")

    @torch.no_grad()
    def __call__(self, f: Callable[[State], State], z0: State) -> SolverResult:
        packer, z = prepare(z0)
        F = CountedMap(f, packer)
        fz = F(z)
        g = fz - z
        tracker = TerminationTracker(self.termination, packer.batch, packer.numel, device=z.device, dtype=z.dtype,
                                     keep_trace=self.keep_trace)
        done = tracker.update(z, g, fz=fz)
        check_first_step(tracker, z)
        algo = self.algorithm
        state = algo.init(z, fz, self.max_steps)
        steps = 0
        while not done and steps < self.max_steps:
            z, fz, state = algo.step(state, z, fz, g, F)
            g = fz - z
            steps += 1
            done = tracker.update(z, g, fz=fz)
        return build_result(tracker, packer, z, g, nfe=F.nfe, steps=steps, throw=self.throw,
                            solver_name=f"DiscreteDEQSolver({algo.name})")
