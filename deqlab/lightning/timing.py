"""Wall-clock time of the phases of a training step: a timer, and the callback that logs the phases around
the forward.

Why a helper: asynchronous CUDA kernels make a bare ``perf_counter`` measure kernel *launch* time, so
every reading synchronizes the device first when the module runs on CUDA. Why a callback for the backward,
the optimizer step and the epoch: their edges are Lightning hooks, and a module hook that a subclass
overrides without ``super()`` would lose them; the forward is timed inside `DEQLightningModule`'s step,
which is where it runs.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
import torch

__all__ = ["PhaseTimer", "PhaseTiming"]


class PhaseTimer:
    """Start/stop named phases (``forward``, ``backward``, ``optimizer``) and keep the last durations.

    Examples:
        >>> from deqlab.lightning.timing import PhaseTimer
        >>> timer = PhaseTimer()
        >>> timer.start("forward")
        >>> timer.stop("forward") >= 0, timer.stop("never started")
        (True, None)
    """

    def __init__(self) -> None:
        self._started: Dict[str, float] = {}
        self.last: Dict[str, float] = {}

    @staticmethod
    def _sync(device: Optional[torch.device]) -> None:
        if device is not None and device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(device)

    def start(self, name: str, device: Optional[torch.device] = None) -> None:
        self._sync(device)
        self._started[name] = time.perf_counter()

    def stop(self, name: str, device: Optional[torch.device] = None) -> Optional[float]:
        """Seconds since ``start(name)``; ``None`` when the phase was never started (e.g. a skipped hook)."""
        begun = self._started.pop(name, None)
        if begun is None:
            return None
        self._sync(device)
        elapsed = time.perf_counter() - begun
        self.last[name] = elapsed
        return elapsed

    def discard(self, name: str) -> None:
        """Forget a started phase that will not end (an optimizer step a loss scaler skipped)."""
        self._started.pop(name, None)


class PhaseTiming(pl.Callback):
    """Log the wall time of the backward (``time/backward``), the optimizer step (``time/optimizer``) and the
    training epoch (``time/train_epoch``), device-synchronized on CUDA.

    The backward is timed from ``on_before_backward`` to ``on_after_backward`` (each backward, so each
    micro-batch of an accumulation window); the optimizer step from ``on_before_optimizer_step`` (after the
    closure's forward and backward) to the end of the optimizer's ``step``, seen through the optimizer's
    public step post-hook (registered when training starts, removed when it ends); a step a loss scaler skips
    logs nothing. `DEQLightningModule` attaches one from ``configure_callbacks`` when ``log_timing`` is on
    (it times the forward in its step, ``time/forward``); one given to the Trainer takes precedence.

    Examples:
        >>> import pytorch_lightning as pl
        >>> from deqlab.lightning import PhaseTiming
        >>> trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[PhaseTiming()])
        >>> sum(isinstance(c, PhaseTiming) for c in trainer.callbacks)
        1
    """

    def __init__(self) -> None:
        self.timer = PhaseTimer()
        self._epoch_start: Optional[float] = None
        self._hooks: List[Any] = []

    def on_train_start(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        self._remove_hooks()
        self._hooks = [opt.register_step_post_hook(partial(self._stepped, pl_module)) for opt in trainer.optimizers]

    def on_train_end(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: "pl.Trainer", pl_module: Any, exception: BaseException) -> None:
        self._remove_hooks()

    def teardown(self, trainer: "pl.Trainer", pl_module: Any, stage: str) -> None:
        self._remove_hooks()

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        if self._epoch_start is not None:
            pl_module.log(
                "time/train_epoch",
                time.perf_counter() - self._epoch_start,
                on_step=False,
                on_epoch=True,
                sync_dist=True,
            )

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: Any, loss: torch.Tensor) -> None:
        self.timer.start("backward", pl_module.device)

    def on_after_backward(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        elapsed = self.timer.stop("backward", pl_module.device)
        if elapsed is not None:
            pl_module.log("time/backward", elapsed, on_step=True, on_epoch=False)

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: Any, optimizer: Any) -> None:
        self.timer.start("optimizer", pl_module.device)

    def _stepped(self, pl_module: Any, optimizer: Any, args: Any, kwargs: Any) -> None:
        elapsed = self.timer.stop("optimizer", pl_module.device)
        if elapsed is not None:
            pl_module.log("time/optimizer", elapsed, on_step=True, on_epoch=False)

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.timer.discard("optimizer")  # a step the loss scaler skipped never reached the post-hook

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
