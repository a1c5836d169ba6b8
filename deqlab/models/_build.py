"""Solver, adjoint and DEQ-layer construction shared by every paper model and by the zoo.

Why one place: each experiment names a model type (a `deqlab.spec.ModelKind`) and a solve (a
`deqlab.spec.SolverSpec` / `deqlab.spec.BackwardSpec`, or a solver name); turning those into deqlab objects
is the same code for the dense MNIST model, every multiscale network and the Lightning zoo
(``deqlab.zoo.build_solver`` and ``deqlab.zoo.build_backward`` are these functions), so it lives here once:
`build_solver` and `build_backward` are the one builder of each.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Literal, Optional, Sequence, Union, cast

from torch import Tensor, nn

from deqlab._compat import renamed
from deqlab.nn import (
    BackwardMode,
    DeepEquilibriumNetwork,
    ImplicitBackward,
    MultiScaleDeepEquilibriumNetwork,
    MultiScaleNeuralODE,
    MultiScaleSkipDeepEquilibriumNetwork,
    SkipDeepEquilibriumNetwork,
    ZeroGuess,
)
from deqlab.solvers import ContinuousDEQSolver, DiscreteDEQSolver
from deqlab.solvers.protocols import Solver
from deqlab.spec import (
    MODEL_TYPES,
    ODE_SOLVERS,
    PAPER_TOL,
    SOLVER_KINDS,
    BackwardSpec,
    ModelKind,
    ModelType,
    ODESolverName,
    SolverKind,
    SolverSpec,
    model_kind,
)

__all__ = [
    "MODEL_TYPES",
    "SOLVER_KINDS",
    "ODE_SOLVERS",
    "ModelType",
    "SolverKind",
    "build_solver",
    "build_backward",
    "check_choice",
    "check_fields",
    "PaperNetwork",
]

SolverName = Literal["lbroyden", "broyden", "anderson", "fixed_point", "newton_krylov", "tsit5", "vcab3"]
BackwardName = Literal["gmres", "anderson", "fixed_point", "broyden", "lbroyden"]
TerminationModeName = Literal[
    "abs",
    "abs_norm",
    "rel",
    "rel_norm",
    "norm",
    "abs_deq_default",
    "rel_deq_default",
    "abs_deq_best",
    "rel_deq_best",
]


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raise unless ``value`` is one of ``choices``, naming the argument and every valid value.

    Args:
        name: the argument's name, for the message.
        value: what the caller passed.
        choices: the valid values.

    Raises:
        ValueError: when ``value`` is not in ``choices``.

    Examples:
        >>> from deqlab.models._build import SOLVER_KINDS, check_choice
        >>> check_choice("solver", "discrete", SOLVER_KINDS)
        >>> check_choice("solver", "euler", SOLVER_KINDS)
        Traceback (most recent call last):
        ...
        ValueError: solver must be one of 'continuous', 'discrete', got 'euler'
    """
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_fields(owner: str, given: Any, fields: Sequence[str]) -> None:
    """Raise ``TypeError`` for a keyword that is not one of ``fields`` (a config's), naming the closest one
    and every valid name: an override with a typo must not be ignored, nor need a lookup to fix."""
    import difflib

    unknown = sorted(set(given) - set(fields))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(
            f"{owner}() got an unexpected keyword argument {unknown[0]!r}{hint}; valid: {', '.join(sorted(fields))}"
        )


def build_solver(
    name: Union[SolverName, SolverSpec],
    *,
    mode: Optional[TerminationModeName] = None,
    abstol_termination: Optional[float] = None,
    reltol_termination: Optional[float] = None,
    ode_abstol: Optional[float] = None,
    ode_reltol: Optional[float] = None,
    max_steps: Optional[int] = None,
    reference_counting: Optional[str] = None,
    batch_wide: Optional[bool] = None,
    abstol: Optional[float] = None,
    reltol: Optional[float] = None,
    compile: Optional[bool] = None,
    check_every: Optional[int] = None,
    cuda_graphs: Optional[bool] = None,
) -> Solver:
    """A deqlab solver from a `deqlab.spec.SolverSpec`, or from a name (the string shorthand of the zoo's
    ``solver`` argument) and keywords: ``tsit5`` or ``vcab3`` → ``ContinuousDEQSolver`` with that
    integrator (integrate to the steady state), anything else → ``DiscreteDEQSolver(name)``. The one
    builder of a forward solver: the paper models build theirs from their config's spec through here.

    Two tolerances are named apart: the *termination* tolerances (how close to the fixed point the solve
    stops, every solver) and the *ODE step* tolerances (how accurately the integrator follows the flow). The
    ODE ones default to the termination ones, so the integration is as accurate as the stopping test, as in
    the paper-era code.

    Args:
        name: a `deqlab.spec.SolverSpec` (then no keyword may be given: the spec says everything), or
            ``lbroyden``, ``broyden``, ``anderson``, ``fixed_point``, ``newton_krylov`` (discrete solvers),
            ``tsit5`` or ``vcab3`` (the continuous DEQ, with that ODE method). No default: the zoo models
            pass theirs.
        mode: termination mode of the solve (see `deqlab.solvers.termination`). ``None`` (default):
            ``rel_deq_default``, the paper's: stop when ``||f(z) - z|| / ||f(z)||`` is below
            ``reltol_termination`` (or, after a patience window, report ``stalled`` near it).
        abstol_termination: absolute termination tolerance. ``None`` (default): 5e-3, the paper's.
        reltol_termination: relative termination tolerance. ``None`` (default): 5e-3, the paper's.
        ode_abstol: continuous only: the ODE stepper's absolute local error tolerance. ``None`` (default):
            ``abstol_termination``.
        ode_reltol: continuous only: the ODE stepper's relative local error tolerance. ``None`` (default):
            ``reltol_termination``.
        max_steps: iteration budget (solver steps; stepper calls, accepted or rejected, for a continuous
            solve). ``None`` (default): 50, the paper's MNIST budget.
        reference_counting: the convention of ``reference_nfe`` (the paper's NFE count beside ours, see
            `deqlab.solvers.counting`). ``None`` (default): ``"deqjl"``.
        batch_wide: one termination test over the whole batch (the reference code's semantics). ``None``
            (default): ``False``, each sample stops on its own.
        abstol: deprecated old name of ``abstol_termination`` (warns ``DeprecationWarning``); default
            ``None`` (not given).
        reltol: deprecated old name of ``reltol_termination`` (warns); default ``None`` (not given).
        compile: each solver iteration as one compiled graph (the solvers' ``compile=True``; Tsit5/Dopri5
            and the discrete algorithms with a pure step). ``None`` (default): ``False``.
        check_every: host checks every ``k`` steps (the solvers' ``check_every``). ``None`` (default): 1.
        cuda_graphs: on CUDA, the ``check_every`` steps replayed as one CUDA graph (the solvers'
            ``cuda_graphs``). ``None`` (default): ``False``.

    Returns:
        A ``ContinuousDEQSolver`` for ``tsit5`` / ``vcab3``, else a ``DiscreteDEQSolver``; pass it as a
            layer's or a zoo model's ``solver``.

    Raises:
        ValueError: from the solver for an unknown ``name`` or ``mode``; when a tolerance is given under
            both its names; when an ODE tolerance is given for a discrete solver (it has no ODE).
        TypeError: keywords given together with a spec.

    Examples:
        >>> from deqlab.spec import SolverSpec
        >>> from deqlab.zoo import build_solver
        >>> build_solver("anderson", max_steps=20)
        DiscreteDEQSolver(Anderson(...), mode='rel_deq_default', abstol_termination=0.005, reltol_termination=0.005, ..., max_steps=20)
        >>> s = build_solver("tsit5", reltol_termination=1e-2, ode_reltol=1e-4)
        >>> s.termination.reltol, s.ode_reltol, s.ode_abstol
        (0.01, 0.0001, 0.005)
        >>> build_solver(SolverSpec(kind="continuous", ode_solver="vcab3", tol=5e-2, max_steps=18)).ode_solver
        'vcab3'
    """
    owner = "build_solver"
    if isinstance(name, SolverSpec):
        given = [
            k
            for k, v in dict(
                mode=mode,
                abstol_termination=abstol_termination,
                reltol_termination=reltol_termination,
                ode_abstol=ode_abstol,
                ode_reltol=ode_reltol,
                max_steps=max_steps,
                reference_counting=reference_counting,
                batch_wide=batch_wide,
                abstol=abstol,
                reltol=reltol,
                compile=compile,
                check_every=check_every,
                cuda_graphs=cuda_graphs,
            ).items()
            if v is not None
        ]
        if given:
            raise TypeError(
                f"{owner}: pass a SolverSpec or keywords, not both; got the spec with "
                f"{', '.join(given)} (set them on the spec: dataclasses.replace(spec, ...))"
            )
        spec = name
        ode = spec.ode_tolerance if spec.kind == "continuous" else None
        # the spec holds the names as plain strings; the solver checks them
        return build_solver(
            cast(SolverName, spec.name),
            mode=cast(TerminationModeName, spec.mode),
            abstol_termination=spec.tol,
            reltol_termination=spec.tol,
            ode_abstol=ode,
            ode_reltol=ode,
            max_steps=spec.max_steps,
            reference_counting=spec.reference_counting,
            batch_wide=spec.batch_wide,
            compile=spec.compile,
            check_every=spec.check_every,
            cuda_graphs=spec.cuda_graphs,
        )
    atol = renamed(owner, "abstol_termination", abstol_termination, "abstol", abstol, PAPER_TOL)
    rtol = renamed(owner, "reltol_termination", reltol_termination, "reltol", reltol, PAPER_TOL)
    common: Dict[str, Any] = dict(
        mode=mode or "rel_deq_default",
        abstol_termination=atol,
        reltol_termination=rtol,
        max_steps=50 if max_steps is None else max_steps,
        reference_counting=reference_counting or "deqjl",
        batch_wide=bool(batch_wide),
        compile=bool(compile),
        check_every=1 if check_every is None else check_every,
        cuda_graphs=bool(cuda_graphs),
    )
    if name in ODE_SOLVERS:
        return ContinuousDEQSolver(
            cast(ODESolverName, name),  # one of ODE_SOLVERS
            ode_abstol=atol if ode_abstol is None else ode_abstol,
            ode_reltol=rtol if ode_reltol is None else ode_reltol,
            **common,
        )
    given = [k for k, v in (("ode_abstol", ode_abstol), ("ode_reltol", ode_reltol)) if v is not None]
    if given:
        raise ValueError(
            f"{owner}: {', '.join(given)} set the ODE stepper of 'tsit5' / 'vcab3'; the discrete solver {name!r} "
            "has none: drop it, or use abstol_termination / reltol_termination"
        )
    return DiscreteDEQSolver(name, **common)


def build_backward(
    name: Union[BackwardName, BackwardSpec] = "gmres", *, tol: Optional[float] = None, max_steps: Optional[int] = None
) -> BackwardMode:
    """The implicit backward from a `deqlab.spec.BackwardSpec`, or with adjoint solver ``name``: the one
    builder of a backward mode. Unset values are [`deqlab.nn.ImplicitBackward`][deqlab.nn.ImplicitBackward]'s own
    defaults (the paper's protocol: tolerance = the forward solver's termination tolerance, handed over by
    the layer; at most 15 VJPs), so a zoo model and a hand-built layer differentiate alike.

    Args:
        name: a `deqlab.spec.BackwardSpec` (then no keyword may be given), or the adjoint solver:
            ``gmres``, ``anderson``, ``fixed_point``, ``broyden`` or ``lbroyden``. Default ``gmres``, the
            paper's adjoint solver (the adjoint system is linear, GMRES's home).
        tol: adjoint tolerance. Default ``None``: the forward solver's termination tolerance (a gradient
            more accurate than the fixed point is wasted work).
        max_steps: VJP budget of the adjoint solve. Default ``None``: ``ImplicitBackward``'s default (15).

    Returns:
        The backward mode, an [`ImplicitBackward`][deqlab.nn.ImplicitBackward]; pass it as a layer's or a zoo
            model's ``backward``.

    Raises:
        ValueError: from ``ImplicitBackward`` for an unknown ``name`` or an invalid budget.
        TypeError: keywords given together with a spec.

    Examples:
        >>> from deqlab.spec import BackwardSpec
        >>> from deqlab.zoo import build_backward
        >>> build_backward()
        ImplicitBackward(solver='gmres', tol=None, max_steps=15, ...)
        >>> build_backward("anderson", tol=1e-4).tol
        0.0001
        >>> build_backward(BackwardSpec(max_steps=20)).max_steps
        20
    """
    solver: str
    compile = False
    if isinstance(name, BackwardSpec):
        if tol is not None or max_steps is not None:
            raise TypeError("build_backward: pass a BackwardSpec or tol= / max_steps=, not both")
        solver, tol, max_steps, compile = name.solver, name.tol, name.max_steps, name.compile
    else:
        solver = name
    budget: Dict[str, Any] = {k: v for k, v in (("tol", tol), ("max_steps", max_steps)) if v is not None}
    return ImplicitBackward(solver, compile=compile, **budget)


def make_deq(
    model_type: Union[ModelType, ModelKind],
    model: nn.Module,
    solver: Any,
    *,
    shortcut: Optional[nn.Module],
    backward: Optional[BackwardMode],
    jacobian_regularization: bool,
    detach_skip_target: Optional[bool] = None,
    reapply_map: bool = False,
    vanilla_penalty: bool = False,
) -> nn.Module:
    """A single-state DEQ layer for ``vanilla`` / ``skip`` / ``skip_reg`` (``shortcut`` is used by ``skip``
    only; ``backward=None`` is the layer's default). ``detach_skip_target=None`` keeps the layer's default:
    a detached target for ``skip``, the coupled loss for ``skip_reg`` ([`deqlab.nn.MapGuess`][deqlab.nn.MapGuess] says why).
    ``reapply_map`` and ``vanilla_penalty`` are the January-2022 code's semantics (``z* = f(u_T, x)``; the
    skip loss ``mean |z*|`` on vanilla models, through ``ZeroGuess(fixed_point_penalty=True)``)."""
    kind = model_kind(model_type, deq_only=True)
    kwargs: Dict[str, Any] = dict(
        backward=backward, jacobian_regularization=jacobian_regularization, reapply_map=reapply_map
    )
    if not kind.learns_guess:
        init = ZeroGuess(fixed_point_penalty=True) if vanilla_penalty else None
        return DeepEquilibriumNetwork(model, solver, init=init, **kwargs)
    return SkipDeepEquilibriumNetwork(
        model, solver, shortcut=shortcut if kind.shortcut else None, detach_skip_target=detach_skip_target, **kwargs
    )


def make_multiscale(
    model_type: Union[ModelType, ModelKind],
    main: Sequence[nn.Module],
    mapping: Sequence[Sequence[Optional[nn.Module]]],
    post_fuse: Optional[Sequence[Optional[nn.Module]]],
    solver: Any,
    scales: Sequence[Sequence[int]],
    *,
    shortcut: Union[None, nn.Module, Sequence[nn.Module]],
    backward: BackwardMode,
    jacobian_regularization: bool,
    detach_skip_target: Optional[bool] = None,
) -> nn.Module:
    """A multiscale layer for any model type (``neural_ode``: the same map on ``t ∈ [0, 1]``, integrated
    with Tsit5 at the solver's ODE tolerances)."""
    kind = model_kind(model_type)
    if not kind.is_deq:
        check_neural_ode(solver, jacobian_regularization)
        return MultiScaleNeuralODE(
            main, mapping, post_fuse, "tsit5", scales, ode_abstol=solver.ode_abstol, ode_reltol=solver.ode_reltol
        )
    kwargs: Dict[str, Any] = dict(backward=backward, jacobian_regularization=jacobian_regularization)
    if not kind.learns_guess:
        return MultiScaleDeepEquilibriumNetwork(main, mapping, post_fuse, solver, scales, **kwargs)
    return MultiScaleSkipDeepEquilibriumNetwork(
        main,
        mapping,
        post_fuse,
        solver,
        scales,
        shortcut if kind.shortcut else None,
        detach_skip_target=detach_skip_target,
        **kwargs,
    )


def check_neural_ode(solver: Any, jacobian_regularization: bool) -> None:
    """The neural-ODE baseline integrates on a fixed interval: it has no discrete form and no fixed point to
    regularize, so asking for either is an error rather than a silently different model."""
    if not isinstance(solver, ContinuousDEQSolver):
        raise ValueError(
            "model_type='neural_ode' integrates du/dt = f(u, x) - u on t in [0, 1] with an ODE "
            "solver; it has no discrete form: pass solver='continuous'"
        )
    if jacobian_regularization:
        raise ValueError(
            "model_type='neural_ode' has no fixed point, so Jacobian regularization does not "
            "apply: pass jacobian_regularization=False"
        )


class PaperNetwork(nn.Module):
    """``stem → DEQ layer → head``, the contract of [`deqlab.zoo.DEQClassifier`][deqlab.zoo.DEQClassifier].

    ``forward(x) -> (logits, solution)``; ``explicit_forward(x)`` gives the u0-only logits of Skip models
    (``head(u0)``, the paper's "explicit accuracy") and ``None`` for vanilla and neural-ODE models, whose
    u0 = 0 carries no information.

    [`build_model`][deqlab.models.build_model] builds these; construct one directly to wrap your own parts in the
    same contract.

    Args:
        stem: maps the input to the DEQ layer's injection ``x``.
        deq: the DEQ layer: ``deq(x) -> (z_star, solution)``, plus ``deq.explicit(x) -> u0`` for Skip models.
        head: maps ``z*`` (or ``u0``) to logits.
        model_type: ``vanilla``, ``skip``, ``skip_reg`` or ``neural_ode`` (or its `deqlab.spec.ModelKind`).
            No default and keyword-only: it decides whether ``explicit_forward`` has a prediction, so it
            must match ``deq``.
        solver_kind: ``continuous`` or ``discrete``, the solver ``deq`` was built with (shown in the repr,
            read by scripts that label results). Keyword-only, like ``model_type``.

    Attributes:
        stem: the first part, as given.
        deq: the DEQ layer (a deqlab layer; its ``solver`` and ``backward`` are public attributes).
        head: the last part, as given.
        kind: the `deqlab.spec.ModelKind` the network was built from.
        model_type: its name (``kind.name``).
        solver_kind: the solver-kind name the network was built from.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from deqlab import DeepEquilibriumNetwork, DiscreteDEQSolver
        >>> from deqlab.nn import DenseDEQBlock
        >>> from deqlab.models import PaperNetwork
        >>> deq = DeepEquilibriumNetwork(DenseDEQBlock(8), DiscreteDEQSolver("anderson"))
        >>> net = PaperNetwork(nn.Linear(4, 8), deq, nn.Linear(8, 3), model_type="vanilla",
        ...                    solver_kind="discrete")
        >>> logits, solution = net(torch.randn(2, 4))
        >>> logits.shape, net.explicit_forward(torch.randn(2, 4))  # vanilla: u0 = 0 predicts nothing
        (torch.Size([2, 3]), None)
    """

    def __init__(
        self,
        stem: nn.Module,
        deq: nn.Module,
        head: nn.Module,
        *,
        model_type: Union[ModelType, ModelKind],
        solver_kind: SolverKind,
    ):
        super().__init__()
        self.stem = stem
        self.deq = deq
        self.head = head
        self.kind = model_kind(model_type)
        self.solver_kind = solver_kind

    @property
    def model_type(self) -> str:
        """The model type's name (``self.kind.name``)."""
        return self.kind.name

    def forward(self, x: Tensor):
        z, solution = self.deq(self.stem(x))
        return self.head(z), solution

    def explicit_forward(self, x: Tensor) -> Optional[Tensor]:
        if not self.kind.explicit:
            return None
        explicit = cast(Callable[[Tensor], Tensor], self.deq.explicit)  # every deqlab DEQ layer has it
        return self.head(explicit(self.stem(x)))

    def extra_repr(self) -> str:
        return f"model_type={self.model_type!r}, solver={self.solver_kind!r}"


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters, each tensor counted once even when shared.

    Args:
        model: the network to count.
        trainable_only: count only tensors with ``requires_grad``. Default ``True``: the size of what
            training updates (a frozen stem does not make a model bigger to train).

    Returns:
        The number of scalar parameters.

    Examples:
        >>> import torch
        >>> from deqlab.models import build_model, count_parameters
        >>> count_parameters(build_model("mnist", "dense", width=16))
        13514
        >>> layer = torch.nn.Linear(3, 3)
        >>> _ = layer.bias.requires_grad_(False)
        >>> count_parameters(layer), count_parameters(layer, trainable_only=False)
        (9, 12)
    """
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
