"""torchdeq 0.1.0's API on deqlab's core: a torchdeq script runs by changing its imports.

``from torchdeq import get_deq`` becomes ``from deqlab.compat.torchdeq import get_deq``; the options keep
torchdeq's names (``core``, ``ift``, ``grad``, ``f_solver``, ``f_max_iter``, ``n_states``, ...), the layer is
called as ``z_out, info = deq(func, z_init)`` and returns torchdeq's ``z_out`` list and ``info`` keys. The
forward solve is a deqlab solver (with its per-sample stopping), the sampled states come from
[`record_iterates`][deqlab.solvers.record_iterates], the implicit backward's adjoint is solved by a deqlab
solver. The intended differences from torchdeq are listed in ``docs/migration_torchdeq.md``; the main
one: an option name torchdeq does not know raises ``ValueError`` naming the nearest valid one (torchdeq
silently ignores it, its issue #12).

Not to be confused with ``deqlab._compat`` (deqlab's own deprecated names).

Example:
    >>> import torch
    >>> from deqlab.compat.torchdeq import get_deq
    >>> deq = get_deq(f_solver="anderson", f_max_iter=40, f_tol=1e-8, ift=True)
    >>> x = torch.ones(2, 3)
    >>> z_out, info = deq(lambda z: 0.5 * z + x, torch.zeros(2, 3))
    >>> torch.allclose(z_out[-1], 2 * x, atol=1e-6), sorted(info)[:3]
    (True, ['abs_lowest', 'abs_trace', 'nstep'])
    >>> get_deq(f_max_iters=10)
    Traceback (most recent call last):
    ...
    ValueError: get_deq: unknown option 'f_max_iters' (did you mean 'f_max_iter'?); torchdeq would ignore it silently
"""

from __future__ import annotations

import argparse
import difflib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch
from torch import Tensor, nn

from deqlab.nn.regularization import jacobian_frobenius_estimate
from deqlab.nn.spectral import power_iteration, spectral_radius
from deqlab.nn.trajectory import correction_weights, fixed_point_correction_loss, sample_steps
from deqlab.solvers import DiscreteDEQSolver, FixedPointLinearSolver, record_iterates
from deqlab.solvers.termination import TerminationMode

__all__ = [
    "get_deq",
    "DEQ",
    "reset_deq",
    "apply_norm",
    "reset_norm",
    "jac_reg",
    "power_method",
    "fp_correction",
    "mixed_init",
    "add_deq_args",
    "OPTIONS",
]

_Value = TypeVar("_Value")

#: every option torchdeq 0.1.0's ``get_deq`` / ``add_deq_args`` know, with torchdeq's default
OPTIONS: Dict[str, Any] = {
    "core": "sliced",
    "ift": False,
    "hook_ift": False,
    "grad": 1,
    "tau": 1.0,
    "sup_gap": -1,
    "sup_loc": None,
    "n_states": 1,
    "indexing": None,
    "gamma": 0.8,
    "f_solver": "fixed_point_iter",
    "b_solver": "fixed_point_iter",
    "no_stat": None,
    "f_max_iter": 40,
    "b_max_iter": 40,
    "f_tol": 1e-3,
    "b_tol": 1e-6,
    "f_stop_mode": "abs",
    "b_stop_mode": "abs",
    "eval_factor": 1.0,
    "eval_f_max_iter": 0,
    "norm_type": "weight_norm",
    "norm_no_scale": False,
    "norm_clip": False,
    "norm_clip_value": 1.0,
    "norm_target_norm": 1.0,
    "sn_n_power_iters": 1,
    "jac_loss_weight": 0.0,
    "jac_loss_freq": 0.0,
    "jac_incremental": 0,
    "sradius_mode": False,
}
_SOLVERS = {
    "fixed_point_iter": "fixed_point",
    "simple_fixed_point_iter": "fixed_point",
    "anderson": "anderson",
    "broyden": "broyden",
}
_STOP: Dict[str, TerminationMode] = {"abs": "abs_norm", "rel": "rel_norm"}


def _check_keys(owner: str, keys: Sequence[str]) -> None:
    for key in keys:
        if key not in OPTIONS:
            near = difflib.get_close_matches(key, list(OPTIONS), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f" (valid: {', '.join(sorted(OPTIONS))})"
            raise ValueError(f"{owner}: unknown option {key!r}{hint}; torchdeq would ignore it silently")


def _choice(owner: str, what: str, value: str, table: Dict[str, _Value]) -> _Value:
    if value not in table:
        near = difflib.get_close_matches(str(value), list(table), n=1)
        raise ValueError(
            f"{owner}: unknown {what} {value!r}"
            + (f" (did you mean {near[0]!r}?)" if near else "")
            + f"; valid: {', '.join(table)}"
        )
    return table[value]


def get_deq(args: Any = None, **kwargs: Any) -> "DEQ":
    """torchdeq's ``get_deq``: a [`DEQ`][deqlab.compat.torchdeq.DEQ] layer from torchdeq's option names.

    Args:
        args: an ``argparse.Namespace`` (e.g. from a parser with [`add_deq_args`][deqlab.compat.torchdeq.add_deq_args])
            or a dict; only the keys torchdeq knows are read, the script's other options are left alone.
        **kwargs: torchdeq options, over ``args``; a name torchdeq does not know raises.

    Returns:
        The layer, called as ``z_out, info = deq(func, z_init)``.

    Raises:
        ValueError: an unknown option name (naming the nearest valid one), core, solver or stop mode.
    """
    return DEQ(args, **kwargs)


class DEQ(nn.Module):
    """torchdeq's ``DEQIndexing`` / ``DEQSliced`` layer on deqlab's solvers (see [`get_deq`][deqlab.compat.torchdeq.get_deq]).

    In training mode ``z_out`` holds the sampled states (``n_states`` or ``indexing``, the last at ``z*``),
    in eval mode ``[z*]``. Each state's gradient: ``grad`` damped steps ``z <- tau f(z) + (1 - tau) z``
    from the detached state (phantom gradient); the last state's, with ``ift=True``, the implicit
    gradient, its adjoint ``g = J^T g + v`` solved by ``b_solver`` to ``b_tol`` within ``b_max_iter``.
    ``core="sliced"`` is run as ``"indexing"`` (one solve sampled at the same steps instead of restarted
    slices; the states' values differ from torchdeq's sliced ones by the solver's restarts only).
    """

    def __init__(self, args: Any = None, **kwargs: Any):
        super().__init__()
        _check_keys("get_deq", list(kwargs))
        given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
        opts = {k: v for k, v in OPTIONS.items()}
        opts.update({k: v for k, v in given.items() if k in OPTIONS})
        opts.update(kwargs)
        if opts["core"] not in ("indexing", "sliced"):
            _choice("get_deq", "core", opts["core"], {"indexing": "", "sliced": ""})
        self.opts = opts
        self.f_algorithm = _choice("get_deq", "f_solver", opts["f_solver"], _SOLVERS)
        self.b_algorithm = _choice("get_deq", "b_solver", opts["b_solver"], _SOLVERS)
        self.f_mode = _choice("get_deq", "f_stop_mode", opts["f_stop_mode"], _STOP)
        self.b_mode = _choice("get_deq", "b_stop_mode", opts["b_stop_mode"], _STOP)
        self.f_max_iter = int(opts["f_max_iter"])
        eval_iter = int(opts["eval_f_max_iter"])
        self.eval_f_max_iter = eval_iter if eval_iter > 0 else int(self.f_max_iter * float(opts["eval_factor"]))
        grad = opts["grad"]
        self.grad = int(grad[0] if isinstance(grad, (list, tuple)) else grad)
        self.tau = float(opts["tau"])

    def _steps(self, f_max_iter: int) -> List[int]:
        """The solver steps of the intermediate states (torchdeq's ``n_states`` spacing or ``indexing``)."""
        n_states = int(self.opts["n_states"])
        if n_states > 1:
            return sample_steps(n_states, f_max_iter)
        return [int(i) for i in (self.opts["indexing"] or []) if int(i) < f_max_iter]

    def _solver(self, max_iter: int, tol: Optional[float] = None) -> DiscreteDEQSolver:
        tol = float(self.opts["f_tol"] if tol is None else tol)
        return DiscreteDEQSolver(
            self.f_algorithm, mode=self.f_mode, abstol_termination=tol, reltol_termination=tol, max_steps=max_iter
        )

    def forward(
        self,
        func: Callable[[Any], Any],
        z_init: Any,
        solver_kwargs: Optional[dict] = None,
        sradius_mode: bool = False,
        backward_writer: Optional[Callable[[dict], None]] = None,
        **kwargs: Any,
    ) -> Tuple[List[Any], Dict[str, Tensor]]:
        """``(z_out, info)`` as torchdeq's layer returns them.

        Args:
            func: the map ``z -> f(z)`` (a tensor, or a list of tensors, in and out); its parameters and
                captured inputs receive the gradients.
            z_init: the initial guess.
            solver_kwargs: per-call overrides: ``f_max_iter``, ``f_tol``.
            sradius_mode: in eval mode, estimate the spectral radius of ``J`` at ``z*`` (``info["sradius"]``).
            backward_writer: called with ``{"nstep": ..., "abs_lowest": ...}`` after each implicit backward.

        Returns:
            ``z_out`` (training: the sampled states, the last ``z*``; eval: ``[z*]``) and ``info`` with
            ``abs_lowest``, ``rel_lowest`` (per sample), ``abs_trace``, ``rel_trace`` (the stopping
            objective per step, ``(B, steps)``, under the stop mode's name; the other is ``-1``),
            ``nstep`` (per-sample steps, as floats) and ``sradius``.
        """
        solver_kwargs = dict(solver_kwargs or {})
        _check_keys("DEQ.forward solver_kwargs", [k for k in solver_kwargs if k not in ("tol",)])
        training = self.training
        max_iter = int(solver_kwargs.get("f_max_iter", self.f_max_iter if training else self.eval_f_max_iter))
        solver = self._solver(max_iter, solver_kwargs.get("f_tol"))
        steps = self._steps(max_iter) if training else []
        with torch.no_grad(), record_iterates(steps):
            result = solver(func, _detach(z_init))
        z_star = result.z
        states = list(result.iterates or []) + [z_star]
        z_out = []
        for i, z in enumerate(states):
            last = i == len(states) - 1
            if not torch.is_grad_enabled():
                z_out.append(z)
            elif last and (self.opts["ift"] or self.opts["hook_ift"]):
                z_out.append(self._implicit(func, z, backward_writer))
            else:
                z_out.append(self._phantom(func, z))
        trace = result.trace.t() if result.trace is not None else torch.full_like(result.abs_residual, -1.0)
        info = {
            "abs_lowest": result.abs_residual,
            "rel_lowest": result.rel_residual,
            "abs_trace": trace if self.opts["f_stop_mode"] == "abs" else torch.tensor([-1.0]),
            "rel_trace": trace if self.opts["f_stop_mode"] == "rel" else torch.tensor([-1.0]),
            "nstep": result.sample_steps.to(result.abs_residual.dtype),
            "sradius": torch.zeros(1, device=result.abs_residual.device),
        }
        if not training and sradius_mode:
            info["sradius"] = spectral_radius(func, z_star, n_iters=100, method="power")
        return z_out, info

    def _phantom(self, func: Callable, z: Any) -> Any:
        z = _detach(z)
        for _ in range(self.grad):
            fz = func(z)
            z = fz if self.tau == 1.0 else _combine(fz, z, self.tau)
        return z

    def _implicit(self, func: Callable, z_star: Any, writer: Optional[Callable[[dict], None]]) -> Any:
        """``f(z*)`` with autograd, its incoming gradient replaced by the adjoint ``(I - J^T)^-1 v``."""
        is_list = not isinstance(z_star, Tensor)
        parts = [t.detach().requires_grad_() for t in (z_star if is_list else [z_star])]
        fz = func(parts if is_list else parts[0])
        f_parts = list(fz) if is_list else [fz]
        linear = FixedPointLinearSolver(
            DiscreteDEQSolver(
                self.b_algorithm,
                mode=self.b_mode,
                abstol_termination=float(self.opts["b_tol"]),
                reltol_termination=float(self.opts["b_tol"]),
                max_steps=int(self.opts["b_max_iter"]),
            ),
            max_steps=int(self.opts["b_max_iter"]) + 1,
        )
        shapes = [p.shape for p in parts]
        sizes = [p[0].numel() for p in parts]
        batch = parts[0].shape[0]

        def flat(ts: Sequence[Tensor]) -> Tensor:
            return torch.cat([t.reshape(batch, -1) for t in ts], dim=1)

        def unflat(v: Tensor) -> List[Tensor]:
            return [c.reshape(s) for c, s in zip(torch.split(v, sizes, dim=1), shapes)]

        def hook(*grads: Optional[Tensor]) -> Tuple[Tensor, ...]:
            b = flat([torch.zeros_like(p) if g is None else g for g, p in zip(grads, parts)])

            def matvec(g: Tensor) -> Tensor:
                vjp = torch.autograd.grad(f_parts, parts, unflat(g), retain_graph=True, allow_unused=True)
                return g - flat([torch.zeros_like(p) if v is None else v for v, p in zip(vjp, parts)])

            with torch.enable_grad():
                out = linear.solve(matvec, b)
            if writer is not None:
                writer({"nstep": torch.tensor([float(out.iterations)]), "abs_lowest": out.residual})
            return tuple(unflat(out.x))

        out = _ImplicitHook.apply(hook, len(parts), *f_parts)
        if is_list:
            return list(out)
        return out if isinstance(out, Tensor) else out[0]


class _ImplicitHook(torch.autograd.Function):
    """Identity forward; backward replaces the incoming gradient ``v`` by ``(I - J^T)^-1 v``."""

    @staticmethod
    def forward(ctx: Any, hook: Callable, n: int, *tensors: Tensor) -> Any:
        ctx.hook = hook
        out = tuple(t.view_as(t) for t in tensors)
        return out[0] if n == 1 else out

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:
        return (None, None, *ctx.hook(*grads))


def _detach(z: Any) -> Any:
    return z.detach() if isinstance(z, Tensor) else [t.detach() for t in z]


def _combine(fz: Any, z: Any, tau: float) -> Any:
    if isinstance(fz, Tensor):
        return tau * fz + (1 - tau) * z
    return [tau * a + (1 - tau) * b for a, b in zip(fz, z)]


def reset_deq(model: nn.Module) -> None:
    """torchdeq's ``reset_deq`` (call it before each training iteration): start a new solve's state in every
    normalization and dropout module of ``model`` ([`reset_norm`][deqlab.compat.torchdeq.reset_norm]; deqlab's
    [`VariationalHiddenDropout`][deqlab.nn.VariationalHiddenDropout] draws its new mask there too)."""
    reset_norm(model)


def reset_norm(model: nn.Module) -> None:
    """torchdeq's ``reset_norm``: every deqlab [`EquilibriumStateful`][deqlab.nn.EquilibriumStateful] module
    of ``model`` starts a new solve's state (``deq_begin()``): the [`WeightNorm`][deqlab.nn.WeightNorm] /
    [`SpectralNorm`][deqlab.nn.SpectralNorm] that [`apply_norm`][deqlab.compat.torchdeq.apply_norm] put
    there compute their weight once (a spectral norm in training mode takes its power-iteration step
    first), and every later call uses it until the next reset, as torchdeq's; a
    [`VariationalHiddenDropout`][deqlab.nn.VariationalHiddenDropout] draws a new mask. A module with its own
    ``reset_norm()`` method has it called."""
    from deqlab.nn.layers import EquilibriumStateful

    for module in model.modules():
        if isinstance(module, EquilibriumStateful):
            module.deq_begin()
        elif module is not model:
            reset = getattr(module, "reset_norm", None)
            if callable(reset):
                reset()


#: torchdeq's ``args`` names of the norm options -> its ``Norm.apply`` keywords (``norm_no_scale`` negated)
_NORM_ARGS = {
    "norm_no_scale": "learn_scale",
    "norm_target_norm": "target_norm",
    "norm_clip": "clip",
    "norm_clip_value": "clip_value",
    "sn_n_power_iters": "n_power_iterations",
}
_NORM_DEFAULTS: Dict[str, Any] = {
    "learn_scale": True,
    "target_norm": 1.0,
    "clip": False,
    "clip_value": 1.0,
    "n_power_iterations": 1,
    "eps": 1e-12,
    "names": "weight",
    "dims": 0,
}
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _norm_options(norm_type: str, given: Dict[str, Any], norm_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """torchdeq's norm options (``norm_kwargs`` under its ``Norm.apply`` names, overridden by the ``norm_*``
    keys of ``args`` and ``norm_kwargs``, its priority) as options of deqlab's wrapper; an option deqlab's
    wrapper has no equivalent of raises, naming the key it came from."""
    valid = list(_NORM_DEFAULTS) + list(_NORM_ARGS)
    for key in norm_kwargs:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1)
            raise ValueError(
                f"apply_norm: unknown norm option {key!r}"
                + (f" (did you mean {near[0]!r}?)" if near else "")
                + f"; valid: {', '.join(valid)}"
            )
    value = dict(_NORM_DEFAULTS)
    source = {k: k for k in value}
    for key, v in norm_kwargs.items():
        if key in _NORM_DEFAULTS:
            value[key], source[key] = v, key
    config = {**given, **norm_kwargs}
    for key, name in _NORM_ARGS.items():
        if key in config:
            value[name] = (not config[key]) if key == "norm_no_scale" else config[key]
            source[name] = key

    def refuse(name: str, why: str) -> None:
        raise ValueError(
            f"apply_norm: {source[name]}={config.get(source[name], value[name])!r} has no "
            f"equivalent in deqlab's {norm_type}: {why} (see docs/migration_torchdeq.md)"
        )

    if value["names"] not in ("weight", ["weight"], ("weight",)):
        refuse("names", "it normalizes each layer's 'weight'")
    if value["dims"] not in (0, [0], (0,)):
        refuse("dims", "it keeps dim 0 (one scale per output unit)")
    if norm_type == "weight_norm":
        if not value["learn_scale"]:
            refuse(
                "learn_scale",
                "WeightNorm always learns its scale g (for a fixed norm use "
                "norm_type='spectral_norm', norm_no_scale=True)",
            )
        if value["clip"]:
            refuse("clip", "WeightNorm does not clip its scale (spectral_norm with norm_clip=True does)")
        return {}
    if value["clip"] and float(value["clip_value"]) != 1.0:
        refuse(
            "clip_value",
            "SpectralNorm(clamp=True) caps the factor target/sigma at 1 (sigma <= target), torchdeq's clip_value=1.0",
        )
    return {
        "target": float(value["target_norm"]),
        "clamp": bool(value["clip"]),
        "learn_scale": bool(value["learn_scale"]),
        "n_power_iterations": int(value["n_power_iterations"]),
        "eps": float(value["eps"]),
    }


def apply_norm(
    model: nn.Module,
    norm_type: str = "weight_norm",
    prefix_filter_out: Any = None,
    filter_out: Any = None,
    args: Any = None,
    **norm_kwargs: Any,
) -> nn.Module:
    """torchdeq's ``apply_norm`` on deqlab's [`apply_norm`][deqlab.nn.apply_norm]: every ``Linear`` /
    ``Conv1d/2d/3d`` of ``model`` whose qualified name neither starts with a ``prefix_filter_out`` entry nor
    contains a ``filter_out`` entry (torchdeq's filters) is wrapped, in place, in deqlab's DEQ-aware
    [`WeightNorm`][deqlab.nn.WeightNorm] (``"weight_norm"``) or [`SpectralNorm`][deqlab.nn.SpectralNorm]
    (``"spectral_norm"``); ``"none"`` leaves ``model`` as is.

    torchdeq's norm options map onto the wrapper's, given as ``Norm.apply`` keywords or as the ``norm_*``
    keys of ``args`` / ``norm_kwargs`` (those win, as in torchdeq): ``norm_target_norm`` -> ``target``,
    ``norm_clip`` -> ``clamp`` (with ``norm_clip_value`` 1.0), ``norm_no_scale`` -> ``learn_scale=False``,
    ``sn_n_power_iters`` -> ``n_power_iterations``, ``eps``. The weights are computed once per
    [`reset_norm`][deqlab.compat.torchdeq.reset_norm] (torchdeq's semantics) and per call before the first
    one; inside a deqlab DEQ layer, once per forward by themselves. The differences from torchdeq (a
    learned scale is one scalar, not one per output unit; the parameters sit on the wrapper; transposed
    convolutions are not normalized) are listed in ``docs/migration_torchdeq.md``.

    Returns:
        ``model``, its layers wrapped (the wrapper itself when ``model`` is such a layer).

    Raises:
        ValueError: an unknown ``norm_type`` or norm option; an option with no equivalent in deqlab's
            wrapper (naming its key: ``norm_no_scale`` / ``norm_clip`` for weight_norm, ``norm_clip_value``
            other than 1.0, ``names``, ``dims``); a transposed convolution that is not filtered out.
    """
    from deqlab.nn.layers import apply_norm as apply_deq_norm

    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    norm_type = {**given, **norm_kwargs}.get("norm_type", norm_type)
    norm_kwargs = {k: v for k, v in norm_kwargs.items() if k != "norm_type"}
    _choice("apply_norm", "norm_type", norm_type, {"weight_norm": "", "spectral_norm": "", "none": ""})
    if norm_type == "none":
        return model
    options = _norm_options(norm_type, given, norm_kwargs)
    prefixes = [prefix_filter_out] if isinstance(prefix_filter_out, str) else list(prefix_filter_out or [])
    names = [filter_out] if isinstance(filter_out, str) else list(filter_out or [])

    def skipped(name: str) -> bool:
        return any(name.startswith(p) for p in prefixes) or any(n in name for n in names)

    for name, module in model.named_modules():
        if isinstance(module, _TRANSPOSED) and not skipped(name):
            raise ValueError(
                f"apply_norm: {name or 'the model'} is a {type(module).__name__}, which torchdeq "
                f"normalizes over dim 1 and deqlab's {norm_type} does not; filter it out "
                f"(filter_out=[{name!r}]) or wrap it yourself"
            )
    return apply_deq_norm(model, norm_type, filter_out=skipped, **options)


def jac_reg(f0: Tensor, z0: Tensor, vecs: int = 1, create_graph: bool = True) -> Tensor:
    """torchdeq's ``jac_reg``: the Hutchinson estimate of ``||J||_F^2 / z0.numel()`` from ``vecs`` Gaussian
    probes (the estimate of deqlab's [`jacobian_frobenius_estimate`][deqlab.nn.jacobian_frobenius_estimate]
    with ``normalize="element"``; the probes are drawn as torchdeq draws them, float32 then cast, so a
    seeded script gets torchdeq's number)."""
    return jacobian_frobenius_estimate(
        f0, z0, n_probes=vecs, normalize="element", create_graph=create_graph, retain_graph=True,
        probe=lambda t: torch.randn(*t.shape).to(t),
    )  # fmt: skip


def power_method(f0: Tensor, z0: Tensor, n_iters: int = 100) -> Tuple[Tensor, Tensor]:
    """torchdeq's ``power_method``: ``(eigenvector, |eigenvalue|)`` per sample of the largest-magnitude
    eigenvalue of ``J = df0/dz0``, by power iteration on vector-Jacobian products of the graph ``f0(z0)``
    (deqlab's [`power_iteration`][deqlab.nn.power_iteration] from ``torch.randn_like(z0)``, as
    torchdeq draws it; the value is its Rayleigh quotient's modulus, torchdeq's estimate)."""
    batch = z0.shape[0]

    def vjp(v: Tensor) -> Tensor:
        return torch.autograd.grad(f0, z0, v.reshape_as(z0), retain_graph=True)[0].reshape(batch, -1)

    out = power_iteration(vjp, torch.randn_like(z0).reshape(batch, -1), n_iters)
    return out.vector.reshape_as(z0), out.rayleigh.abs()


def fp_correction(
    crit: Callable[..., Tensor],
    args: Sequence[Any],
    weight_func: str = "exp",
    return_loss_values: bool = False,
    **kwargs: Any,
):
    """torchdeq's ``fp_correction``: ``sum_i w_i crit(*args_i)``, each list in ``args`` one entry per state
    (a non-list argument is shared by all). Weights: ``"exp"`` ``gamma ** (n - 1 - i)`` (``gamma=0.8``),
    ``"const"`` ``c`` (1.0), ``"linear"`` torchdeq's ``1 - (n - i - 1) / n * gamma + bias`` (``gamma=0.9``,
    ``bias=0``; deqlab's own ``"linear"`` is ``(i + 1) / n``, see
    [`correction_weights`][deqlab.nn.correction_weights]).

    Raises:
        ValueError: an unknown ``weight_func`` or weight option.
    """
    lists = [a for a in args if isinstance(a, (list, tuple))]
    n = max((len(a) for a in lists), default=1)
    if weight_func == "exp":
        _check_keys_of("fp_correction", kwargs, ("gamma",))
        weights = correction_weights(n, "exp", float(kwargs.get("gamma", 0.8)))
    elif weight_func == "linear":
        _check_keys_of("fp_correction", kwargs, ("gamma", "bias"))
        gamma, bias = float(kwargs.get("gamma", 0.9)), float(kwargs.get("bias", 0.0))
        weights = [1 - (n - i - 1) / n * gamma + bias for i in range(n)]
    elif weight_func == "const":
        _check_keys_of("fp_correction", kwargs, ("c",))
        weights = [float(kwargs.get("c", 1.0))] * n
    else:
        raise ValueError(f"fp_correction: unknown weight_func {weight_func!r}; valid: exp, linear, const")

    def pick(a: Any, i: int) -> Any:
        if not isinstance(a, (list, tuple)):
            return a
        return a[i] if len(a) == n else a[-1]

    per_state = [tuple(pick(a, i) for a in args) for i in range(n)]  # crit's arguments, one tuple per state
    loss, parts = fixed_point_correction_loss(lambda a, _: crit(*a), per_state, None, weights, return_parts=True)
    return (loss, [float(p) for p in parts]) if return_loss_values else loss


def _check_keys_of(owner: str, kwargs: Dict[str, Any], valid: Sequence[str]) -> None:
    for key in kwargs:
        if key not in valid:
            near = difflib.get_close_matches(key, list(valid), n=1)
            raise ValueError(
                f"{owner}: unknown option {key!r}"
                + (f" (did you mean {near[0]!r}?)" if near else "")
                + f"; valid: {', '.join(valid)}"
            )


def mixed_init(z_shape: Sequence[int], device: Any = None) -> Tensor:
    """torchdeq's ``mixed_init``: Gaussian values with about half of them zeroed (a random mask), the
    initial guess of path-independent DEQs (Anil et al. 2022)."""
    z = torch.randn(*z_shape, device=device)
    return z * torch.zeros_like(z).bernoulli_(0.5)


def add_deq_args(parser: argparse.ArgumentParser) -> None:
    """torchdeq's ``add_deq_args``: add its command-line options (same names, same defaults) to ``parser``."""
    for key, default in OPTIONS.items():
        if key in ("no_stat",):
            continue
        if isinstance(default, bool):
            parser.add_argument(f"--{key}", action="store_true")
        elif key in ("grad",):
            parser.add_argument(f"--{key}", type=int, nargs="+", default=[default])
        elif key in ("indexing", "sup_loc"):
            parser.add_argument(f"--{key}", type=int, nargs="+", default=[])
        else:
            parser.add_argument(f"--{key}", type=type(default), default=default)
