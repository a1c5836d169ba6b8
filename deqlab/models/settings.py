"""The paper's training settings per experiment, as flat keyword arguments.

Why flat: a script passes the training keys straight to ``DEQClassifier(network, **training)`` (they are
[`deqlab.lightning.DEQLightningModule`][deqlab.lightning.DEQLightningModule] arguments) and reads the run keys (batch size, epochs or steps,
augmentation, seeds, normalization) itself. ``TRAINING_KEYS`` names the first group; everything else in the
dict is a run default.
"""
from __future__ import annotations

from typing import Any, Dict

from deqlab.lightning.config import DEQTrainingConfig  # Lightning-free: the dataclass alone
from deqlab.models._build import MODEL_TYPES, SOLVER_KINDS, check_choice

__all__ = ["paper_settings", "TRAINING_KEYS"]

#: The names that are training settings: the fields of
#: [`DEQTrainingConfig`][deqlab.lightning.DEQTrainingConfig] (read from the dataclass, so a renamed field cannot drift apart from
#: this set). Keys of [`paper_settings`][deqlab.models.paper_settings] in it are ``DEQLightningModule`` keyword arguments; the
#: others are run defaults.
TRAINING_KEYS = frozenset(DEQTrainingConfig.field_names())

SEEDS = (6171, 3859, 2961)
MNIST_NORM = ((0.1307,), (0.3081,))
CIFAR_NORM = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
SVHN_NORM = ((0.41037378, 0.4159685, 0.44208914), (0.19587938, 0.19880198, 0.19529267))
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

_V1_OPT = dict(optimizer="adamw", lr=1e-3, weight_decay=2.5e-6, betas=(0.9, 0.999), scheduler="cosine",
               eta_min=1e-6)


def _base(experiment: str, arch: str, solver: str) -> Dict[str, Any]:
    """Settings shared by all model types: (training dict, λ_skip of skip variants, λ_jac when on)."""
    if experiment == "mnist" and arch == "dense":
        return dict(_V1_OPT, num_classes=10, lam_skip=5.0, lam_jac=1.0, pretrain_steps=0, batch_size=32,
                    epochs=25, augment=False, mean=MNIST_NORM[0], std=MNIST_NORM[1])
    if experiment == "mnist" and arch == "conv":
        return dict(_V1_OPT, num_classes=10, lam_skip=1.0, lam_jac=1.0, pretrain_steps=0, batch_size=64,
                    epochs=25, augment=False, mean=MNIST_NORM[0], std=MNIST_NORM[1])
    if experiment == "cifar10" and arch == "v1":
        return dict(_V1_OPT, num_classes=10, lam_skip=1e-2, lam_jac=1.0, pretrain_steps=0,
                    batch_size=64 if solver == "continuous" else 32, epochs=50, augment=False,
                    mean=CIFAR_NORM[0], std=CIFAR_NORM[1])
    if experiment == "svhn" and arch == "v1":
        return dict(_V1_OPT, num_classes=10, lam_skip=1e-2, lam_jac=1.0, pretrain_steps=0, batch_size=64,
                    epochs=50, augment=False, mean=SVHN_NORM[0], std=SVHN_NORM[1])
    if experiment == "cifar10" and arch == "small":
        # v2+ tiny.yml: Adam, cosine from lr to lr/100 over the 20k steps, 3000 pretraining steps at depth 5.
        return dict(optimizer="adam", lr=1e-3, weight_decay=2.5e-5, betas=(0.9, 0.999), scheduler="cosine",
                    eta_min=1e-5, num_classes=10, lam_skip=1e-2, lam_jac=1.0, pretrain_steps=3000,
                    batch_size=128, max_steps=20000, augment=False, mean=CIFAR_NORM[0], std=CIFAR_NORM[1])
    if experiment == "cifar10" and arch == "large":
        return dict(optimizer="adam", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), scheduler="cosine",
                    eta_min=1e-5, num_classes=10, lam_skip=1e-2, lam_jac=1.0, pretrain_steps=0,
                    batch_size=128, max_steps=90000, augment=True, mean=CIFAR_NORM[0], std=CIFAR_NORM[1])
    if experiment == "imagenet" and arch == "small":
        return dict(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-6, scheduler="step",
                    step_milestones=(100_000, 150_000, 250_000), step_gamma=0.1, num_classes=1000,
                    lam_skip=1e-2, lam_jac=1.0, pretrain_steps=0, batch_size=64, max_steps=500_000, augment=True,
                    mean=IMAGENET_NORM[0], std=IMAGENET_NORM[1])
    from deqlab.models.builder import EXPERIMENTS

    raise ValueError(f"no paper settings for experiment {experiment!r} arch {arch!r}; known: "
                     + "; ".join(f"{e}: {', '.join(a)}" for e, a in EXPERIMENTS.items()))


def paper_settings(experiment: str, arch: str, model_type: str = "skip", solver: str = "discrete", *,
                   jac_reg: bool = False) -> Dict[str, Any]:
    """The paper's training defaults for one run, as a flat dict.

    Keys in [`TRAINING_KEYS`][deqlab.models.TRAINING_KEYS] are ``DEQLightningModule`` arguments (optimizer, lr, weight_decay, betas,
    scheduler, eta_min, momentum/nesterov/step_milestones/step_gamma for ImageNet's SGD, skip_loss_weight,
    jacobian_loss_weight, pretrain_steps, pretrain_depth, num_classes). The others are run defaults:
    ``batch_size`` (per process), ``epochs`` (v1 experiments) or ``max_steps`` (v2+ configs), ``augment``,
    ``seeds`` and the input normalization ``mean`` / ``std``.

    ``skip_loss_weight`` is the paper's λ_skip for ``skip`` / ``skip_reg`` and 0 for ``vanilla`` /
    ``neural_ode`` (u0 = 0 there, so there is nothing to learn); ``jacobian_loss_weight`` is λ_jac = 1 with
    ``jac_reg=True``, else 0. The neural-ODE baseline has no fixed-depth mode, so its ``pretrain_steps`` is 0.

    Args:
        experiment: ``mnist``, ``svhn``, ``cifar10`` or ``imagenet``, as in [`build_model`][deqlab.models.build_model].
        arch: the experiment's architecture (``cifar10`` also accepts ``tiny`` for ``small``).
        model_type: ``vanilla``, ``skip``, ``skip_reg`` or ``neural_ode``; sets ``skip_loss_weight`` (and
            ``pretrain_steps`` for ``neural_ode``). Default ``skip``, as [`build_model`][deqlab.models.build_model]'s.
        solver: ``continuous`` or ``discrete``; the CIFAR-10 v1 batch size depends on it. Default
            ``discrete``, as [`build_model`][deqlab.models.build_model]'s.
        jac_reg: whether the run trains the Jacobian term; sets ``jacobian_loss_weight``. Default
            ``False``, as [`build_model`][deqlab.models.build_model]'s.

    Returns:
        A new dict (safe to modify) of training keys ([`TRAINING_KEYS`][deqlab.models.TRAINING_KEYS]) and run defaults.

    Raises:
        ValueError: for an unknown ``experiment``, ``arch``, ``model_type`` or ``solver``.

    Examples:
        >>> from deqlab.models import TRAINING_KEYS, paper_settings
        >>> s = paper_settings("mnist", "dense")
        >>> s["lr"], s["skip_loss_weight"], s["jacobian_loss_weight"], s["batch_size"], s["epochs"]
        (0.001, 5.0, 0.0, 32, 25)
        >>> training = {k: v for k, v in s.items() if k in TRAINING_KEYS}  # for DEQClassifier(net, **training)
        >>> sorted(set(s) - TRAINING_KEYS)
        ['augment', 'batch_size', 'epochs', 'mean', 'seeds', 'std']
    """
    from deqlab.models.builder import canonical_arch

    arch = canonical_arch(experiment, arch)
    check_choice("model_type", model_type, MODEL_TYPES)
    check_choice("solver", solver, SOLVER_KINDS)
    s = _base(experiment, arch, solver)
    lam_skip, lam_jac = s.pop("lam_skip"), s.pop("lam_jac")
    s["skip_loss_weight"] = lam_skip if model_type in ("skip", "skip_reg") else 0.0
    s["jacobian_loss_weight"] = lam_jac if jac_reg else 0.0
    if model_type == "neural_ode":
        s["pretrain_steps"] = 0
    s["pretrain_depth"] = 5
    s["seeds"] = SEEDS
    return s
