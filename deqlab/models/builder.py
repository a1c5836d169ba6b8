"""``build_model(experiment, arch, ...)``: the one entry point to the paper's networks."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, Union

from torch import nn

from deqlab._compat import renamed
from deqlab.spec import SOLVER_KINDS, ModelKind, model_kind
from deqlab.spec.solve import choose

__all__ = ["EXPERIMENTS", "build_model", "canonical_arch", "default_config", "default_ode_solver"]

#: experiment -> architectures (canonical names; ``cifar10`` also accepts ``tiny`` for ``small``).
EXPERIMENTS: Dict[str, Tuple[str, ...]] = {
    "mnist": ("dense", "conv"),
    "svhn": ("v1",),
    "cifar10": ("v1", "small", "large"),
    "imagenet": ("small",),
}
_ALIASES = {("cifar10", "tiny"): "small"}


def canonical_arch(experiment: str, arch: str) -> str:
    """``arch`` with aliases resolved; raises with the valid names for an unknown experiment or arch.

    Args:
        experiment: a key of [`EXPERIMENTS`][deqlab.models.EXPERIMENTS].
        arch: an architecture of that experiment, or an alias (``cifar10``: ``tiny`` for ``small``).

    Returns:
        The canonical architecture name.

    Raises:
        ValueError: for an unknown ``experiment``, or an ``arch`` it does not have (the message lists the
            valid names).

    Examples:
        >>> from deqlab.models.builder import canonical_arch
        >>> canonical_arch("cifar10", "tiny")
        'small'
        >>> canonical_arch("mnist", "v1")
        Traceback (most recent call last):
        ...
        ValueError: unknown arch 'v1' for 'mnist'; valid: dense, conv
    """
    if experiment not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {experiment!r}; valid: {', '.join(EXPERIMENTS)}")
    arch = _ALIASES.get((experiment, arch), arch)
    if arch not in EXPERIMENTS[experiment]:
        raise ValueError(
            f"unknown arch {arch!r} for {experiment!r}; valid: {', '.join(EXPERIMENTS[experiment])}"
            + (" (or 'tiny')" if experiment == "cifar10" else "")
        )
    return arch


_FACTORIES: Dict[Tuple[str, str], Tuple[str, str]] = {
    ("mnist", "dense"): ("mnist", "mnist_dense"),
    ("mnist", "conv"): ("mdeq", "mnist_conv"),
    ("svhn", "v1"): ("mdeq", "svhn_v1"),
    ("cifar10", "v1"): ("mdeq", "cifar10_v1"),
    ("cifar10", "small"): ("mdeq", "cifar10_small"),
    ("cifar10", "large"): ("mdeq", "cifar10_large"),
    ("imagenet", "small"): ("mdeq", "imagenet_small"),
}


def _factory(experiment: str, arch: str) -> Callable[..., nn.Module]:
    import importlib

    module, name = _FACTORIES[(experiment, arch)]
    fn = getattr(importlib.import_module(f"deqlab.models.{module}"), name, None)
    if fn is None:
        raise NotImplementedError(f"build_model({experiment!r}, {arch!r}) is not implemented yet")
    return fn


def build_model(
    experiment: str,
    arch: str,
    *,
    model_type: Union[str, ModelKind] = "skip",
    solver: str = "discrete",
    jacobian_regularization: Optional[bool] = None,
    num_classes: Optional[int] = None,
    jac_reg: Optional[bool] = None,
    **overrides: Any,
) -> nn.Module:
    """The paper's network for ``experiment`` / ``arch``.

    Args:
        experiment: ``mnist``, ``svhn``, ``cifar10`` or ``imagenet`` (the keys of [`EXPERIMENTS`][deqlab.models.EXPERIMENTS]).
        arch: the architecture of that experiment: ``mnist``: ``dense`` | ``conv``; ``svhn``: ``v1``;
            ``cifar10``: ``v1`` | ``small`` (alias ``tiny``) | ``large``; ``imagenet``: ``small``.
        model_type: ``vanilla``, ``skip``, ``skip_reg`` or ``neural_ode`` (needs ``solver="continuous"``).
            Default ``skip``, the paper's proposed model.
        solver: ``continuous`` (Tsit5 to the steady state) or ``discrete`` (limited-memory Broyden).
            Default ``discrete``, the solver family of the zoo models' default (``lbroyden``).
        jacobian_regularization: compute the Hutchinson Jacobian term at ``z*`` (``solution.jacobian_loss``).
            Default ``None``: ``False`` (it adds a VJP to every forward, needed only for the "+ Jac. Reg."
            rows).
        num_classes: classifier outputs. Default ``None``: the dataset's (10, or 1000 for ImageNet).
        jac_reg: deprecated old name of ``jacobian_regularization`` (warns ``DeprecationWarning``).
        **overrides: the architecture's keyword arguments (e.g. ``tol``, ``max_steps``, ``mode``; see the
            factory functions in `deqlab.models.mnist` / `deqlab.models.mdeq`); unknown names raise.

    Returns:
        The network, a [`PaperNetwork`][deqlab.models.PaperNetwork]: ``forward(x) -> (logits, solution)``,
            ``explicit_forward(x) -> logits | None``.

    Raises:
        ValueError: for an unknown ``experiment``, ``arch``, ``model_type`` or ``solver``, or
            ``model_type="neural_ode"`` with the discrete solver or Jacobian regularization.
        TypeError: for an ``overrides`` name the architecture does not take (the message names the call).

    Examples:
        >>> import torch
        >>> from deqlab.models import build_model, count_parameters
        >>> net = build_model("mnist", "dense", width=16, num_classes=3)
        >>> logits, solution = net(torch.randn(2, 784))
        >>> logits.shape, net.explicit_forward(torch.randn(2, 784)).shape
        (torch.Size([2, 3]), torch.Size([2, 3]))
        >>> count_parameters(build_model("mnist", "conv", model_type="vanilla"))
        71578
        >>> build_model("mnist", "dense", widht=16)
        Traceback (most recent call last):
        ...
        TypeError: build_model('mnist', 'dense'): mnist_dense() got an unexpected keyword argument 'widht'
        (did you mean 'width'?); valid: ...
    """
    arch = canonical_arch(experiment, arch)
    kind = model_kind(model_type)
    choose("build_model", "solver", solver, SOLVER_KINDS)
    jr = bool(renamed("build_model", "jacobian_regularization", jacobian_regularization, "jac_reg", jac_reg, False))
    factory = _factory(experiment, arch)
    if num_classes is not None:
        overrides["num_classes"] = int(num_classes)
    try:
        return factory(kind, solver, jacobian_regularization=jr, **overrides)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            raise TypeError(f"build_model({experiment!r}, {arch!r}): {err}") from err
        raise


def default_ode_solver(experiment: str, arch: str) -> str:
    """The integrator ``build_model(experiment, arch, solver="continuous")`` uses unless told otherwise:
    the paper's choice, read from the architecture's own defaults (no network is built).

    ``tsit5`` for MNIST and the v1 models (the paper's MNIST table and v1 experiments ran Tsit5), ``vcab3``
    for CIFAR-10 small / large and ImageNet (the paper's later versions: one evaluation per step).

    Args:
        experiment: a key of [`EXPERIMENTS`][deqlab.models.EXPERIMENTS].
        arch: an architecture of that experiment (aliases accepted).

    Returns:
        ``"tsit5"`` or ``"vcab3"``.

    Examples:
        >>> from deqlab.models.builder import default_ode_solver
        >>> default_ode_solver("mnist", "dense"), default_ode_solver("cifar10", "tiny")
        ('tsit5', 'vcab3')
    """
    return str(default_config(experiment, arch).ode_solver)


def default_config(experiment: str, arch: str) -> Any:
    """The architecture's config of defaults (a `deqlab.models.mdeq.MDEQConfig` or a
    `deqlab.models.mnist.DenseConfig`): where each experiment's paper settings are written, once.

    Args:
        experiment: a key of [`EXPERIMENTS`][deqlab.models.EXPERIMENTS].
        arch: an architecture of that experiment (aliases accepted).

    Returns:
        The frozen config; ``build_model`` keyword overrides replace its fields.

    Examples:
        >>> from deqlab.models.builder import default_config
        >>> default_config("mnist", "dense").tol, default_config("cifar10", "large").max_steps
        (0.005, 18)
    """
    return _factory(experiment, canonical_arch(experiment, arch)).config  # type: ignore[attr-defined]
