"""DEQ layers: one layer class, ``model + solver + init + backward``, and thin constructors for the variants.

Data flow of one forward (``deq(x) -> (z_star, solution)``):

1. every [`EquilibriumStateful`][deqlab.nn.EquilibriumStateful] submodule starts its per-solve state (weight-norm
   cache, dropout mask);
2. the initial-guess strategy ``init`` gives ``u0`` (zeros / ``shortcut(x)`` / ``f(0, x)`` / your own);
3. the solver finds ``z* = f(z*, x)`` from ``init.start(u0)`` without building a graph (memory does not
   grow with solver steps), or, in fixed-depth mode, ``d`` applications of ``f`` run with ordinary backprop;
4. ``z*`` is connected to ``x`` and the map's parameters through the backward mode (implicit by default),
   which fills the ``backward_*`` fields of the solution record when it runs;
5. the Jacobian loss and the guess's skip loss are formed; everything is returned in a
   [`DeepEquilibriumSolution`][deqlab.nn.DeepEquilibriumSolution].

Skip DEQ, Skip Reg. DEQ and the multiscale layers are the same class with another ``init`` / ``model``
([`SkipDeepEquilibriumNetwork`][deqlab.nn.SkipDeepEquilibriumNetwork] and friends only build those).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
import warnings
import weakref
from typing import Any, Callable, Iterator, List, Literal, Optional, Sequence, Tuple, Union, cast

import torch
from torch import Tensor, nn

from deqlab import instrument
from deqlab._compat import warn_renamed
from deqlab.nn.adapters import as_solver
from deqlab.nn.implicit import BackwardMode, BackwardResult, ImplicitBackward, _GradientContext, attach_gradient
from deqlab.nn.init import FunctionGuess, InitialGuess, MapGuess, ShortcutGuess, SkipLoss, ZeroGuess
from deqlab.nn.layers import equilibrium_session, stateful_modules
from deqlab.nn.maps import CheckedMap
from deqlab.nn.protocols import GuessStrategy
from deqlab.nn.regularization import jacobian_frobenius_estimate
from deqlab.nn.reporting import ConvergenceReporter, UnconvergedPolicy, user_stacklevel
from deqlab.nn.reversible import ReversibleBackward, check_reversible_pairing
from deqlab.nn.running_stats import frozen_running_stats
from deqlab.nn.solution import DeepEquilibriumSolution, _BackpropCounter
from deqlab.nn.spectral import spectral_radius as _spectral_radius
from deqlab.nn.trajectory import check_sampling, phantom_states, sample_steps
from deqlab.solvers.compiled import CompileFallbackWarning, CompileOption, check_compile_option
from deqlab.solvers.continuous import ContinuousDEQSolver
from deqlab.solvers.discrete import DiscreteDEQSolver
from deqlab.solvers.result import SolverStatus
from deqlab.solvers.reversible import ReversibleSolver
from deqlab.solvers.termination import record_iterates
from deqlab.state import State, as_parts, detach, from_parts, per_sample_norm

__all__ = [
    "DeepEquilibriumNetwork",
    "DEQ",
    "SkipDeepEquilibriumNetwork",
    "SkipDEQ",
    "MultiScaleMap",
    "MultiScaleDeepEquilibriumNetwork",
    "MultiScaleSkipDeepEquilibriumNetwork",
]


def _resolve_init(
    owner: str,
    init: Optional[GuessStrategy],
    z_shape: Optional[Sequence[int]],
    initializer: Optional[Callable[[Tensor], State]],
    shortcut: Any = None,
) -> GuessStrategy:
    """The one initial-guess strategy from ``init=`` or its aliases ``z_shape=`` / ``initializer=`` /
    ``shortcut=`` (with a shortcut, ``z_shape`` is the shape its output is checked against, as in Skip DEQ)."""
    given = [
        k
        for k, v in (
            ("init", init),
            ("z_shape", z_shape if shortcut is None else None),
            ("initializer", initializer),
            ("shortcut", shortcut),
        )
        if v is not None
    ]
    if len(given) > 1:
        raise ValueError(
            f"{owner}: {' and '.join(given)} both set the initial state u0; pass one of them "
            f"(z_shape=S is init=ZeroGuess(shape=S), initializer=fn is init=FunctionGuess(fn), "
            f"shortcut=m is init=ShortcutGuess(m))"
        )
    # One way to give a starting guess: init= with a strategy object; the three old spellings still work. The
    # warnings point at the user's line whichever constructor (a subclass's, a multiscale layer's) got here
    # (+1: warn_renamed is one frame deeper than this function); a DeprecationWarning is shown by default only
    # when it points at __main__, so a level that lands inside deqlab hid it
    if shortcut is not None:
        warn_renamed(
            owner,
            "shortcut=m",
            "init=ShortcutGuess(m) (or SkipDeepEquilibriumNetwork(f, solver, m))",
            stacklevel=user_stacklevel() + 1,
            why="one way to give a starting guess",
        )
        return ShortcutGuess(shortcut, shape=z_shape)
    if initializer is not None:
        warn_renamed(
            owner,
            "initializer=fn",
            "init=FunctionGuess(fn)",
            stacklevel=user_stacklevel() + 1,
            why="one way to give a starting guess",
        )
        return FunctionGuess(initializer)
    if z_shape is not None:
        warn_renamed(
            owner,
            "z_shape=S",
            "init=ZeroGuess(shape=S)",
            stacklevel=user_stacklevel() + 1,
            why="one way to give a starting guess",
        )
    if init is None:
        return ZeroGuess(shape=z_shape)
    if isinstance(init, type):
        raise TypeError(
            f"{owner}: init is the class {init.__name__}, not a strategy; create one, e.g. init={init.__name__}(...)"
        )
    if not isinstance(init, GuessStrategy):
        missing = [m for m in ("__call__", "start", "skip_loss", "observe") if not callable(getattr(init, m, None))]
        raise TypeError(
            f"{owner}: init must be an initial-guess strategy (ZeroGuess(), ShortcutGuess(module), "
            f"MapGuess(), a subclass of deqlab.nn.InitialGuess, or any object with the members of "
            f"deqlab.nn.GuessStrategy); {init!r} lacks {', '.join(missing)}"
        )
    return init


def _record_backward(
    ref: "weakref.ReferenceType[DeepEquilibriumSolution]",
    reporter: ConvergenceReporter,
    mode: BackwardMode,
    result: BackwardResult,
) -> None:
    """Write what a backward cost and whether its solve converged into the solution record; report a
    failed adjoint solve by the layer's policy (or the backward mode's ``warn_unconverged`` override)."""
    solution = ref()
    if solution is not None:  # None: the caller dropped the record; nothing to fill
        solution.record_backward(result.nfe, residual=result.residual, converged=result.converged)
    if result.converged is None:  # no solve (JFB, phantom gradient)
        return
    override = mode.warn_unconverged  # declared on BackwardMode (None: follow the layer)
    policy = None if override is None else ("warn" if override else "ignore")

    def describe() -> str:
        res = result.residual
        worst = "n/a" if res is None else f"{float(res.max()):.3g}"
        return (
            f"{type(mode).__name__}: max relative adjoint residual {worst} after {result.nfe} VJPs; "
            f"the gradients are inexact (a singular I - J^T at z*, or too small a budget)"
        )

    reporter.record("backward", bool(result.converged), describe, policy=policy, stacklevel=4)


def _rename_old_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Checkpoints from before the init strategies stored a Skip DEQ's predictor as ``shortcut.*``; it is
    ``init.shortcut.*`` now. Renaming on load keeps those checkpoints loadable, with a
    ``DeprecationWarning`` (re-save the checkpoint to store the new keys)."""
    old = prefix + "shortcut."
    keys = [k for k in state_dict if k.startswith(old)]
    if keys:
        warn_renamed(
            "state_dict",
            f"'{old}*'",
            f"'{prefix}init.shortcut.*' (re-save the checkpoint)",
            stacklevel=user_stacklevel() + 1,
            why="a checkpoint from before the initial-guess strategies",
        )
    for key in keys:
        state_dict[prefix + "init.shortcut." + key[len(old) :]] = state_dict.pop(key)


_DEPTH = threading.local()


def _depth_overrides() -> "weakref.WeakKeyDictionary":
    overrides = getattr(_DEPTH, "overrides", None)
    if overrides is None:
        overrides = _DEPTH.overrides = weakref.WeakKeyDictionary()
    return overrides


class DeepEquilibriumNetwork(nn.Module):
    """A Deep Equilibrium layer ``z* = model(z*, x)``: ``model + solver + init + backward``.

    Calling ``layer(x)`` finds the fixed point of ``z -> model(z, x)`` with ``solver`` (without building a
    graph, so memory does not grow with solver steps), connects it to ``x`` and the map's parameters through
    ``backward``, and returns ``(z_star, solution)``: the fixed point and a
    [`DeepEquilibriumSolution`][deqlab.nn.DeepEquilibriumSolution] with the residual, NFE, convergence mask and losses.

    Args:
        model: the map ``f``, any module called as ``model(z, x)`` returning a tensor shaped like ``z``
            (usually ``z`` enters one branch and the injection ``x`` another). Required: it is the layer.
        solver: a [`Solver`][deqlab.solvers.Solver] (``DiscreteDEQSolver`` / ``ContinuousDEQSolver``), a
            registered solver name, or a plain callable ``solver(f, z0) -> SolverResult`` (wrapped in
            [`CallableSolver`][deqlab.nn.CallableSolver]). Required: how hard to solve is a per-model choice.
        init: the initial-guess strategy (a [`GuessStrategy`][deqlab.nn.GuessStrategy], usually an
            [`InitialGuess`][deqlab.nn.InitialGuess]). Default ``None``: ``ZeroGuess()`` (zeros shaped like ``x``),
            the vanilla DEQ's start, which adds no parameters; ``ShortcutGuess(module)`` gives a Skip DEQ,
            ``MapGuess()`` a Skip Reg. DEQ, or pass your own subclass or any object with the protocol's
            members.
        backward: how gradients are computed. Default ``None``: ``ImplicitBackward()``, the exact implicit
            gradient with the paper's budget (GMRES at the forward tolerance, at most 15 VJPs); the cheaper
            approximations are [`JacobianFreeBackward`][deqlab.nn.JacobianFreeBackward] and [`PhantomGradient`][deqlab.nn.PhantomGradient].
            With a [`ReversibleSolver`][deqlab.solvers.ReversibleSolver] the default is
            [`ReversibleBackward`][deqlab.nn.ReversibleBackward], the only backward that fits it.
        jacobian_regularization: add a Hutchinson estimate of ``‖∂f/∂z‖_F²`` at ``z*`` to the solution
            (``solution.jacobian_loss``; adding it to the loss with a weight is the caller's job). Default
            ``False``: it costs a graph of ``f`` and a VJP per probe every forward, so it is opt-in.
        jacobian_probes: Gaussian probes per estimate. Default 1: one probe already gives an unbiased
            estimate and each extra one costs another VJP.
        jacobian_normalize: ``"element"`` (default; divide by ``z.numel()``, as Bai et al., so the loss
            weight does not depend on batch size or width), ``"sample"`` (divide by the batch size) or
            ``"none"`` (the raw sum).
        z_shape: deprecated spelling (warns) of ``init=ZeroGuess(shape=S)``, the per-sample state shape of a
            reduced-dimension DEQ. Default ``None``: the state is shaped like ``x``.
        initializer: deprecated spelling (warns) of ``init=FunctionGuess(fn)`` (``u0 = fn(x)``, no gradient;
            a module with parameters is refused, they would never train: use ``init=ShortcutGuess(module)``).
            Default ``None``: no function start.
        shortcut: deprecated spelling (warns) of ``init=ShortcutGuess(m, shape=z_shape)`` (a Skip DEQ; with a
            shortcut, ``z_shape`` is the shape its output is checked against). Default ``None``: no
            learned predictor.
        fixed_depth: when > 0, skip the solver and run ``fixed_depth`` unrolled applications of ``f`` from
            ``u0`` with ordinary backprop (pretraining); ``solution.nfe`` is then exactly the depth.
            Default 0: solve for the fixed point, which is what a DEQ is.
        on_unconverged: what an unconverged forward or adjoint solve does: ``"warn"`` (default; a
            [`ConvergenceWarning`][deqlab.solvers.ConvergenceWarning] at the 1st, 10th, 100th, ... failure, with counts, so a
            model that stops converging is noticed without flooding the log or stopping a long run),
            ``"ignore"``, or ``"raise"`` ([`SolverError`][deqlab.solvers.SolverError] at the first failure).
        reapply_map: return ``f(z_T, x)``, one more application of the map to the solver's last iterate
            ``z_T``, instead of ``z_T`` itself (the January-2022 reference code's ``z* = f(u_T, x)``;
            gradients flow through that application and, implicitly, through ``z_T``; ``solution.nfe``
            counts it). Default ``False``: at a converged fixed point the two differ by the residual, so
            the extra evaluation buys nothing but reproducing that code.
        spectral_radius: estimate ``ρ(∂f/∂z)`` at ``z*`` per sample with
            [`spectral_radius`][deqlab.nn.spectral_radius] into ``solution.spectral_radius``: ``False`` /
            ``"off"`` (default: it costs a graph of ``f`` and ``spectral_radius_iters`` VJPs per forward),
            ``True`` / ``"eval"`` (only when the layer is in eval mode, torchdeq's ``sradius_mode``: free
            for training steps, logged for validation) or ``"always"``.
        spectral_radius_iters: VJPs of that estimate (Arnoldi steps). Default 20, as the function's.
        checkpoint_unrolled: in fixed-depth mode, wrap every application of ``f`` in gradient
            checkpointing (``torch.utils.checkpoint``, torchdeq's ``mem_gc``): the backprop recomputes each
            step's activations instead of keeping them, so the memory held for the backward is one state per
            step instead of every activation of ``f`` (gradients are identical; the price is one more
            evaluation of ``f`` per step in the backward). Default ``False``: pretraining depths are small.
        sample_states: sample ``k`` differentiable states along the solver's path into
            ``solution.states`` (DEQ-Flow's trajectory sampling, for
            [`fixed_point_correction_loss`][deqlab.nn.fixed_point_correction_loss]): ``k - 1`` iterates at
            steps splitting the solver's ``max_steps`` evenly (torchdeq's ``n_states`` spacing; in
            fixed-depth mode the depth), then ``z*``. Default ``None``: no sampling, ``solution.states``
            is ``None``.
        sample_at: the solver steps (increasing ints >= 0; 0 is the initial guess) of the intermediate
            states instead; ``solution.states`` then has ``len(sample_at) + 1`` states, the last ``z*``
            (torchdeq's ``indexing``). Default ``None``.
        sample_grad: the damped steps ``z <- (1 - tau) z + tau f(z, x)`` taken, with autograd, from each
            detached intermediate iterate: they give the state its value and its gradient (torchdeq's
            ``indexing`` core with phantom gradients; ``z*`` keeps ``backward``). They are counted in
            ``solution.nfe``. Default 1: one step, the cheapest gradient. (In fixed-depth mode the
            states are the unrolled iterates themselves, already differentiable.)
        sample_tau: the damping ``tau`` of those steps, in ``(0, 1]``. Default 1.0: plain ``f`` steps.
            A sample that stopped before a sampled step gives its returned iterate there, so every sample
            always has ``k`` states.
        compile: the one switch for compiled solver iterations (`docs/performance.md`): ``True`` (inductor)
            or a ``torch.compile`` backend makes the forward solve with a copy of ``solver`` built with that
            ``compile=`` (the caller's solver object is left as it is, and a solver given its own
            ``compile=`` keeps it). Default ``False``. deqlab's discrete algorithms with a pure step and
            the Tsit5, Dopri5 and VCAB3 integrators compile; another solver runs eager with one
            `CompileFallbackWarning`. The default backward, ``ImplicitBackward("gmres")``, gets the same
            ``compile=`` for its GMRES (each Arnoldi step's algebra compiled; the VJPs stay eager); other
            backward modes run eager.

    Raises:
        ValueError: more than one of ``init``, ``z_shape``, ``initializer``, ``shortcut`` is given (all
            set ``u0``; ``z_shape`` with ``shortcut`` is the shape check); ``jacobian_probes < 1``;
            ``jacobian_normalize`` is not ``"element"``, ``"sample"`` or ``"none"``; ``fixed_depth`` is not an
            int >= 0; ``on_unconverged`` is not ``"warn"``, ``"ignore"`` or ``"raise"``; ``solver`` is an unknown
            solver name; a [`ReversibleSolver`][deqlab.solvers.ReversibleSolver] and a
            [`ReversibleBackward`][deqlab.nn.ReversibleBackward] are not used together (each needs the other);
            ``spectral_radius`` is not one of ``False``, ``True``, ``"off"``, ``"eval"``, ``"always"``;
            ``spectral_radius_iters < 1``; both ``sample_states`` and ``sample_at``
            are given, or one of the ``sample_*`` options is out of range.
        TypeError: ``backward`` is not a [`BackwardMode`][deqlab.nn.BackwardMode]; ``init`` lacks a member of
            [`GuessStrategy`][deqlab.nn.GuessStrategy]; ``shortcut`` is neither a module nor a sequence of
            modules; ``solver`` is neither a solver, a name nor a callable.

    Example:
        A linear map ``f(z, x) = z / 2 + x`` has the fixed point ``z* = 2x``, and ``dz*/dx = 2``:

        >>> import torch
        >>> from torch import nn
        >>> from deqlab.nn import DeepEquilibriumNetwork
        >>> from deqlab.solvers import DiscreteDEQSolver
        >>> class Half(nn.Module):
        ...     def forward(self, z, x):
        ...         return 0.5 * z + x
        >>> solver = DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-6, max_steps=30)
        >>> deq = DeepEquilibriumNetwork(Half(), solver)
        >>> x = torch.ones(2, 3, requires_grad=True)
        >>> z_star, solution = deq(x)
        >>> solution.status.value, solution.converged.tolist()
        ('converged', [True, True])
        >>> torch.allclose(z_star, 2 * x, atol=1e-5)
        True
        >>> z_star.sum().backward()                  # implicit gradient through the fixed point
        >>> torch.allclose(x.grad, torch.full((2, 3), 2.0)), solution.backward_converged
        (True, True)
    """

    def __init__(
        self,
        model: nn.Module,
        solver: Any,
        *,
        init: Optional[GuessStrategy] = None,
        backward: Optional[BackwardMode] = None,
        jacobian_regularization: bool = False,
        jacobian_probes: int = 1,
        jacobian_normalize: Literal["element", "sample", "none"] = "element",
        z_shape: Optional[Sequence[int]] = None,
        initializer: Optional[Callable[[Tensor], State]] = None,
        shortcut: Union[None, nn.Module, Sequence[nn.Module]] = None,
        fixed_depth: int = 0,
        on_unconverged: UnconvergedPolicy = "warn",
        reapply_map: bool = False,
        spectral_radius: Union[bool, Literal["off", "eval", "always"]] = False,
        spectral_radius_iters: int = 20,
        checkpoint_unrolled: bool = False,
        sample_states: Optional[int] = None,
        sample_at: Optional[Sequence[int]] = None,
        sample_grad: int = 1,
        sample_tau: float = 1.0,
        compile: CompileOption = False,
    ):
        super().__init__()
        name = type(self).__name__
        self.reporter = ConvergenceReporter(name, on_unconverged)
        solver = as_solver(solver, name)
        if backward is None:  # the reversible solver's exact backward is the only one that fits it
            backward = ReversibleBackward() if isinstance(solver, ReversibleSolver) else ImplicitBackward()
        if isinstance(backward, type):
            raise TypeError(
                f"{name}: backward is the class {backward.__name__}, not a backward mode; create one, "
                f"e.g. backward={backward.__name__}()"
            )
        if not isinstance(backward, BackwardMode):
            raise TypeError(
                f"{name}: backward must be a BackwardMode (ImplicitBackward(), "
                f"JacobianFreeBackward(), PhantomGradient()), got {backward!r}"
            )
        check_reversible_pairing(name, solver, backward)
        if jacobian_probes < 1:
            raise ValueError(f"{name}: jacobian_probes must be >= 1, got {jacobian_probes}")
        if jacobian_normalize not in ("element", "sample", "none"):
            raise ValueError(
                f"{name}: jacobian_normalize must be 'element', 'sample' or 'none', got {jacobian_normalize!r}"
            )
        self.model = model
        self.solver = solver
        self.init = _resolve_init(name, init, z_shape, initializer, shortcut)
        self.backward = backward
        self.jacobian_regularization = bool(jacobian_regularization)
        self.jacobian_probes = int(jacobian_probes)
        self.jacobian_normalize = jacobian_normalize
        self.fixed_depth = int(fixed_depth)
        self.reapply_map = bool(reapply_map)
        modes = {False: "off", True: "eval", "off": "off", "eval": "eval", "always": "always"}
        if not isinstance(spectral_radius, (bool, str)) or spectral_radius not in modes:
            raise ValueError(
                f"{name}: spectral_radius must be False, True, 'off', 'eval' or 'always', got {spectral_radius!r}"
            )
        if (
            isinstance(spectral_radius_iters, bool)
            or not isinstance(spectral_radius_iters, int)
            or spectral_radius_iters < 1
        ):
            raise ValueError(f"{name}: spectral_radius_iters must be an int >= 1, got {spectral_radius_iters!r}")
        #: when ``solution.spectral_radius`` is computed: ``"off"``, ``"eval"`` or ``"always"``
        self.spectral_radius_mode: str = modes[spectral_radius]
        self.spectral_radius_iters = int(spectral_radius_iters)
        self.checkpoint_unrolled = bool(checkpoint_unrolled)
        self.sample_at = check_sampling(name, sample_states, sample_at, sample_grad, sample_tau)
        self.sample_states = sample_states
        self.sample_grad, self.sample_tau = int(sample_grad), float(sample_tau)
        #: ``compile=`` for the forward solver (see the class docstring); ``False``: the solver as given. Not
        #: ``self.compile``: that is ``nn.Module.compile``, which compiles the whole layer
        self.compile_solver: CompileOption = check_compile_option(name, compile)
        self._compiled_solver: Optional[Tuple[Any, Any]] = None  # (the solver it was made from, its last copy)
        self.register_load_state_dict_pre_hook(_rename_old_keys)

    # ---------------------------------------------------------------- read-only views
    #: attributes of the old Skip machinery: the guess strategy holds them now. Setting one on the layer
    #: would silently do nothing, so it raises and says where the setting lives; reading one (other than the
    #: ``shortcut`` view) raises an AttributeError that says the same, so old code fails loudly, not wrongly.
    _MOVED = {
        "shortcut": "init.shortcut",
        "skip_loss_kind": "init.skip_loss_kind",
        "detach_skip_target": "init.detach_skip_target",
        "z_shape": "init.shape",
        "initializer": "init.fn",
    }

    def __setattr__(self, name: str, value: Any) -> None:
        if name in DeepEquilibriumNetwork._MOVED:
            raise AttributeError(
                f"{type(self).__name__}.{name} is read-only: the initial-guess strategy owns it "
                f"(set layer.{DeepEquilibriumNetwork._MOVED[name]}, or pass init=...)"
            )
        super().__setattr__(name, value)

    @property
    def shortcut(self) -> Optional[nn.Module]:
        """The Skip DEQ predictor (``init.shortcut`` of a [`ShortcutGuess`][deqlab.nn.ShortcutGuess]), else ``None``. Read-only."""
        return self.init.shortcut if isinstance(self.init, ShortcutGuess) else None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in DeepEquilibriumNetwork._MOVED:
                raise
        init = self.__dict__.get("_modules", {}).get("init", self.__dict__.get("init"))
        raise AttributeError(
            f"{type(self).__name__}.{name} moved to the initial-guess strategy: read "
            f"layer.{DeepEquilibriumNetwork._MOVED[name]} (this layer's init is {type(init).__name__}; "
            f"ShortcutGuess / MapGuess hold the skip-loss settings, ZeroGuess / MapGuess / ShortcutGuess the "
            f"shape, FunctionGuess the function)"
        )

    @property
    def fixed_depth(self) -> int:
        """``0``: solve; ``d > 0``: ``d`` unrolled applications of ``f``. Setting it changes the layer for
        every thread; `fixed_depth_mode` changes it for the calling thread only."""
        override = _depth_overrides().get(self)
        return self._fixed_depth if override is None else override

    @fixed_depth.setter
    def fixed_depth(self, depth: int) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"{type(self).__name__}: fixed_depth must be an int >= 0, got {depth!r}")
        self._fixed_depth = int(depth)

    # ---------------------------------------------------------------- pieces subclasses may override
    def _map(self, z: State, x: Tensor) -> State:
        return self.model(z, x)

    def _eval_map(self, z: State, x: Tensor) -> State:
        """``f(z, x)`` as every part of the layer evaluates it. Under ``torch.autocast`` the map computes in
        low precision but its output is cast back to the state's dtype, so the solver iterates in one dtype."""
        out = self._map(z, x)
        if torch.is_autocast_enabled(x.device.type):
            zp = as_parts(z)
            if isinstance(out, Tensor):
                return out.to(zp[0].dtype) if len(zp) == 1 else out
            if isinstance(out, (list, tuple)) and len(out) == len(zp):
                return [o.to(t.dtype) if isinstance(o, Tensor) else o for o, t in zip(out, zp)]
        return out

    def _map_modules(self) -> List[nn.Module]:
        return [self.model]

    # ---------------------------------------------------------------- public helpers
    @contextlib.contextmanager
    def fixed_depth_mode(self, depth: int) -> Iterator["DeepEquilibriumNetwork"]:
        """Temporarily run as ``depth`` unrolled applications of ``f`` (``depth = 0``: solve), in the calling
        thread only (another thread using the layer meanwhile keeps its own mode).

        Args:
            depth: unrolled applications of ``f`` inside the block (``0``: solve for the fixed point).

        Returns:
            A context manager that yields the layer and restores the previous mode on exit.

        Raises:
            ValueError: ``depth`` is not an int >= 0.
        """
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"fixed_depth must be an int >= 0, got {depth!r}")
        overrides = _depth_overrides()
        old = overrides.get(self)
        overrides[self] = int(depth)
        try:
            yield self
        finally:
            if old is None:
                overrides.pop(self, None)
            else:
                overrides[self] = old

    def explicit(self, x: Tensor) -> State:
        """The explicit prediction ``u0`` alone (Skip: ``shortcut(x)``; Skip Reg.: ``f(0, x)``; else zeros),
        e.g. to log the "explicit accuracy" of a Skip DEQ without solving."""
        self._validate_input(x)
        with equilibrium_session([self]), frozen_running_stats(self._map_modules()):
            return self.init(x, CheckedMap(self._eval_map, x, name=type(self).__name__))

    # ---------------------------------------------------------------- internals
    def _validate_input(self, x: Any) -> None:
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected x to be a tensor of shape (B, ...), got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(
                f"{name}: expected a floating-point x, got dtype {x.dtype} (shape "
                f"{tuple(x.shape)}); convert it with x.float()"
            )
        if x.dim() < 2:
            raise ValueError(
                f"{name}: expected x of shape (B, ...) with a batch dimension first, got shape "
                f"{tuple(x.shape)}; for a single sample use x.unsqueeze(0) (shape "
                f"{(1, *x.shape)})"
            )
        if x.shape[0] == 0:
            raise ValueError(
                f"{name}: got an empty batch (x of shape {tuple(x.shape)}); a DEQ needs at least "
                f"one sample (skip empty batches before the layer)"
            )

    def forward(self, x: Tensor) -> Tuple[State, DeepEquilibriumSolution]:
        """Solve for the fixed point ``z* = f(z*, x)`` (or unroll ``fixed_depth`` steps).

        Args:
            x: the injection, a batch-first floating-point tensor ``(B, ...)`` with ``B >= 1``.

        Returns:
            ``(z_star, solution)``: the fixed point (a tensor, or a list of tensors for a list state),
            connected to ``x`` and the map's parameters by the backward mode, and its
            [`DeepEquilibriumSolution`][deqlab.nn.DeepEquilibriumSolution].

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` is not floating point, has no batch dimension or an empty batch; the map
                fails on the initial state or returns something not shaped like it (checked on the first
                evaluation); the initial guess has another batch size than ``x``.
            deqlab.SolverError: the forward solve did not converge and ``on_unconverged="raise"``.
        """
        self._validate_input(x)
        with equilibrium_session([self]), instrument.region("deq.forward"):
            return self._forward(x)

    def _forward(self, x: Tensor) -> Tuple[State, DeepEquilibriumSolution]:
        name = type(self).__name__
        fmap = CheckedMap(self._eval_map, x, name=name, modules=self._map_modules)
        modules = self._map_modules()
        # A train-mode BatchNorm in the map must not record the statistics of every iterate: its running
        # statistics are frozen while the map is evaluated here (and in the backward), and updated by one
        # evaluation at the returned state below (see deqlab.nn.running_stats).
        with frozen_running_stats(modules) as batch_norms:
            with instrument.region("deq.init"):
                u0 = self.init(x, fmap)
            u0_parts = as_parts(u0)
            if u0_parts[0].shape[0] != x.shape[0]:
                raise ValueError(
                    f"{name}: the initial state has batch size {u0_parts[0].shape[0]} but x has {x.shape[0]}"
                )
            is_list = not isinstance(u0, Tensor)
            start = self.init.start(u0)
            result, context, counter = None, None, None
            depth = self.fixed_depth
            steps = self._sampled_steps(depth)
            recorded = {}
            if depth > 0:
                z = start
                counter = _BackpropCounter()  # the backprop through the d steps is d VJPs, counted into the record
                step = (
                    _CheckpointedStep(fmap, is_list, modules)
                    if self.checkpoint_unrolled and torch.is_grad_enabled()
                    else fmap
                )
                for i in range(depth):
                    if steps is not None and i in steps:
                        recorded[i] = z
                    z = step(z)
                    counter.watch(as_parts(z))
            else:
                check_reversible_pairing(name, self.solver, self.backward)  # either may have been reassigned
                with torch.no_grad(), record_iterates(steps) if steps is not None else contextlib.nullcontext():
                    result = self._forward_solver()(fmap, detach(start))
                if steps is not None and result.iterates is None:
                    raise TypeError(
                        f"{name}: sample_states / sample_at need a solver that records its iterates "
                        f"(deqlab's DiscreteDEQSolver and ContinuousDEQSolver do); "
                        f"{type(self.solver).__name__} returned none"
                    )
        if depth > 0:
            with torch.no_grad():  # the residual's evaluation at z is also the running statistics' update
                fz = fmap(z)
                norm_kind = self.solver.termination.norm
                residual = per_sample_norm([a - b for a, b in zip(as_parts(fz), as_parts(z))], norm_kind)
                rel_residual = residual / (per_sample_norm(as_parts(fz), norm_kind) + 1e-12)
            z_star = z
            nfe = reference = depth
            converged = torch.zeros_like(residual, dtype=torch.bool)
            status = SolverStatus.MAX_STEPS if bool(torch.isfinite(residual).all()) else SolverStatus.NONFINITE
        else:
            assert result is not None  # depth 0: the solver ran
            if batch_norms and result.status is not SolverStatus.NONFINITE:
                with torch.no_grad():  # the one update of the running statistics, at z* (not counted in nfe)
                    fmap(detach(result.z))
            z_parts = [t.detach() for t in as_parts(result.z)]
            z_parts, context = self._attach(z_parts, x, is_list, result)
            z_star = from_parts(z_parts, is_list)
            residual, nfe = result.abs_residual.detach(), int(result.nfe)
            rel_residual = result.rel_residual.detach()
            reference = result.reference_nfe
            if reference is not None and self.jacobian_regularization and result.reference_counting == "deqjl":
                reference += 1
            converged, status = result.converged, result.status
            self.reporter.record(
                "forward",
                status is SolverStatus.CONVERGED,
                functools.partial(_describe_forward, result, getattr(self.solver, "termination", None)),
                result=result,
                stacklevel=5,
            )

        with frozen_running_stats(modules):
            if self.reapply_map:
                z_star = fmap(z_star)
                nfe += 1
            jac = self._jacobian_loss(z_star, x) if self.jacobian_regularization else x.new_zeros(())
            rho = None
            if self.spectral_radius_mode == "always" or (self.spectral_radius_mode == "eval" and not self.training):
                x_const = x.detach()
                with instrument.region("deq.spectral_radius"):
                    rho = _spectral_radius(
                        lambda z: self._eval_map(z, x_const), detach(z_star), self.spectral_radius_iters
                    )
            states = None
            if steps is not None and depth > 0:  # the unrolled iterates already carry their gradient
                states = [recorded.get(i, z_star) for i in steps] + [z_star]
            elif steps is not None:
                assert result is not None  # depth 0: the solver ran
                states = phantom_states(fmap, result.iterates, self.sample_grad, self.sample_tau) + [z_star]
                nfe += len(steps) * self.sample_grad
        skip = self.init.skip_loss(u0, z_star)
        solution = DeepEquilibriumSolution(
            z_star=z_star,
            u0=u0,
            abs_residual=residual,
            jacobian_loss=jac,
            skip_loss=x.new_zeros(()) if skip is None else skip,
            nfe=nfe,
            converged=converged,
            status=status,
            solver_result=result,
            reference_nfe=reference,
            rel_residual=rel_residual,
            spectral_radius=rho,
            states=states,
        )
        if counter is not None:
            counter.bind(solution)
        if context is not None:
            context.on_backward = functools.partial(
                _record_backward, weakref.ref(solution), self.reporter, self.backward
            )
        with torch.no_grad():
            self.init.observe(x.detach(), detach(z_star))
        return z_star, solution

    def _sampled_steps(self, depth: int) -> Optional[List[int]]:
        """The solver steps of the intermediate sampled states (``None``: no sampling)."""
        if self.sample_at is not None:
            return list(self.sample_at)
        if self.sample_states is None:
            return None
        budget = depth if depth > 0 else getattr(self.solver, "max_steps", None)
        if not isinstance(budget, int):
            raise TypeError(
                f"{type(self).__name__}: sample_states spreads the states over the solver's max_steps, "
                f"which {type(self.solver).__name__} does not have; pass sample_at=[...] instead"
            )
        return sample_steps(self.sample_states, budget)

    def _attach(
        self, z_parts: List[Tensor], x: Tensor, is_list: bool, result: Any = None
    ) -> Tuple[List[Tensor], Optional[_GradientContext]]:
        if not torch.is_grad_enabled():
            return z_parts, None
        modules = self._map_modules()
        seen, params = set(), []
        for m in modules:
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        stateful = stateful_modules(modules)
        snapshots = [m.deq_state() for m in stateful]
        grad_slots, grad_state = [], []
        for i, snap in enumerate(snapshots):
            for key, val in snap.items():
                if isinstance(val, Tensor) and val.requires_grad:
                    grad_slots.append((i, key))
                    grad_state.append(val)
        if not (x.requires_grad or params or grad_state):
            return z_parts, None
        device = x.device.type
        autocast = (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
        problem_args = dict(
            f=self._eval_map,
            is_list=is_list,
            autocast=autocast,
            forward_tol=float(self.solver.termination.tol),
            stateful=stateful,
            snapshots=snapshots,
            grad_slots=grad_slots,
            owner=self,
            map_modules=modules,
            solver_result=result,
        )
        context = _GradientContext(problem_args, self._backward_mode(), n_parts=len(z_parts), n_params=len(params))
        return attach_gradient(context, z_parts, x, params, grad_state), context

    def _jacobian_loss(self, z_star: State, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return x.new_zeros(())
        z = [t.detach().requires_grad_() for t in as_parts(z_star)]
        is_list = not isinstance(z_star, Tensor)
        fz = self._eval_map(from_parts(z, is_list), x)
        return jacobian_frobenius_estimate(
            fz, z, n_probes=self.jacobian_probes, normalize=self.jacobian_normalize, create_graph=True
        )

    def extra_repr(self) -> str:
        return (
            f"solver={self.solver!r}, backward={self.backward!r}, "
            f"jacobian_regularization={self.jacobian_regularization}, fixed_depth={self.fixed_depth}"
            + (", reapply_map=True" if self.reapply_map else "")
            + (f", spectral_radius={self.spectral_radius_mode!r}" if self.spectral_radius_mode != "off" else "")
            + (", checkpoint_unrolled=True" if self.checkpoint_unrolled else "")
            + (f", compile={self.compile_solver!r}" if self.compile_solver is not False else "")
        )

    def _forward_solver(self) -> Any:
        """``self.solver``, or with ``compile`` set a copy of it that compiles.

        A fresh shallow copy per forward (cheap: the compiled graphs live in a cache keyed by the solver's
        configuration), so a setting changed on ``self.solver`` after the first forward (``max_steps``, the
        termination) is the one the next solve uses; only a failed compilation is carried over, so it is
        warned about and attempted once per solver.
        """
        solver, option = self.solver, self.compile_solver
        if option is False or getattr(solver, "compile", False) is not False:
            return solver
        cached = self._compiled_solver
        same = cached is not None and cached[0] is solver
        if not isinstance(solver, (DiscreteDEQSolver, ContinuousDEQSolver)):
            if not same:
                warnings.warn(
                    f"{type(self).__name__}(compile={option!r}): {type(solver).__name__} has no compiled "
                    f"iteration (deqlab's DiscreteDEQSolver and ContinuousDEQSolver have); solving eager",
                    CompileFallbackWarning,
                    stacklevel=user_stacklevel(),
                )
                self._compiled_solver = (solver, solver)
            return solver
        twin = copy.copy(solver)
        twin.compile = option
        twin._compile_failed = bool(same and getattr(cached[1], "_compile_failed", False))  # type: ignore[index]
        self._compiled_solver = (solver, twin)
        return twin

    def _backward_mode(self) -> BackwardMode:
        """``self.backward``, or with ``compile`` set and a named ``ImplicitBackward`` (``"gmres"``,
        ``"anderson"``, ...) that does not compile, a copy whose adjoint solver compiles its steps (fresh per
        forward, like the solver's, so a budget changed on ``self.backward`` applies)."""
        from deqlab.nn.implicit import _COMPILABLE_ADJOINTS

        backward, option = self.backward, self.compile_solver
        if option is False or not isinstance(backward, ImplicitBackward) or backward.solver not in _COMPILABLE_ADJOINTS:
            return backward
        if backward.compile is not False:
            return backward
        twin = copy.copy(backward)
        twin.compile, twin._built = option, {}
        return twin


DEQ = DeepEquilibriumNetwork


class _CheckpointedStep:
    """One application of ``f`` under gradient checkpointing (``checkpoint_unrolled=True``).

    The recomputation runs in the backward, after the layer's forward ended: the per-solve state of the
    map's [`EquilibriumStateful`][deqlab.nn.EquilibriumStateful] modules (normalised weights, the dropout
    mask) is re-installed as the step saw it, and train-mode BatchNorms do not update their running
    statistics a second time, so the recomputed step is the step that ran.
    """

    def __init__(self, fmap: Callable[[State], State], is_list: bool, modules: Sequence[nn.Module]):
        self.fmap = fmap
        self.is_list = is_list
        self.modules = list(modules)
        self.stateful = stateful_modules(self.modules)

    def __call__(self, z: State) -> State:
        from torch.utils.checkpoint import checkpoint

        snapshot: List[Any] = []

        def run(*parts: Tensor) -> Tuple[Tensor, ...]:
            if snapshot:  # the recomputation in the backward: the forward's module state, its statistics
                old = [m.deq_state() for m in self.stateful]
                for m, s in zip(self.stateful, snapshot[0]):
                    m.deq_load_state(s)
                try:
                    with frozen_running_stats(self.modules):
                        out = self.fmap(from_parts(list(parts), self.is_list))
                finally:
                    for m, s in zip(self.stateful, old):
                        m.deq_load_state(s)
            else:
                out = self.fmap(from_parts(list(parts), self.is_list))
                snapshot.append([m.deq_state() for m in self.stateful])
            return tuple(as_parts(out))

        out = checkpoint(run, *as_parts(z), use_reentrant=False)
        return from_parts(list(out), self.is_list)


def _describe_forward(result: Any, termination: Any = None) -> str:
    """The unconverged forward's warning text. Stalled samples (stopped by the patience rule near, not
    within, the tolerance) are named as such: they need a looser tolerance or a better-conditioned map,
    not more steps."""
    unconverged = float((~result.converged).float().mean())
    objective = getattr(result, "objective", None)
    if objective is not None and objective.numel():
        what = (
            f"max {result.objective_name} {float(objective.max()):.3g} (the stopping test's objective; "
            f"tolerance {result.tolerance:g})"
        )
    else:
        what = f"max absolute residual {float(result.abs_residual.max()):.3g}"
    text = f"status {result.status.value}, {what}, {unconverged:.0%} of the samples unconverged"
    stalled = getattr(result, "stalled", None)
    if stalled is not None and bool(stalled.any()):
        mult = getattr(termination, "patience_objective_multiplier", 3.0)
        text += (
            f" ({float(stalled.float().mean()):.0%} stalled within {mult:g}x tolerance: the patience rule "
            f"stopped them near, not within, the tolerance)"
        )
    return f"{text}, nfe {result.nfe}"


def _skip_init(
    owner: str, kwargs: dict, shortcut: Any, skip_loss: SkipLoss, detach_skip_target: Optional[bool], shape: Any
) -> InitialGuess:
    """The guess a Skip constructor builds: ``ShortcutGuess(shortcut)`` or, without one, ``MapGuess()``.
    ``detach_skip_target=None`` takes each guess's own default (detached for a shortcut, coupled for
    Skip Reg.)."""
    what = "shortcut" if shortcut is not None else "the Skip Reg. default (no shortcut: u0 = f(0, x), MapGuess())"
    for key in ("init", "initializer", "shortcut"):
        if kwargs.get(key) is not None:
            raise ValueError(
                f"{owner}: {key} and {what} both set the initial state u0; a Skip layer builds "
                f"its own (ShortcutGuess(shortcut) or MapGuess()). Pass init=... to "
                f"DeepEquilibriumNetwork instead"
            )
        kwargs.pop(key, None)
    coupling = {} if detach_skip_target is None else {"detach_skip_target": bool(detach_skip_target)}
    if shortcut is not None:
        return ShortcutGuess(shortcut, skip_loss=skip_loss, shape=shape, **coupling)
    return MapGuess(skip_loss=skip_loss, shape=shape, **coupling)


class SkipDeepEquilibriumNetwork(DeepEquilibriumNetwork):
    """Skip DEQ (with a ``shortcut``) or Skip Reg. DEQ (``shortcut=None``): a constructor for
    ``DeepEquilibriumNetwork(model, solver, init=ShortcutGuess(shortcut, ...))`` or ``init=MapGuess(...)``.

    * Skip DEQ: ``u0 = shortcut(x)`` enters the solve *detached*; the shortcut learns only through
      ``solution.skip_loss``.
    * Skip Reg. DEQ: ``u0 = f(0, x)`` (one application of the map, differentiable, no extra parameters).

    ``solution.skip_loss`` is ``mean|u0 − z*|`` (``"l1"``, the paper's) or ``mean (u0 − z*)²`` (``"l2"``).
    With a shortcut, ``z*`` is by default a *detached target* in this loss: the skip loss trains the
    predictor towards the fixed point and does not pull the fixed point towards the predictor (which would
    also cost a second adjoint solve). For Skip Reg. the default is the reference package's coupling (the
    loss also differentiates through ``z*``): a detached target lets ``|z*|`` run away, see
    [`MapGuess`][deqlab.nn.MapGuess]. ``detach_skip_target=True``/``False`` forces either form.

    Args:
        model: the map ``f(z, x)``, as in [`DeepEquilibriumNetwork`][deqlab.nn.DeepEquilibriumNetwork]. Required.
        solver: the forward solver (a solver object, a registered name or a callable), as in
            [`DeepEquilibriumNetwork`][deqlab.nn.DeepEquilibriumNetwork]. Required.
        shortcut: the explicit predictor ``x -> u0`` (state-shaped output): a Skip DEQ. Default ``None``:
            Skip Reg. DEQ, ``u0 = f(0, x)``, which needs no extra module or parameters.
        skip_loss: ``"l1"`` (default, ``mean|u0 − z*|``, the paper's loss) or ``"l2"``
            (``mean (u0 − z*)²``).
        detach_skip_target: whether ``z*`` is a constant target in the skip loss. Default ``None``: the
            guess's own default, a detached target with a shortcut (``True``) and the coupled loss for
            Skip Reg. (``False``), for the reasons above.
        **kwargs: the keyword arguments of [`DeepEquilibriumNetwork`][deqlab.nn.DeepEquilibriumNetwork] except ``init``/``initializer``
            (a Skip layer builds its own guess); ``z_shape`` is the state shape (the zeros ``f`` is applied
            to in Skip Reg.; checked against the shortcut's output in Skip DEQ).

    Raises:
        ValueError: ``init`` or ``initializer`` is passed (the Skip layer sets ``u0`` itself);
            ``skip_loss`` is not ``"l1"`` or ``"l2"``; and the errors of [`DeepEquilibriumNetwork`][deqlab.nn.DeepEquilibriumNetwork].
        TypeError: ``shortcut`` is neither a module nor a sequence of modules; and the errors of
            [`DeepEquilibriumNetwork`][deqlab.nn.DeepEquilibriumNetwork].

    Example:
        Skip DEQ on ``f(z, x) = z / 2 + x`` with a linear predictor of the fixed point:

        >>> import torch
        >>> from torch import nn
        >>> from deqlab.nn import SkipDeepEquilibriumNetwork
        >>> from deqlab.solvers import DiscreteDEQSolver
        >>> class Half(nn.Module):
        ...     def forward(self, z, x):
        ...         return 0.5 * z + x
        >>> solver = DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-6, max_steps=30)
        >>> skip = SkipDeepEquilibriumNetwork(Half(), solver, nn.Linear(3, 3))
        >>> z_star, solution = skip(torch.ones(2, 3))
        >>> bool(solution.converged.all()), solution.skip_loss.shape   # skip_loss trains the shortcut
        (True, torch.Size([]))
        >>> skip_reg = SkipDeepEquilibriumNetwork(Half(), solver)       # Skip Reg.: u0 = f(0, x) = x
        >>> z_star, solution = skip_reg(torch.ones(2, 3))
        >>> solution.u0.tolist(), round(float(solution.skip_loss), 3)   # mean |x - 2x| = 1
        ([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], 1.0)
    """

    def __init__(
        self,
        model: nn.Module,
        solver: Any,
        shortcut: Optional[nn.Module] = None,
        *,
        skip_loss: SkipLoss = "l1",
        detach_skip_target: Optional[bool] = None,
        **kwargs: Any,
    ):
        init = _skip_init(
            type(self).__name__, kwargs, shortcut, skip_loss, detach_skip_target, kwargs.pop("z_shape", None)
        )
        super().__init__(model, solver, init=init, **kwargs)


SkipDEQ = SkipDeepEquilibriumNetwork


class _Zero(nn.Module):
    """Marks a missing off-diagonal entry of a mapping matrix (no connection)."""

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - never called
        raise RuntimeError("_Zero is a placeholder")


class MultiScaleMap(nn.Module):
    """The multiscale DEQ map ``f(z, x)`` on a list state ``z = [z_1, …, z_n]``.

    ``m_1 = main_layers[0](z_1, x)``, ``m_i = main_layers[i](z_i)`` (i > 1);
    ``out_j = Σ_i mapping_layers[i][j](m_i)`` (``None`` on the diagonal means identity, ``None`` off the
    diagonal means no connection); then ``post_fuse_layers[j](out_j)`` when given.

    Args:
        main_layers: one module per scale; ``main_layers[0](z_1, x)`` gets the injection, the others are
            called as ``main_layers[i](z_i)``. Their number is the number of scales. Required.
        mapping_layers: ``n × n`` matrix of modules, entry ``[i][j]`` maps scale ``i`` to scale ``j``;
            ``None`` on the diagonal is the identity (a scale keeps its own features without a module),
            ``None`` off the diagonal is no connection (so sparse fusions need no placeholder modules).
            Required.
        post_fuse_layers: one module (or ``None``: identity) per scale, applied to the fused output.
            Default ``None``: no post-fuse step, the fused sum is the output.

    Raises:
        ValueError: ``mapping_layers`` is not an ``n × n`` matrix for ``n = len(main_layers)``, or
            ``post_fuse_layers`` does not have ``n`` entries.

    Example:
        Two scales (widths 2 and 3), scale 1 feeding scale 2 through a linear map:

        >>> import torch
        >>> from torch import nn
        >>> class Half(nn.Module):                  # z / 2 (+ x on the scale that gets the injection)
        ...     def forward(self, z, x=None):
        ...         return 0.5 * z if x is None else 0.5 * z + x
        >>> from deqlab.nn import MultiScaleMap
        >>> f = MultiScaleMap([Half(), Half()], [[None, nn.Linear(2, 3)], [None, None]])
        >>> out = f([torch.zeros(1, 2), torch.zeros(1, 3)], torch.ones(1, 2))
        >>> f.num_scales, [tuple(o.shape) for o in out], out[0].tolist()
        (2, [(1, 2), (1, 3)], [[1.0, 1.0]])
    """

    def __init__(
        self,
        main_layers: Sequence[nn.Module],
        mapping_layers: Sequence[Sequence[Optional[nn.Module]]],
        post_fuse_layers: Optional[Sequence[Optional[nn.Module]]] = None,
    ):
        super().__init__()
        n = len(main_layers)
        if len(mapping_layers) != n or any(len(row) != n for row in mapping_layers):
            raise ValueError(
                f"MultiScaleMap: mapping_layers must be a {n}x{n} matrix (one row and column per "
                f"scale), got rows of lengths {[len(r) for r in mapping_layers]}"
            )
        if post_fuse_layers is not None and len(post_fuse_layers) != n:
            raise ValueError(f"MultiScaleMap: expected {n} post_fuse_layers, got {len(post_fuse_layers)}")
        self.main_layers = nn.ModuleList(main_layers)
        rows = []
        for i, row in enumerate(mapping_layers):
            rows.append(
                nn.ModuleList([(nn.Identity() if i == j else _Zero()) if m is None else m for j, m in enumerate(row)])
            )
        self.mapping_layers = nn.ModuleList(rows)
        self.post_fuse_layers = (
            None
            if post_fuse_layers is None
            else nn.ModuleList([nn.Identity() if m is None else m for m in post_fuse_layers])
        )

    @property
    def num_scales(self) -> int:
        """The number of scales (``len(main_layers)``)."""
        return len(self.main_layers)

    def forward(self, z: Sequence[Tensor], x: Tensor) -> List[Tensor]:
        n = self.num_scales
        if len(z) != n:
            raise ValueError(f"MultiScaleMap: expected a state of {n} scales, got {len(z)}")
        main = [self.main_layers[0](z[0], x)] + [self.main_layers[i](z[i]) for i in range(1, n)]
        out: List[Tensor] = []
        for j in range(n):
            acc = None
            for i in range(n):
                m = cast(nn.ModuleList, self.mapping_layers[i])[j]  # a row of the matrix
                if isinstance(m, _Zero):
                    continue
                y = m(main[i])
                acc = y if acc is None else acc + y
            if self.post_fuse_layers is not None:
                acc = self.post_fuse_layers[j](acc)
            out.append(cast(Tensor, acc))  # the diagonal entry (identity at least) is never _Zero
        return out


class MultiScaleDeepEquilibriumNetwork(DeepEquilibriumNetwork):
    """Multiscale (MDEQ-style) DEQ whose state is a list of tensors, one per resolution: a constructor for
    ``DeepEquilibriumNetwork(MultiScaleMap(...), solver, init=ZeroGuess(shape=scales))``.

    Args:
        main_layers: one module per scale; ``main_layers[0](z_1, x)`` gets the injection, the others
            ``main_layers[i](z_i)``. Required.
        mapping_layers: ``n × n`` matrix, entry ``[i][j]`` maps scale ``i`` to scale ``j``
            (``None``/``nn.Identity()`` on the diagonal, ``None`` off it: no connection). Required.
        post_fuse_layers: per-scale modules applied after the fusion, or ``None`` for no post-fuse step.
            Positional with no default, in the order of the reference package's constructor
            ``(main_layers, mapping_layers, post_fuse_layers, solver, scales)``.
        solver: the forward solver, as in [`DeepEquilibriumNetwork`][deqlab.nn.DeepEquilibriumNetwork] (every deqlab solver accepts list
            states). Required.
        scales: per-sample shapes of the state, one per main layer, e.g. ``[(8, 28, 28), (16, 14, 14)]``.
            Required: the state's shapes differ from ``x``'s, so they cannot be inferred.
        **kwargs: the keyword arguments of [`DeepEquilibriumNetwork`][deqlab.nn.DeepEquilibriumNetwork] (except ``z_shape``, which
            ``scales`` replaces); ``init`` defaults to ``ZeroGuess(shape=scales)`` (zeros at every scale,
            the vanilla start).

    ``forward(x)`` returns ``(list of z*_i, solution)``.

    Raises:
        TypeError: ``z_shape`` is passed (use ``scales``); and the errors of [`DeepEquilibriumNetwork`][deqlab.nn.DeepEquilibriumNetwork].
        ValueError: ``len(scales)`` differs from the number of main layers; ``mapping_layers`` or
            ``post_fuse_layers`` have the wrong size (see [`MultiScaleMap`][deqlab.nn.MultiScaleMap]); and the errors of
            [`DeepEquilibriumNetwork`][deqlab.nn.DeepEquilibriumNetwork].

    Example:
        Two scales (widths 2 and 3); the fixed point of scale 1 is ``2x``:

        >>> import torch
        >>> from torch import nn
        >>> class Half(nn.Module):                  # z / 2 (+ x on the scale that gets the injection)
        ...     def forward(self, z, x=None):
        ...         return 0.5 * z if x is None else 0.5 * z + x
        >>> from deqlab.nn import MultiScaleDeepEquilibriumNetwork
        >>> from deqlab.solvers import DiscreteDEQSolver
        >>> solver = DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-6, max_steps=30)
        >>> mdeq = MultiScaleDeepEquilibriumNetwork([Half(), Half()], [[None, nn.Linear(2, 3)], [None, None]],
        ...                                         None, solver, scales=[(2,), (3,)])
        >>> zs, solution = mdeq(torch.ones(4, 2))
        >>> [tuple(z.shape) for z in zs], solution.status.value
        ([(4, 2), (4, 3)], 'converged')
        >>> torch.allclose(zs[0], torch.full((4, 2), 2.0), atol=1e-5)
        True
    """

    def __init__(
        self,
        main_layers: Sequence[nn.Module],
        mapping_layers: Sequence[Sequence[Optional[nn.Module]]],
        post_fuse_layers: Optional[Sequence[Optional[nn.Module]]],
        solver: Any,
        scales: Sequence[Sequence[int]],
        **kwargs: Any,
    ):
        if "z_shape" in kwargs:
            raise TypeError(f"{type(self).__name__}: use scales=..., not z_shape")
        model = MultiScaleMap(main_layers, mapping_layers, post_fuse_layers)
        if len(scales) != model.num_scales:
            raise ValueError(f"{type(self).__name__}: got {len(scales)} scales for {model.num_scales} main layers")
        scales = [tuple(int(d) for d in s) for s in scales]
        if all(kwargs.get(k) is None for k in ("init", "initializer", "shortcut")):
            kwargs["init"] = ZeroGuess(shape=scales)
        super().__init__(model, solver, **kwargs)
        self.scales = scales


class MultiScaleSkipDeepEquilibriumNetwork(MultiScaleDeepEquilibriumNetwork):
    """Multiscale Skip DEQ (``shortcut_layers`` given) or Skip Reg. DEQ (``shortcut_layers=None``): the
    multiscale layer with ``init=ShortcutGuess(shortcut_layers, shape=scales)`` or ``MapGuess(shape=scales)``.

    Args:
        main_layers: one module per scale, as in [`MultiScaleDeepEquilibriumNetwork`][deqlab.nn.MultiScaleDeepEquilibriumNetwork]. Required.
        mapping_layers: the ``n × n`` fusion matrix, as in [`MultiScaleDeepEquilibriumNetwork`][deqlab.nn.MultiScaleDeepEquilibriumNetwork].
            Required.
        post_fuse_layers: per-scale post-fuse modules or ``None``, as in
            [`MultiScaleDeepEquilibriumNetwork`][deqlab.nn.MultiScaleDeepEquilibriumNetwork]. Required (positional).
        solver: the forward solver, as in [`DeepEquilibriumNetwork`][deqlab.nn.DeepEquilibriumNetwork]. Required.
        scales: per-sample shapes of the state, one per scale. Required.
        shortcut_layers: a sequence of modules, one per scale, each applied to ``x``; or one module that
            returns the list of per-scale initial states. Default ``None``: Skip Reg., ``u0 = f(0, x)``,
            which needs no extra modules.
        skip_loss: ``"l1"`` (default, the paper's ``mean|u0 − z*|``) or ``"l2"``, as in
            [`SkipDeepEquilibriumNetwork`][deqlab.nn.SkipDeepEquilibriumNetwork].
        detach_skip_target: whether ``z*`` is a constant target in the skip loss. Default ``None``: the
            guess's own default (detached with shortcut layers, coupled for Skip Reg.), as in
            [`SkipDeepEquilibriumNetwork`][deqlab.nn.SkipDeepEquilibriumNetwork].
        **kwargs: the keyword arguments of [`DeepEquilibriumNetwork`][deqlab.nn.DeepEquilibriumNetwork] except ``z_shape``, ``init`` and
            ``initializer`` (the layer builds its own guess from ``scales``).

    Raises:
        ValueError: ``shortcut_layers`` is a sequence whose length is not ``len(scales)``; ``init`` or
            ``initializer`` is passed; ``skip_loss`` is not ``"l1"`` or ``"l2"``; and the errors of
            [`MultiScaleDeepEquilibriumNetwork`][deqlab.nn.MultiScaleDeepEquilibriumNetwork].
        TypeError: ``shortcut_layers`` is neither a module nor a sequence of modules; and the errors of
            [`MultiScaleDeepEquilibriumNetwork`][deqlab.nn.MultiScaleDeepEquilibriumNetwork].

    Example:
        Multiscale Skip DEQ with one linear predictor per scale, and its Skip Reg. form:

        >>> import torch
        >>> from torch import nn
        >>> class Half(nn.Module):                  # z / 2 (+ x on the scale that gets the injection)
        ...     def forward(self, z, x=None):
        ...         return 0.5 * z if x is None else 0.5 * z + x
        >>> from deqlab.nn import MultiScaleSkipDeepEquilibriumNetwork
        >>> from deqlab.solvers import DiscreteDEQSolver
        >>> solver = DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-6, max_steps=30)
        >>> def fusion():
        ...     return [[None, nn.Linear(2, 3)], [None, None]]
        >>> skip = MultiScaleSkipDeepEquilibriumNetwork([Half(), Half()], fusion(), None, solver, [(2,), (3,)],
        ...                                             [nn.Linear(2, 2), nn.Linear(2, 3)])
        >>> zs, solution = skip(torch.ones(4, 2))
        >>> [tuple(z.shape) for z in zs], solution.status.value, solution.skip_loss.requires_grad
        ([(4, 2), (4, 3)], 'converged', True)
        >>> skip_reg = MultiScaleSkipDeepEquilibriumNetwork([Half(), Half()], fusion(), None, solver, [(2,), (3,)])
        >>> zs, solution = skip_reg(torch.ones(4, 2))
        >>> solution.u0[0].tolist()[0]              # u0 = f(0, x): scale 1 starts at x
        [1.0, 1.0]
    """

    def __init__(
        self,
        main_layers: Sequence[nn.Module],
        mapping_layers: Sequence[Sequence[Optional[nn.Module]]],
        post_fuse_layers: Optional[Sequence[Optional[nn.Module]]],
        solver: Any,
        scales: Sequence[Sequence[int]],
        shortcut_layers: Union[None, nn.Module, Sequence[nn.Module]] = None,
        *,
        skip_loss: SkipLoss = "l1",
        detach_skip_target: Optional[bool] = None,
        **kwargs: Any,
    ):
        name = type(self).__name__
        if (
            shortcut_layers is not None
            and not isinstance(shortcut_layers, nn.Module)
            and len(shortcut_layers) != len(scales)
        ):
            raise ValueError(f"{name}: expected {len(scales)} shortcut_layers, got {len(shortcut_layers)}")
        shapes = [tuple(int(d) for d in s) for s in scales]
        init = _skip_init(name, kwargs, shortcut_layers, skip_loss, detach_skip_target, shapes)
        super().__init__(main_layers, mapping_layers, post_fuse_layers, solver, scales, init=init, **kwargs)
