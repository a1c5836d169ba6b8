"""Optimizers and learning-rate schedules built from the module's typed hyperparameters.

Why here and not in ``configure_optimizers``: keeping the mapping from names (``"adamw"``,
``"cosine"``) to torch objects in one small function makes it testable without a Trainer.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Tuple

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, MultiStepLR

from deqlab.spec.training import OptimizerName, SchedulerName  # the names, defined with the settings


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: OptimizerName,
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    nesterov: bool = False,
    betas: Tuple[float, float] = (0.9, 0.999),
) -> Optimizer:
    """The optimizer named ``name`` over the trainable ``params``."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the module has no trainable parameters; build the network in __init__ before training")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if name == "sgd":
        if nesterov and momentum <= 0:
            raise ValueError("nesterov=True needs momentum > 0 (e.g. momentum=0.9)")
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of 'adam', 'adamw', 'sgd'")


def build_scheduler(
    optimizer: Optimizer,
    name: SchedulerName,
    *,
    total_steps: Optional[float] = None,
    eta_min: float = 1e-6,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> Optional[LRScheduler]:
    """A per-step schedule (``interval="step"``), or ``None`` for ``"none"``.

    ``total_steps`` is the cosine period (``T_max``); the module passes ``scheduler_steps`` or the
    Trainer's estimated number of optimizer steps.
    """
    if name == "none":
        return None
    if name == "cosine":
        if total_steps is None or not math.isfinite(float(total_steps)) or total_steps < 1:
            raise ValueError(
                f"the cosine schedule needs a finite number of steps, got {total_steps!r}; set scheduler_steps "
                "or give the Trainer max_steps / max_epochs"
            )
        return CosineAnnealingLR(optimizer, T_max=int(total_steps), eta_min=eta_min)
    if name == "step":
        if not milestones:
            raise ValueError("scheduler='step' needs step_milestones (optimizer steps at which lr is multiplied by step_gamma)")
        return MultiStepLR(optimizer, milestones=sorted(int(m) for m in milestones), gamma=gamma)
    raise ValueError(f"unknown scheduler {name!r}; choose one of 'cosine', 'step', 'none'")
