"""The paper's training settings per experiment, as flat keyword arguments.

Why flat: a script passes the training keys straight to ``DEQClassifier(network, **training)`` (they are
[`deqlab.lightning.DEQLightningModule`][deqlab.lightning.DEQLightningModule] arguments) and reads the run keys (batch size, epochs or steps,
augmentation, seeds, normalization) itself. ``TRAINING_KEYS`` names the first group; everything else in the
dict is a run default.
"""

from __future__ import annotations

from typing import Any, Dict, Literal, Optional, Tuple, Union

from deqlab._compat import renamed
from deqlab.spec import ModelKind, model_kind
from deqlab.spec.solve import SOLVER_KINDS, choose
from deqlab.spec.training import DEQTrainingConfig

__all__ = ["paper_settings", "TRAINING_KEYS", "PROTOCOLS", "Protocol", "protocol_summary"]

#: ``paper``: the protocol the paper's text states (its later versions, reprinted in the first author's
#: 2023 thesis); ``v1``: the settings of the January-2022 reference code (FastDEQ.jl) that produced v1.
Protocol = Literal["paper", "v1"]
PROTOCOLS: Tuple[str, ...] = ("paper", "v1")

#: The names that are training settings: the fields of
#: [`DEQTrainingConfig`][deqlab.spec.DEQTrainingConfig] (read from the dataclass, so a renamed field cannot drift apart from
#: this set). Keys of [`paper_settings`][deqlab.models.paper_settings] in it are ``DEQLightningModule`` keyword arguments; the
#: others are run defaults.
TRAINING_KEYS = frozenset(DEQTrainingConfig.field_names())

SEEDS = (6171, 3859, 2961)
MNIST_NORM = ((0.1307,), (0.3081,))
CIFAR_NORM = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
SVHN_NORM = ((0.41037378, 0.4159685, 0.44208914), (0.19587938, 0.19880198, 0.19529267))
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

_V1_OPT = dict(optimizer="adamw", lr=1e-3, weight_decay=2.5e-6, betas=(0.9, 0.999), scheduler="cosine", eta_min=1e-6)


#: The MNIST dense protocol the paper's text states (Tsit5 at relative tolerance 0.005, λ_skip = 0.01,
#: λ_jac = 1, Adam at a constant 1e-3, 25 epochs, batch 32).
_PAPER_MNIST_DENSE = dict(
    optimizer="adam",
    lr=1e-3,
    weight_decay=0.0,
    betas=(0.9, 0.999),
    scheduler="none",
    num_classes=10,
    lam_skip=1e-2,
    lam_jac=1.0,
    pretrain_steps=0,
    batch_size=32,
    epochs=25,
    augment=False,
    mean=MNIST_NORM[0],
    std=MNIST_NORM[1],
)


#: ``build_model`` options that give the January-2022 code's semantics (``--protocol v1`` of MNIST dense).
V1_SEMANTICS: Dict[str, Any] = dict(reapply_map=True, vanilla_penalty=True, batch_wide=True)


def _base(experiment: str, arch: str, solver: str, protocol: str = "paper") -> Dict[str, Any]:
    """Settings shared by all model types: (training dict, λ_skip of skip variants, λ_jac when on)."""
    if experiment == "mnist" and arch == "dense" and protocol == "paper":
        return dict(_PAPER_MNIST_DENSE)
    if experiment == "mnist" and arch == "dense":
        # The January-2022 code's semantics beside its numbers: raw pixels, z* = f(u_T, x), the skip loss on
        # vanilla models too (u0 = 0: λ · mean|z*|), one termination norm over the whole batch.
        return dict(
            _V1_OPT,
            num_classes=10,
            lam_skip=5.0,
            lam_jac=1.0,
            pretrain_steps=0,
            batch_size=32,
            epochs=25,
            augment=False,
            mean=MNIST_NORM[0],
            std=MNIST_NORM[1],
            normalize=False,
            vanilla_skip_loss=True,
            model_options=dict(V1_SEMANTICS),
        )
    if experiment == "mnist" and arch == "conv":
        return dict(
            _V1_OPT,
            num_classes=10,
            lam_skip=1.0,
            lam_jac=1.0,
            pretrain_steps=0,
            batch_size=64,
            epochs=25,
            augment=False,
            mean=MNIST_NORM[0],
            std=MNIST_NORM[1],
        )
    if experiment == "cifar10" and arch == "v1":
        return dict(
            _V1_OPT,
            num_classes=10,
            lam_skip=1e-2,
            lam_jac=1.0,
            pretrain_steps=0,
            batch_size=64 if solver == "continuous" else 32,
            epochs=50,
            augment=False,
            mean=CIFAR_NORM[0],
            std=CIFAR_NORM[1],
        )
    if experiment == "svhn" and arch == "v1":
        return dict(
            _V1_OPT,
            num_classes=10,
            lam_skip=1e-2,
            lam_jac=1.0,
            pretrain_steps=0,
            batch_size=64,
            epochs=50,
            augment=False,
            mean=SVHN_NORM[0],
            std=SVHN_NORM[1],
        )
    if experiment == "cifar10" and arch == "small":
        # v2+ tiny.yml: Adam, cosine from lr to lr/100 over the 20k steps, 3000 pretraining steps at depth 5.
        return dict(
            optimizer="adam",
            lr=1e-3,
            weight_decay=2.5e-5,
            betas=(0.9, 0.999),
            scheduler="cosine",
            eta_min=1e-5,
            num_classes=10,
            lam_skip=1e-2,
            lam_jac=1.0,
            pretrain_steps=3000,
            batch_size=128,
            max_steps=20000,
            augment=False,
            mean=CIFAR_NORM[0],
            std=CIFAR_NORM[1],
        )
    if experiment == "cifar10" and arch == "large":
        return dict(
            optimizer="adam",
            lr=1e-3,
            weight_decay=0.0,
            betas=(0.9, 0.999),
            scheduler="cosine",
            eta_min=1e-5,
            num_classes=10,
            lam_skip=1e-2,
            lam_jac=1.0,
            pretrain_steps=0,
            batch_size=128,
            max_steps=90000,
            augment=True,
            mean=CIFAR_NORM[0],
            std=CIFAR_NORM[1],
        )
    if experiment == "imagenet" and arch == "small":
        return dict(
            optimizer="sgd",
            lr=0.05,
            momentum=0.9,
            nesterov=True,
            weight_decay=1e-6,
            scheduler="step",
            step_milestones=(100_000, 150_000, 250_000),
            step_gamma=0.1,
            num_classes=1000,
            lam_skip=1e-2,
            lam_jac=1.0,
            pretrain_steps=0,
            batch_size=64,
            max_steps=500_000,
            augment=True,
            mean=IMAGENET_NORM[0],
            std=IMAGENET_NORM[1],
        )
    from deqlab.models.builder import EXPERIMENTS

    raise ValueError(
        f"no paper settings for experiment {experiment!r} arch {arch!r}; known: "
        + "; ".join(f"{e}: {', '.join(a)}" for e, a in EXPERIMENTS.items())
    )


def paper_settings(
    experiment: str,
    arch: str,
    model_type: Union[str, ModelKind] = "skip",
    solver: str = "discrete",
    *,
    jacobian_regularization: Optional[bool] = None,
    protocol: Protocol = "paper",
    jac_reg: Optional[bool] = None,
) -> Dict[str, Any]:
    """The paper's training defaults for one run, as a flat dict.

    Two protocols (``protocol=``) differ for MNIST dense only: ``paper`` (default) is what the paper's
    text states for its MNIST table (Adam at a constant 1e-3, no weight decay, λ_skip = 0.01, λ_jac = 1,
    25 epochs, batch 32); ``v1`` is what the January-2022 reference code ran (AdamW 1e-3, weight decay
    2.5e-6, cosine to 1e-6, λ_skip = 5). The other experiments have one protocol each: the v1 MNIST conv,
    CIFAR-10 v1 and SVHN settings, and the v2+ configs of CIFAR-10 small / large and ImageNet.

    Keys in [`TRAINING_KEYS`][deqlab.models.TRAINING_KEYS] are ``DEQLightningModule`` arguments (optimizer, lr, weight_decay, betas,
    scheduler, eta_min, momentum/nesterov/step_milestones/step_gamma for ImageNet's SGD, skip_loss_weight,
    jacobian_loss_weight, pretrain_steps, pretrain_depth, num_classes). The others are run defaults:
    ``batch_size`` (per process), ``epochs`` (v1 experiments) or ``max_steps`` (v2+ configs), ``augment``,
    ``seeds``, the input normalization ``mean`` / ``std`` and, for the v1 protocol of MNIST dense,
    ``normalize=False`` (raw pixels) and ``model_options`` (``build_model`` keywords for the 2022 code's
    semantics).

    ``skip_loss_weight`` is the paper's λ_skip for ``skip`` / ``skip_reg`` and 0 for ``vanilla`` /
    ``neural_ode`` (u0 = 0 there, so there is nothing to learn; the v1 protocol of MNIST dense gives vanilla
    λ_skip too, with the ``model_options`` that make its skip loss ``mean |z*|``, as the 2022 code did);
    ``jacobian_loss_weight`` is λ_jac = 1 with ``jacobian_regularization=True``, else 0. The neural-ODE baseline
    has no fixed-depth mode, so its ``pretrain_steps`` is 0.

    Args:
        experiment: ``mnist``, ``svhn``, ``cifar10`` or ``imagenet``, as in [`build_model`][deqlab.models.build_model].
        arch: the experiment's architecture (``cifar10`` also accepts ``tiny`` for ``small``).
        model_type: ``vanilla``, ``skip``, ``skip_reg`` or ``neural_ode``; sets ``skip_loss_weight`` (and
            ``pretrain_steps`` for ``neural_ode``). Default ``skip``, as [`build_model`][deqlab.models.build_model]'s.
        solver: ``continuous`` or ``discrete``; the CIFAR-10 v1 batch size depends on it. Default
            ``discrete``, as [`build_model`][deqlab.models.build_model]'s.
        jacobian_regularization: whether the run trains the Jacobian term; sets ``jacobian_loss_weight``. Default
            ``False``, as [`build_model`][deqlab.models.build_model]'s.
        protocol: ``paper`` (default: the paper's stated protocol) or ``v1`` (the January-2022 code's).
        jac_reg: deprecated old name of ``jacobian_regularization`` (warns ``DeprecationWarning``).

    Returns:
        A new dict (safe to modify) of training keys ([`TRAINING_KEYS`][deqlab.models.TRAINING_KEYS]) and run defaults.

    Raises:
        ValueError: for an unknown ``experiment``, ``arch``, ``model_type``, ``solver`` or ``protocol``.

    Examples:
        >>> from deqlab.models import TRAINING_KEYS, paper_settings
        >>> s = paper_settings("mnist", "dense")
        >>> s["optimizer"], s["lr"], s["scheduler"], s["skip_loss_weight"], s["batch_size"], s["epochs"]
        ('adam', 0.001, 'none', 0.01, 32, 25)
        >>> v1 = paper_settings("mnist", "dense", protocol="v1")
        >>> v1["optimizer"], v1["scheduler"], v1["weight_decay"], v1["skip_loss_weight"]
        ('adamw', 'cosine', 2.5e-06, 5.0)
        >>> training = {k: v for k, v in s.items() if k in TRAINING_KEYS}  # for DEQClassifier(net, **training)
        >>> sorted(set(s) - TRAINING_KEYS)
        ['augment', 'batch_size', 'epochs', 'mean', 'seeds', 'std']
        >>> v1["normalize"], v1["model_options"]
        (False, {'reapply_map': True, 'vanilla_penalty': True, 'batch_wide': True})
    """
    from deqlab.models.builder import canonical_arch

    arch = canonical_arch(experiment, arch)
    kind = model_kind(model_type)
    jr = bool(renamed("paper_settings", "jacobian_regularization", jacobian_regularization, "jac_reg", jac_reg, False))
    choose("paper_settings", "solver", solver, SOLVER_KINDS)
    choose("paper_settings", "protocol", protocol, PROTOCOLS)
    s = _base(experiment, arch, solver, protocol)
    lam_skip, lam_jac = s.pop("lam_skip"), s.pop("lam_jac")
    penalized = s.pop("vanilla_skip_loss", False) and kind.is_deq and not kind.learns_guess
    s["skip_loss_weight"] = lam_skip if kind.learns_guess or penalized else 0.0
    s["jacobian_loss_weight"] = lam_jac if jr else 0.0
    if not kind.is_deq:
        s["pretrain_steps"] = 0
    s["pretrain_depth"] = 5
    s["seeds"] = SEEDS
    return s


def protocol_summary(experiment: str, arch: str, protocol: Protocol = "paper") -> str:
    """One line naming the protocol a run follows (``--dry-run`` prints it), e.g. for MNIST dense
    ``paper protocol: Adam 1e-3 constant, λ_skip 0.01, ...``.

    Args:
        experiment: as in [`paper_settings`][deqlab.models.paper_settings].
        arch: as in [`paper_settings`][deqlab.models.paper_settings].
        protocol: ``paper`` or ``v1``.

    Returns:
        The protocol's name and the settings that tell the two apart.

    Examples:
        >>> from deqlab.models.settings import protocol_summary
        >>> protocol_summary("mnist", "dense", "v1")
        'v1 protocol (the January-2022 reference code): adamw lr 0.001 wd 2.5e-06, cosine schedule, λ_skip 5.0, λ_jac 1.0 (Jac. Reg. rows)'
    """
    s = paper_settings(experiment, arch, "skip", protocol=protocol)
    jac = paper_settings(experiment, arch, "skip", jacobian_regularization=True, protocol=protocol)[
        "jacobian_loss_weight"
    ]
    origin = {"paper": "the paper's stated protocol", "v1": "the January-2022 reference code"}[protocol]
    schedule = "constant rate" if s["scheduler"] == "none" else f"{s['scheduler']} schedule"
    return (
        f"{protocol} protocol ({origin}): {s['optimizer']} lr {s['lr']} wd {s['weight_decay']}, {schedule}, "
        f"λ_skip {s['skip_loss_weight']}, λ_jac {jac} (Jac. Reg. rows)"
    )
