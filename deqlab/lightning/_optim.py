"""Optimizers and learning-rate schedules built from the module's typed hyperparameters.

Why here and not in ``configure_optimizers``: keeping the mapping from names (``"adamw"``,
``"cosine"``) to torch objects in one small function makes it testable without a Trainer.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Union, cast

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
    pair = cast(Tuple[float, float], tuple(betas))  # a list from a config: DEQTrainingConfig checked its length
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=pair, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=pair, weight_decay=weight_decay)
    if name == "sgd":
        if nesterov and momentum <= 0:
            raise ValueError("nesterov=True needs momentum > 0 (e.g. momentum=0.9)")
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of 'adam', 'adamw', 'sgd'")


def _cosine_period(total_steps: Any) -> int:
    if total_steps is None or not math.isfinite(float(total_steps)) or total_steps < 1:
        raise ValueError(
            f"the cosine schedule needs a finite number of steps, got {total_steps!r}; set scheduler_steps "
            "or give the Trainer max_steps / max_epochs"
        )
    return int(total_steps)


class CosineToTrainingEnd(CosineAnnealingLR):
    """``CosineAnnealingLR`` whose period (``T_max``) is asked from ``period()`` at its first step.

    Why not at construction: the default period is the Trainer's estimated number of optimizer steps, and
    asking the Trainer for it in ``configure_optimizers`` makes Lightning set up the training data
    *before* it restores a checkpoint; the loader positions of that checkpoint are then silently dropped
    and a mid-epoch resume restarts the epoch (Lightning issue #20550). At the first step the data is set
    up the ordinary way. The learning rate before that step is the base rate whatever the period. A
    period in a loaded state (a resumed run) is kept, as a plain ``CosineAnnealingLR`` would keep it.
    """

    def __init__(self, optimizer: Optimizer, period: Callable[[], float], eta_min: float = 0.0) -> None:
        self._period: Optional[Callable[[], float]] = None  # not asked during the constructor's initial step
        super().__init__(optimizer, T_max=None, eta_min=eta_min)  # type: ignore[arg-type]
        self._period = period

    def step(self, epoch: Optional[int] = None) -> None:
        if self.T_max is None and self._period is not None:
            self.T_max = _cosine_period(self._period())
        super().step(epoch)

    def state_dict(self) -> Dict[str, Any]:
        """torch's state without the period callable (checkpoints stay plain data)."""
        return {k: v for k, v in super().state_dict().items() if k != "_period"}


def build_scheduler(
    optimizer: Optimizer,
    name: SchedulerName,
    *,
    total_steps: Union[None, float, Callable[[], float]] = None,
    eta_min: float = 1e-6,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> Optional[LRScheduler]:
    """A per-step schedule (``interval="step"``), or ``None`` for ``"none"``.

    ``total_steps`` is the cosine period (``T_max``): a number (the module's ``scheduler_steps``), or a
    callable asked at the first step (the Trainer's estimated number of optimizer steps; see
    `CosineToTrainingEnd` for why not earlier).
    """
    if name == "none":
        return None
    if name == "cosine":
        if callable(total_steps):
            return CosineToTrainingEnd(optimizer, total_steps, eta_min=eta_min)
        return CosineAnnealingLR(optimizer, T_max=_cosine_period(total_steps), eta_min=eta_min)
    if name == "step":
        if not milestones:
            raise ValueError(
                "scheduler='step' needs step_milestones (optimizer steps at which lr is multiplied by step_gamma)"
            )
        return MultiStepLR(optimizer, milestones=sorted(int(m) for m in milestones), gamma=gamma)
    raise ValueError(f"unknown scheduler {name!r}; choose one of 'cosine', 'step', 'none'")
