"""``DiscreteDEQSolver``: one loop for every discrete algorithm."""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from deqlab import instrument
from deqlab.solvers._checks import check_int, check_number, unknown_keyword
from deqlab.solvers._driver import CountedMap, build_result, check_first_step, check_max_steps, empty_result, prepare
from deqlab.solvers.algorithms import ALGORITHMS, FixedPointAlgorithm
from deqlab.solvers.compiled import (
    CompileOption,
    MapRaised,
    check_compile_option,
    compile_available,
    compiled_discrete_step,
    fallback_warning,
    unsupported,
)
from deqlab.solvers.counting import ReferenceCounting, check_reference_counting, reference_nfe
from deqlab.solvers.result import SolverResult
from deqlab.solvers.sub_batch import SubBatchMap
from deqlab.solvers.termination import (
    NormKind,
    TerminationCondition,
    TerminationMode,
    TerminationTracker,
    export_device_state,
    load_device_state,
    resolve_termination,
)
from deqlab.state import State

#: where a tolerance lives, for ``tol=`` given to a solver that has two
TOL_HINT = (
    "A solver has two tolerances: abstol_termination and reltol_termination (or "
    "termination=TerminationCondition(...)); the continuous solver also ode_abstol / ode_reltol."
)


def make_algorithm(
    algorithm: Union[str, FixedPointAlgorithm], *, solver_options: Tuple[str, ...] = (), **options
) -> FixedPointAlgorithm:
    if isinstance(algorithm, FixedPointAlgorithm):
        if options:
            raise TypeError(
                f"algorithm options {sorted(options)} given with an algorithm object; set them on the object"
            )
        return algorithm
    if algorithm not in ALGORITHMS:
        import difflib

        close = difflib.get_close_matches(str(algorithm), list(ALGORITHMS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown algorithm {algorithm!r}{hint}; valid: {', '.join(ALGORITHMS)}")
    cls = ALGORITHMS[algorithm]
    import inspect

    own = [p for p in inspect.signature(cls).parameters]
    for name in options:
        if name not in own:  # a misspelt solver keyword lands here (it is not one of DiscreteDEQSolver's)
            raise unknown_keyword(
                f"DiscreteDEQSolver({algorithm!r})",
                name,
                [*solver_options, *own],
                hint=TOL_HINT if "tol" in name else "",
            )
    return cls(**options)


class DiscreteDEQSolver:
    """Find ``z* = f(z*)`` with a discrete algorithm, per sample, without building a graph.

    Every sample of the batch is its own problem and stops on its own; its returned iterate is frozen at
    that moment while the batch keeps running for the others. The loop, the termination test and the
    result are the same for every algorithm; the algorithm only proposes the next iterate.

    Args:
        algorithm: ``"lbroyden"`` (default, the paper's choice: quasi-Newton convergence with bounded
            memory, robust on weakly contractive maps), ``"broyden"``, ``"anderson"``, ``"fixed_point"``,
            ``"newton_krylov"``, or an algorithm object (a [`FixedPointAlgorithm`][deqlab.solvers.FixedPointAlgorithm]).
        mode: termination mode (see `deqlab.solvers.termination`); ``None`` (default) means
            ``"rel_deq_default"``: scale-free, and its patience rule ends a stalled solve before it burns
            ``max_steps`` (the right rule for training).
        abstol_termination: absolute tolerance of the termination condition, used by the ``abs*`` modes
            and ``norm``; ``None`` (default) means ``1e-3``, the reference package's value (training
            needs no tighter fixed point; tighten it for tests and oracles).
        reltol_termination: relative tolerance of the termination condition, used by the ``rel*`` modes
            and ``norm``; ``None`` (default) means ``1e-3``, as for ``abstol_termination``.
        max_steps: iterations after the first evaluation; NFE of fixed-point iteration is ``steps + 1``.
            Default 50: the hard cap on a solve's cost; trained DEQs at the default tolerance typically
            stop after 10-30 steps.
        norm: ``"l2"`` or dimension-independent ``"rms"``; ``None`` (default) means ``"l2"``, the
            reference package's norm (``"rms"`` makes one tolerance fit states of any size).
        throw: raise [`SolverError`][deqlab.solvers.SolverError] instead of returning an unconverged result. Default ``False``:
            a training loop should carry on (DEQ layers report failures with
            [`ConvergenceWarning`][deqlab.solvers.ConvergenceWarning]); use ``True`` in scripts and tests.
        keep_trace: record the termination objective of every step (cheap: ``(steps, B)``). Default
            ``True``, so ``result.trace`` can be plotted; ``False`` skips the bookkeeping.
        check_every: ask the device whether every sample has stopped only every ``k`` steps (default 1:
            stop at the earliest possible step, best on a CPU). In between,
            the per-sample stop decisions are still taken every step, on the device (masks, frozen
            iterates, step counts), so ``z``, ``residual``, ``converged``, ``status`` and ``sample_steps``
            are exactly those of ``check_every=1``; the loop may run up to ``k - 1`` extra steps after the
            last sample stopped (``steps`` and ``nfe`` up to ``k - 1`` larger, the trace as many rows
            longer). Why: each check is a device-to-host synchronisation, which on a GPU stalls the
            queue of kernels every iteration when ``f`` is small.
        per_sample_exit: evaluate ``f`` only on the samples still iterating (default ``False``). Needs a
            map whose samples are independent and that says so with ``restrict(index)``
            ([`SubBatchMap`][deqlab.solvers.SubBatchMap]: the DEQ layers of `deqlab.nn` and
            [`PerSampleMap`][deqlab.solvers.PerSampleMap] have it). At every check the stopped samples leave the
            working batch once the still-active ones are at most ``compact_below`` of it; ``f`` and the
            algorithm's state then act on the rest. Each sample's iterates, residual, status and step
            count are those of the full-batch solve (up to the rounding of a smaller matrix product in
            ``f``); ``nfe`` still counts batched calls and ``sample_weighted_nfe`` the work done. Why off
            by default: a map with BatchNorm batch statistics would change on a sub-batch (the layers
            refuse it), and for a tiny ``f`` the copies cost more than the evaluations saved.
        compact_below: with ``per_sample_exit``, shrink the working batch when the active samples are at
            most this fraction of it (default 0.75: at most ``log(B) / log(4/3)`` compactions, each costing
            one host sync and a copy of the algorithm's state). ``1.0`` compacts whenever a sample stops.
        reference_counting: the convention of ``result.reference_nfe`` (the paper's count beside
            ``nfe``, see `deqlab.solvers.counting`): ``"deqjl"`` (default: DeepEquilibriumNetworks.jl's
            ``nf + 1``, ``k + 2`` for ``k`` iterations) or ``"fastdeq"`` (the January-2022 code behind the
            paper's MNIST table, ``k + 3``). Only the reported number changes.
        termination: a full [`TerminationCondition`][deqlab.solvers.TerminationCondition] instead of the flat keywords (``mode``, the
            two tolerances, ``norm``, ``batch_wide``); giving both raises ``ValueError`` (one way to set
            the stop rule, never one silently dropped). Default ``None``: the flat keywords decide.
        batch_wide: evaluate the termination condition once over the whole batch, so every sample
            stops together (the reference package's semantics; see
            [`TerminationCondition`][deqlab.solvers.TerminationCondition]). ``None`` (default) means ``False``: per sample.
        compile: run each iteration (the algorithm's update, ``f`` included, and the termination
            bookkeeping) as one graph compiled by ``torch.compile(fullgraph=True)``. ``False`` (default):
            eager, no compile time. ``True``: inductor; a string or callable names another
            ``torch.compile`` backend (``"aot_eager"`` traces without generating code, for tests). The
            loop, ``check_every`` and every reported number stay those of the eager solve (iterates equal
            up to rounding). Why off by default: the first solve pays the compilation (seconds to tens of
            seconds on a CPU), which only many solves of the same shape amortise (docs/performance.md,
            "Compiling the solver step"). Compiled once per (algorithm options, termination condition,
            map, shape, dtype, device); a second batch size compiles once more, with a dynamic batch
            dimension that then serves every size. Runs eager, warning once per solver
            ([`CompileFallbackWarning`][deqlab.solvers.CompileFallbackWarning]), when the step
            cannot be compiled (a map that calls ``.item()``, no C++ compiler, an algorithm without a
            pure step: ``newton_krylov`` and line searches), and silently with ``per_sample_exit`` (each
            compaction is a new shape) or while `deqlab.instrument` records (its regions need the eager
            step).
        compile_map: with ``compile``, trace ``f`` into the step's graph (default ``True``: the fastest
            step). ``False`` compiles only the algorithm's algebra and the termination bookkeeping, as two
            graphs around an eager call of ``f`` per step: for a map that cannot be traced (host code,
            ``torch.autograd.grad`` -- [`FixedPointLinearSolver`][deqlab.solvers.FixedPointLinearSolver]
            runs its adjoint VJPs this way). Needs an algorithm with a split step
            (`FixedPointAlgorithm.supports_split`: every built-in one but ``newton_krylov`` and line searches).
        cuda_graphs: on CUDA with ``check_every = k > 1``, capture the ``k`` steps between two host checks
            as one CUDA graph per solve and replay it for every later block (`deqlab.solvers.cuda_graphs`):
            one launch per block instead of dozens per step, for small maps whose kernels are shorter than
            their launches. Default ``False``. Works with ``compile`` (the compiled block is captured) or
            without (the eager step is). The captured step does not depend on the step number (Broyden
            multiplies by all its zero-filled pairs), shapes are static (no ``per_sample_exit``), and
            recorded iterates (``sample_states``) run uncaptured. A step that cannot be captured (a host
            sync in ``f``) warns once and runs uncaptured. Ignored on the CPU.
        **algorithm_options: forwarded to the named algorithm (e.g. ``memory=5`` for Anderson).

    Calling ``solver(f, z0)`` returns a [`SolverResult`][deqlab.solvers.SolverResult].

    Raises:
        TypeError: ``abstol=``/``reltol=`` are given (the discrete solver's tolerances are
            ``abstol_termination``/``reltol_termination``); algorithm options are given together with an
            algorithm object; an algorithm option is unknown (the message lists the valid ones); or
            ``termination`` is not a [`TerminationCondition`][deqlab.solvers.TerminationCondition].
        ValueError: ``algorithm`` is an unknown name; an option is out of range (``max_steps`` not an
            int >= 0, ``check_every`` not an int >= 1, a bad mode, norm, tolerance or algorithm option);
            or ``termination`` is given together with the flat keywords.

    Example:
        >>> import torch
        >>> from deqlab.solvers import DiscreteDEQSolver
        >>> solver = DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-10, max_steps=50)
        >>> res = solver(lambda z: 0.5 * z + 1, torch.zeros(2, 3, dtype=torch.float64))   # z* = 2
        >>> res.status, res.steps, res.nfe
        (<SolverStatus.CONVERGED: 'converged'>, 7, 8)
        >>> res.z.round(decimals=6)
        tensor([[2., 2., 2.],
                [2., 2., 2.]], dtype=torch.float64)
        >>> DiscreteDEQSolver()   # the defaults
        DiscreteDEQSolver(LimitedMemoryBroyden(memory=27, line_search=False, max_line_search=5),
            mode='rel_deq_default', abstol_termination=0.001, reltol_termination=0.001, norm='l2', max_steps=50)
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
        check_every: int = 1,
        per_sample_exit: bool = False,
        compact_below: float = 0.75,
        reference_counting: ReferenceCounting = "deqjl",
        batch_wide: Optional[bool] = None,
        compile: CompileOption = False,
        compile_map: bool = True,
        cuda_graphs: bool = False,
        **algorithm_options,
    ):
        for old, new in (("abstol", "abstol_termination"), ("reltol", "reltol_termination")):
            if old in algorithm_options:
                raise TypeError(
                    f"DiscreteDEQSolver has no {old!r} option: its tolerances are those of the "
                    f"termination condition, pass {new}=..."
                )
        self.algorithm = make_algorithm(algorithm, solver_options=_SOLVER_OPTIONS, **algorithm_options)
        self.termination: TerminationCondition = resolve_termination(
            termination,
            mode=mode,
            abstol_termination=abstol_termination,
            reltol_termination=reltol_termination,
            norm=norm,
            batch_wide=batch_wide,
            owner="DiscreteDEQSolver",
        )
        self.max_steps = check_max_steps(max_steps)
        self.check_every = check_int("DiscreteDEQSolver", "check_every", check_every, low=1)
        self.throw = bool(throw)
        self.keep_trace = bool(keep_trace)
        self.reference_counting = check_reference_counting("DiscreteDEQSolver", reference_counting)
        self.per_sample_exit = bool(per_sample_exit)
        self.compact_below = check_number(
            "DiscreteDEQSolver", "compact_below", compact_below, low=0.0, high=1.0, low_open=True
        )
        self.compile = check_compile_option("DiscreteDEQSolver", compile)
        self.compile_map = bool(compile_map)
        self.cuda_graphs = bool(cuda_graphs)
        self._graphs_failed = False  # set after a capture failed (warned once): this solver then stops trying
        self._compile_failed = False  # set after the one fallback warning: this solver then stays eager
        if self.per_sample_exit and not self.algorithm.supports_select:
            raise ValueError(
                f"DiscreteDEQSolver: per_sample_exit=True needs an algorithm that can follow a "
                f"shrinking batch; {type(self.algorithm).__name__} does not implement select() "
                f"(set supports_select = True with it), or pass per_sample_exit=False"
            )

    def __repr__(self) -> str:
        return (
            f"DiscreteDEQSolver({self.algorithm!r}, mode={self.termination.mode!r}, "
            f"abstol_termination={self.termination.abstol}, reltol_termination={self.termination.reltol}, "
            f"norm={self.termination.norm!r}, max_steps={self.max_steps}"
            + (", batch_wide=True" if self.termination.batch_wide else "")
            + (f", check_every={self.check_every}" if self.check_every != 1 else "")
            + (f", compile={self.compile!r}" if self.compile is not False else "")
            + (", compile_map=False" if self.compile is not False and not self.compile_map else "")
            + (", cuda_graphs=True" if self.cuda_graphs else "")
            + (f", per_sample_exit=True, compact_below={self.compact_below})" if self.per_sample_exit else ")")
        )

    @torch.no_grad()
    def __call__(self, f: Callable[[State], State], z0: State) -> SolverResult:
        """Find ``z* = f(z*)`` for every sample, starting from ``z0``, without building a graph.

        Args:
            f: maps a state to a state of the same structure, shapes and dtype (checked on the first call).
            z0: the batch-first initial guess: a floating-point tensor ``(B, ...)`` or a list of them.

        Returns:
            The [`SolverResult`][deqlab.solvers.SolverResult]; an empty batch returns at once without calling ``f``.

        Raises:
            TypeError: ``z0`` or ``f(z0)`` is not a state of floating-point tensors shaped like ``z0``.
            ValueError: ``z0`` contains NaN/Inf, or ``f`` returns other shapes or another dtype.
            SolverError: with ``throw=True``, when some sample did not converge.
        """
        with instrument.region("solver"):
            return self._solve(f, z0)

    def _solve(self, f: Callable[[State], State], z0: State) -> SolverResult:
        with instrument.region("solver.setup"):
            packer, z = prepare(z0)
            if packer.batch == 0:
                return empty_result(packer, z, reference_counting=self.reference_counting)
            restrict = _sub_batch_maker(f, packer) if self.per_sample_exit else None
            F = CountedMap(f, packer)
            tracker = TerminationTracker(
                self.termination, packer.batch, packer.numel, device=z.device, dtype=z.dtype, keep_trace=self.keep_trace
            )
        # what the loop calls, picked once: the methods themselves when nothing records (deqlab.instrument)
        update = instrument.wrap("termination", tracker.update)
        fz = F(z)
        g = fz - z
        done = update(z, g, fz=fz)
        check_first_step(tracker, z)
        algo = self.algorithm
        compiled = None if done or self.max_steps == 0 else self._compiled_step(restrict, z)
        ran = None if compiled is None else self._iterate_compiled(compiled, tracker, algo, z, fz, g, F)
        if ran is not None:
            z, g, steps = ran
        else:
            with instrument.region("algorithm.init"):
                state = algo.init(z, fz, self.max_steps)
            z, g, steps = self._iterate(tracker, update, algo, state, z, fz, g, F, restrict, done)
        # The reference solvers never test their starting guess: a solve that stopped at z0 is one
        # iteration (one evaluation) long there.
        calls = F.nfe + (1 if steps == 0 else 0)
        with instrument.region("solver.result"):
            return build_result(
                tracker,
                packer,
                z,
                g,
                nfe=F.nfe,
                steps=steps,
                throw=self.throw,
                solver_name=f"DiscreteDEQSolver({algo.name})",
                rows=F.rows,
                reference_nfe=reference_nfe(self.reference_counting, calls=calls),
                reference_counting=self.reference_counting,
            )

    def _compiled_step(self, restrict, z: Tensor) -> Optional[Callable[..., tuple]]:
        """The compiled step for this solve, or ``None`` to run eager (see ``compile`` in the class doc).
        With ``compile=False`` the pure step still runs when it is to be captured (``cuda_graphs``)."""
        if restrict is not None or self._compile_failed:
            return None
        if self.compile is False and not self._captures(z):
            return None
        if instrument.current() is not None:  # the regions of a recording need the eager step
            return None
        algo, fused = self.algorithm, self._map_in_graph()
        if (self.compile is not False and not compile_available()) or not (
            algo.supports_compile if fused else algo.supports_split
        ):
            self._compile_failed = True
            missing = (
                f"{type(algo).__name__} has no pure step (supports_compile is False)"
                if fused
                else f"{type(algo).__name__} has no split pure step for compile_map=False (supports_split is False)"
            )
            unsupported("DiscreteDEQSolver", missing, stacklevel=4)
            return None
        return compiled_discrete_step(algo, self.termination, self.compile, map_in_graph=fused)

    def _map_in_graph(self) -> bool:
        """Whether ``f`` runs inside the step's function: ``compile_map``, or always for an uncompiled pure
        step (``compile=False`` with ``cuda_graphs``, where the capture takes ``f`` in anyway)."""
        return self.compile_map or self.compile is False

    def _iterate_compiled(
        self,
        step: Callable[..., tuple],
        tracker: TerminationTracker,
        algo: FixedPointAlgorithm,
        z: Tensor,
        fz: Tensor,
        g: Tensor,
        F: CountedMap,
    ) -> Optional[Tuple[Tensor, Tensor, int]]:
        """The solver loop around the compiled step; ``None`` when the step cannot be compiled (warned once),
        so the caller runs the eager loop from the same first evaluation.

        The host loop is the eager one: every ``check_every`` steps it asks the device whether every
        sample has stopped (one sync); in between it only counts. The step's per-sample decisions are those
        of ``tracker.update(sync=False)``, which the eager loop takes too (its ``sync=True`` fast path
        reaches the same masks), so iterates, step counts and statuses match the eager solve.
        """
        batch, k = z.shape[0], self.check_every
        astate = algo.pure_init(z, fz, self.max_steps)
        tstate = export_device_state(tracker)
        flat = F.flat
        trace = tracker.trace if tracker.keep_trace else None
        first_step = tracker.step
        record = tracker.record_steps  # record_iterates (sample_states): the host keeps the asked iterates
        block = self._block_runner(z, record, flat)
        uncompiled = self.compile is False  # the pure step runs as it is (captured, or after a failure)
        steps, done = 0, False
        while not done and steps < self.max_steps:
            # a whole block of k steps between two checks when the budget has room for it (steps is then a
            # multiple of k); single steps otherwise (the tail before max_steps, recorded iterates)
            n = k if block is not None and self.max_steps - steps >= k else 1
            try:
                if block is not None and n > 1:
                    z, fz, g, astate, tstate, obj = block(astate, tstate, z, fz, g, steps)
                else:
                    z, fz, g, astate, tstate, obj = step(flat, astate, tstate, z, fz, g, steps)
            except MapRaised as raised:  # f itself raised, outside the graph: its own error, as it is
                raise raised.error from None
            except Exception as error:  # compilation failed: tracing f, or the backend (no C++ compiler)
                if uncompiled:  # the uncompiled step raised: an error of f or of the step itself
                    raise
                self._compile_failed = uncompiled = True
                fallback_warning("DiscreteDEQSolver", error)
                if steps == 0:
                    return None  # the eager loop takes over from the first evaluation
                # A later shape or step count failed to compile (the call did not run): finish this solve
                # with the same pure step uncompiled, from the state it reached.
                step = compiled_discrete_step(algo, self.termination, False, map_in_graph=self._map_in_graph())
                block = None
                continue
            F.nfe += n
            F.rows += n * batch
            if trace is not None:
                trace.extend(obj.unbind(0)) if n > 1 else trace.append(obj)
            steps += n
            if record is not None and first_step + steps - 1 in record:  # n == 1 whenever iterates are recorded
                tracker._recorded[first_step + steps - 1] = z.clone()
            if steps % k == 0:
                load_device_state(tracker, tstate, first_step + steps)
                done = tracker.all_stopped()
        if getattr(getattr(block, "captured", None), "failed", False):
            self._graphs_failed = True  # warned once; later solves run their blocks uncaptured
        load_device_state(tracker, tstate, first_step + steps)
        return z, g, steps

    def _block_runner(self, z: Tensor, record, flat) -> Optional[Callable[..., tuple]]:
        """``(astate, tstate, z, fz, g, count) -> step outputs`` for ``check_every`` steps at once, or ``None``
        for single steps: with ``check_every == 1``, a map outside the graph (``compile_map=False``) or
        recorded iterates (the host keeps iterates between checks)."""
        k = self.check_every
        if k == 1 or not self._map_in_graph() or record is not None or self.max_steps < k:
            return None
        block = compiled_discrete_step(self.algorithm, self.termination, self.compile, steps_per_call=k)
        if not self._captures(z):
            return lambda astate, tstate, z, fz, g, count: block(flat, astate, tstate, z, fz, g, count)
        from deqlab.solvers.cuda_graphs import CapturedBlock

        def count_free(astate, tstate, z, fz, g):  # the captured block is replayed for every block
            z, fz, g, astate, tstate, objs = block(flat, astate, tstate, z, fz, g, None)
            return (astate, tstate, z, fz, g), objs

        captured = CapturedBlock(count_free, owner="DiscreteDEQSolver")

        def replay(astate, tstate, z, fz, g, count):
            (astate, tstate, z, fz, g), objs = captured(astate, tstate, z, fz, g)
            return z, fz, g, astate, tstate, objs

        replay.captured = captured  # type: ignore[attr-defined]
        return replay

    def _captures(self, z: Tensor) -> bool:
        """Whether this solve's blocks are captured as CUDA graphs."""
        return self.cuda_graphs and z.is_cuda and self.check_every > 1 and not self._graphs_failed

    def _iterate(
        self,
        tracker: TerminationTracker,
        update: Callable[..., bool],
        algo: FixedPointAlgorithm,
        state,
        z: Tensor,
        fz: Tensor,
        g: Tensor,
        F: CountedMap,
        restrict,
        done: bool,
    ) -> Tuple[Tensor, Tensor, int]:
        """The solver loop. With ``restrict`` (``per_sample_exit``) the algorithm iterates on a working batch
        that drops stopped samples; without it the working batch is always the whole batch.

        The tracker stays the one authority over all ``B`` samples: after each step the working rows are
        scattered into full-size (new, never in-place) tensors, so its stop decisions, returned iterates
        and step counts are computed exactly as in the full-batch loop. Samples outside the working batch
        have stopped, so their frozen values are never read as live. ``update`` is ``tracker.update``, or
        it timed while `deqlab.instrument` records.
        """
        work: Optional[Tensor] = None  # positions in the full batch of the working rows (None: all)
        zw, fzw, gw = z, fz, g
        steps, k = 0, self.check_every
        step = instrument.wrap("algorithm.step", algo.step)  # algo.step itself when nothing records
        while not done and steps < self.max_steps:
            zw, fzw, state = step(state, zw, fzw, gw, F)
            gw = fzw - zw
            steps += 1
            if work is None:
                z, fz, g = zw, fzw, gw
            else:
                z, fz, g = z.index_copy(0, work, zw), fz.index_copy(0, work, fzw), g.index_copy(0, work, gw)
            sync = steps % k == 0
            done = update(z, g, fz=fz, sync=sync)
            if restrict is None or done or not sync or steps == self.max_steps:
                continue
            n_work = tracker.batch if work is None else work.numel()
            if tracker.n_active <= self.compact_below * n_work:
                active = tracker.active if work is None else tracker.active.index_select(0, work)
                keep = active.nonzero().squeeze(1)
                work = keep if work is None else work.index_select(0, keep)
                zw, fzw, gw = zw.index_select(0, keep), fzw.index_select(0, keep), gw.index_select(0, keep)
                state = algo.select(state, keep)
                F.restrict(*restrict(work))
        return z, g, steps


def _sub_batch_maker(f: Callable[[State], State], packer):
    """``index -> (map of those samples, their packer)``, after checking ``f`` supports sub-batches at all.

    ``f.restrict`` is called once on the whole batch first, so a map that refuses (BatchNorm with batch
    statistics) fails before any work, not at the first sample that converges.
    """
    if not isinstance(f, SubBatchMap):
        raise TypeError(
            f"DiscreteDEQSolver(per_sample_exit=True) evaluates f on the samples still iterating, so f must be "
            f"restrictable to a sub-batch: got {type(f).__name__} without a restrict(index) method. Wrap a plain "
            f"function as deqlab.solvers.PerSampleMap(fn, x, ...) (fn(z, x, ...) with per-sample inputs), use a "
            f"deqlab.nn DEQ layer, or pass per_sample_exit=False"
        )
    f.restrict(torch.arange(packer.batch, device=packer.device))

    def restrict(index: Tensor):
        return f.restrict(index), packer.resized(index.numel())

    return restrict


#: DiscreteDEQSolver's own keywords (beside the algorithm's options), for the did-you-mean of a typo
_SOLVER_OPTIONS = tuple(
    p
    for p in __import__("inspect").signature(DiscreteDEQSolver.__init__).parameters
    if p not in ("self", "algorithm", "algorithm_options")
)
