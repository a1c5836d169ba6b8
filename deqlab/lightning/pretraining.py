"""The pretraining schedule as a Lightning callback: unrolled fixed depth for the first steps, the solver
after them, and always the solver in validation and test.

Why a callback and not hooks of `DEQLightningModule`: a subclass that overrode ``on_train_batch_start`` or
``on_validation_epoch_end`` without ``super()`` used to lose the schedule silently (training at the wrong
depth, or validating with the unrolled layers). Callback hooks run whatever the module overrides, and the
schedule works for any ``LightningModule`` whose network has DEQ layers (`find_deq_layers`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, List, Optional, cast

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from deqlab.lightning.layers import find_deq_layers
from deqlab.nn.protocols import DEQLayer

__all__ = ["PretrainingSchedule"]

log = logging.getLogger(__name__)


@rank_zero_only
def _info(message: str) -> None:
    log.info(message)


class PretrainingSchedule(pl.Callback):
    """For global steps ``< steps`` every DEQ layer runs ``depth`` unrolled applications of its map
    (``layer.fixed_depth = depth``), then the solver (``fixed_depth = 0``); validation and test always run
    the solver.

    The depth is set before each training batch (``on_train_batch_start``) from the global step alone, so a
    resumed run switches at the same step; ``train/pretraining`` logs 1 while pretraining, then 0, and the
    switch is logged at INFO level on this module's logger. From ``on_validation_start`` to
    ``on_validation_end`` (and ``on_test_start`` to ``on_test_end``) every DEQ layer is in
    ``fixed_depth_mode(0)``, so every callback of the evaluation epoch (the convergence figure included) sees
    the solver; the protocol restores the training depth afterwards. With ``steps=0`` the training depth is
    left alone.

    `DEQLightningModule` attaches one from ``configure_callbacks`` with its ``pretrain_steps`` and
    ``pretrain_depth``; one given to the Trainer takes precedence.

    Args:
        steps: optimizer steps of pretraining. Default 0: none (as in the paper's v1 experiments); evaluation
            still runs the solver.
        depth: unrolled depth during pretraining. Default 5, the paper's value.

    Raises:
        ValueError: when ``steps`` < 0 or ``depth`` < 1.

    Examples:
        >>> from deqlab.lightning import PretrainingSchedule
        >>> schedule = PretrainingSchedule(steps=100, depth=3)
        >>> schedule.depth_at(99), schedule.depth_at(100)
        (3, 0)
    """

    def __init__(self, steps: int = 0, depth: int = 5) -> None:
        if steps < 0 or depth < 1:
            raise ValueError(f"pretraining needs steps >= 0 and depth >= 1, got steps={steps} and depth={depth}")
        self.steps = int(steps)
        self.depth = int(depth)
        self._applied: Optional[int] = None  # the training depth this schedule set last (None: none yet)
        self._eval: Optional[contextlib.ExitStack] = None  # the evaluation's solver mode, while it lasts

    def depth_at(self, global_step: int) -> int:
        """The training depth at ``global_step``: ``depth`` while pretraining, else 0 (the solver)."""
        return self.depth if global_step < self.steps else 0

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.steps == 0 and self._applied is None:
            return
        depth = self.depth_at(trainer.global_step)
        if depth != self._applied:
            layers = cast(List[DEQLayer], find_deq_layers(pl_module))  # they implement the protocol
            if depth and not layers:
                raise RuntimeError(
                    f"pretrain_steps={self.steps} but {type(pl_module).__name__} has no DEQ layer (no submodule "
                    "implementing deqlab.nn.DEQLayer: fixed_depth, fixed_depth_mode and jacobian_regularization); "
                    "set pretrain_steps=0"
                )
            for layer in layers:
                layer.fixed_depth = depth
            if depth:
                _info(f"deqlab: pretraining: DEQ layers run {depth} unrolled steps until global step {self.steps}")
            elif self._applied is not None:
                _info(f"deqlab: pretraining finished at global step {trainer.global_step}; DEQ layers use the solver")
            self._applied = depth
        pl_module.log("train/pretraining", float(depth > 0), on_step=True, on_epoch=False)

    # ---- evaluation runs the solver
    def _solver_mode(self, pl_module: Any) -> None:
        self._restore()
        stack = contextlib.ExitStack()
        for layer in cast(List[DEQLayer], find_deq_layers(pl_module)):
            stack.enter_context(layer.fixed_depth_mode(0))
        self._eval = stack

    def _restore(self) -> None:
        if self._eval is not None:
            self._eval.close()
            self._eval = None

    def on_validation_start(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        self._solver_mode(pl_module)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        self._restore()

    def on_test_start(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        self._solver_mode(pl_module)

    def on_test_end(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        self._restore()

    def on_exception(self, trainer: "pl.Trainer", pl_module: Any, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: "pl.Trainer", pl_module: Any, stage: str) -> None:
        self._restore()
