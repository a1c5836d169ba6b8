"""The non-finite batch policy as a Lightning callback: a batch whose input, loss, gradients or solves are
not finite never reaches the weights.

Why a callback and not hooks of `DEQLightningModule`: the policy acts in ``on_train_batch_start``,
``on_after_backward`` and ``on_before_optimizer_step``; a subclass that overrode one of those module hooks
without ``super()`` used to switch it off silently (and its warning then named "batch 0"). Callback hooks
run whatever the module overrides, and the policy works for any ``LightningModule``: there it judges the
batch, the loss and the gradients; a `DEQLightningModule` adds its solves (``pl_module.pending_step``, see
`deqlab.lightning._pending`) and runs its forward on a finite stand-in of a non-finite input (`stand_in`).
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Iterator, List, Literal, Mapping, Optional, Tuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import Tensor, nn

from deqlab.lightning._pending import PendingStep
from deqlab.lightning.resume import CHECKPOINT_KEY

__all__ = ["NonFiniteBatchError", "NonFiniteBatchWarning", "NonFiniteGuard"]


class NonFiniteBatchWarning(UserWarning):
    """Warned (once per run) when the non-finite policy ``on_nonfinite="skip"`` drops a training batch.

    Its own class so that a test or a script can filter it (``warnings.simplefilter("error",
    NonFiniteBatchWarning)``) without touching other warnings.

    Examples:
        >>> import warnings
        >>> from deqlab.lightning import NonFiniteBatchWarning
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warnings.warn("batch 3 skipped", NonFiniteBatchWarning)
        >>> caught[0].category.__name__
        'NonFiniteBatchWarning'
    """


class NonFiniteBatchError(FloatingPointError):
    """Raised under ``on_nonfinite="raise"`` for a training batch with a non-finite loss, gradient or solve.

    A ``FloatingPointError``, the built-in class for numerical failures; the message names the batch, the
    solver status and where the non-finite values first appear.

    Examples:
        >>> from deqlab.lightning import NonFiniteBatchError
        >>> issubclass(NonFiniteBatchError, FloatingPointError)
        True
    """


def _floating_tensors(batch: Any) -> Iterator[Tensor]:
    """The floating-point tensors of a batch (a tensor, or lists, tuples and mappings of them), in order."""
    if torch.is_tensor(batch):
        if batch.is_floating_point() and batch.dim() >= 1 and batch.shape[0] > 0:
            yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from _floating_tensors(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from _floating_tensors(value)


def _nonfinite_samples(batch: Any) -> List[int]:
    """Indices (along the first dimension) of the samples with NaN/Inf in the first batch tensor that has any."""
    for t in _floating_tensors(batch):
        bad = (~torch.isfinite(t.detach())).reshape(t.shape[0], -1).any(dim=1)
        if bool(bad.any()):
            return bad.nonzero().flatten().tolist()
    return []


def _parts(state: Any) -> List[Tensor]:
    return list(state) if isinstance(state, (list, tuple)) else [state]


def _finite(state: Any) -> bool:
    return all(bool(torch.isfinite(t.detach()).all()) for t in _parts(state) if torch.is_tensor(t))


class NonFiniteGuard(pl.Callback):
    """Check every training batch after each backward and keep a non-finite one away from the weights.

    A batch is bad when its input, its loss or a gradient is not finite, or a solve of its forward ended
    ``nonfinite``. Under DDP the decision is all-reduced (one rank's bad batch makes every rank treat it as
    bad), so the replicas never drift apart and ``"raise"`` stops every rank together.

    * ``"skip"``: the batch's gradients become ``None`` (under a loss scaler zeros, so that the scaler records
      no overflow), the buffers its forward changed (BatchNorm statistics) are put back, the batch is counted
      (``train/skipped_batches``, ``outputs["deq"].skipped``), and at the optimizer step that ends its
      gradient-accumulation window (``on_before_optimizer_step``, also each ``opt.step()`` under manual
      optimisation) every gradient becomes ``None``: the optimizer leaves each weight and its moment estimates
      untouched. One `NonFiniteBatchWarning` names the first such batch (index, epoch, global step, the
      reasons, the solver status and where the non-finite values first appear) and its window.
    * ``"raise"``: `NonFiniteBatchError` with the same information, at once.

    Under a loss scaler (``precision="16-mixed"``) a non-finite *gradient* is the scaler's overflow signal
    and is left to it (it skips that step and lowers its scale); a non-finite input, loss or solve is still
    skipped as above. The skipped-batch count is checkpointed (Lightning's callback state) and continues
    after a resume.

    `DEQLightningModule` attaches one from ``configure_callbacks`` (with its ``on_nonfinite`` setting); one
    given to the Trainer takes precedence. With a `DEQLightningModule` the training logs of a skipped batch
    are dropped and its forward runs on a zero-filled copy of a non-finite input (`stand_in`).

    Args:
        on_nonfinite: ``"skip"`` (default: drop the update and train on) or ``"raise"``.

    Raises:
        ValueError: when ``on_nonfinite`` is neither ``"skip"`` nor ``"raise"``.

    Examples:
        >>> import pytorch_lightning as pl
        >>> from deqlab.lightning import NonFiniteGuard
        >>> guard = NonFiniteGuard("raise")
        >>> trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[guard])
        >>> NonFiniteGuard.of(trainer) is guard, guard.skipped_batches
        (True, 0)
    """

    def __init__(self, on_nonfinite: Literal["skip", "raise"] = "skip") -> None:
        if on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        self.skipped_batches = 0
        self._warned = False
        self._batch_idx = 0
        self._loss: Any = None  # the loss of the running backward (on_before_backward)
        self._bad_samples: List[int] = []  # samples of this batch with NaN/Inf
        self._stand_in = False  # the forward ran on a zero-filled copy of the input
        self._owners: Optional[List[Tuple[nn.Module, str]]] = None  # (module, name) of every buffer
        self._snapshot: List[Tuple[nn.Module, str, Tensor]] = []  # buffers before this batch's forward
        self._window_start: Optional[int] = None  # first batch of the current gradient-accumulation window
        self._window_bad: List[str] = []  # the window's non-finite batches ("batch 3 (solver status: ...)")
        self._window_message: Optional[str] = None  # full description of the window's first non-finite batch

    @classmethod
    def of(cls, trainer: Optional["pl.Trainer"]) -> Optional["NonFiniteGuard"]:
        """The guard among ``trainer``'s callbacks (``None`` without a trainer or a guard)."""
        # Trainer.callbacks is set by Lightning's callback connector, not declared on the class
        callbacks = trainer.callbacks if trainer is not None else []  # type: ignore[attr-defined]
        return next((c for c in callbacks if isinstance(c, cls)), None)

    # ---- the step's side: a finite stand-in for a non-finite input
    def stand_in(self, x: Any) -> Any:
        """``x``, or a zero-filled copy when the batch has NaN/Inf in ``x``.

        Why run at all: every DDP rank must take part in the gradient all-reduce, so the bad batch still
        runs forward and backward, on a finite copy whose update is then dropped; the model never sees the
        NaN, so nothing downstream of the data (a Skip shortcut, the solver) is blamed for it.
        """
        if not self._bad_samples or not (torch.is_tensor(x) and x.is_floating_point()) or _finite(x):
            return x
        self._stand_in = True
        return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)

    # ---- checkpointed state
    def state_dict(self) -> Dict[str, Any]:
        return {"skipped_batches": self.skipped_batches}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.skipped_batches = int(state_dict.get("skipped_batches", 0))

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: Any, checkpoint: Dict[str, Any]) -> None:
        # checkpoints written before this callback kept the count in deqlab's entry (load_state_dict, called
        # after this hook, overrides it where the checkpoint has the callback's own state)
        entry = checkpoint.get(CHECKPOINT_KEY)
        if isinstance(entry, dict) and "skipped_batches" in entry:
            self.skipped_batches = int(entry["skipped_batches"])

    # ---- hooks
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        self._window_bad, self._window_message, self._window_start = [], None, None  # windows end with the epoch
        self._owners = None  # listed again at the first batch (a model may have changed between epochs)

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx
        if self._window_start is None:
            self._window_start = batch_idx
        self._snapshot_buffers(pl_module)
        self._bad_samples = _nonfinite_samples(batch)
        self._stand_in = False

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: Any, loss: Tensor) -> None:
        self._loss = loss

    def on_after_backward(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        skipped = self._judge(trainer, pl_module)
        step = _pending(pl_module)
        if step is not None:
            step.verdict(trained=not skipped)
        pl_module.log("train/skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False)

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: Any, optimizer: Any) -> None:
        self._close_window(pl_module)

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._loss, self._snapshot, self._bad_samples = None, [], []

    # ---- the judgement
    def _judge(self, trainer: "pl.Trainer", pl_module: Any) -> bool:
        """Whether the batch just back-propagated is skipped (``"raise"``: raise instead)."""
        step = _pending(pl_module)
        reasons = self._reasons(trainer, pl_module, step)
        local_bad = bool(reasons)
        any_bad = trainer.strategy.reduce_boolean_decision(local_bad, all=False)
        if not any_bad:
            return False
        if not local_bad:
            reasons.append("another DDP rank's batch was non-finite (all ranks skip together)")
        counts = step.record.status_counts if step is not None else {}
        status = ", ".join(f"{k}={v}" for k, v in counts.items() if v) or "no DEQ solve"
        message = (
            f"non-finite training batch {self._batch_idx} (epoch {trainer.current_epoch}, global step "
            f"{trainer.global_step}): {'; '.join(reasons)}; solver status: {status}; {self._source(step)}"
        )
        if self.on_nonfinite == "raise":
            raise NonFiniteBatchError(f"{message}. (on_nonfinite='skip' drops such batches and trains on.)")
        # None: the optimizer leaves the weights alone. Under a loss scaler zeros instead, until the window's
        # optimizer step sets them to None (_close_window): the scaler unscales the gradients before that hook
        # and fails on an optimizer without any ("No inf checks were recorded"), and zeros show it no overflow
        scaled = _loss_scaler(trainer)
        with torch.no_grad():
            for p in pl_module.parameters():
                if p.grad is not None and scaled:
                    p.grad.zero_()
                else:
                    p.grad = None
        self._restore_buffers()
        self.skipped_batches += 1
        if step is not None:
            step.record.skipped = True
        self._window_bad.append(f"batch {self._batch_idx} (solver status: {status})")
        if self._window_message is None:
            self._window_message = message
        return True

    def _reasons(self, trainer: "pl.Trainer", pl_module: Any, step: Optional[PendingStep]) -> List[str]:
        """Why the batch just back-propagated is non-finite (empty when it is fine)."""
        reasons: List[str] = []
        if self._bad_samples:
            reasons.append(f"the input has NaN/Inf in {len(self._bad_samples)} sample(s)")
        loss, self._loss = self._loss, None
        if torch.is_tensor(loss) and not _finite(loss):
            reasons.append(f"loss = {float(loss.detach().float().mean())}")
        # within an accumulation window the gradients are sums, but an earlier bad batch already cleared them,
        # so a non-finite gradient here was made by this batch. Under a loss scaler a non-finite gradient is
        # the scaler's overflow signal: it skips that step and lowers its scale, so the gradients are left to
        # it (clearing them would hide the overflow and the scale would never fall).
        if not _loss_scaler(trainer):
            grads = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
            if grads and not bool(torch.stack([torch.isfinite(g).all() for _, g in grads]).all()):
                bad = [n for n, g in grads if not bool(torch.isfinite(g).all())]
                reasons.append(f"non-finite gradient in {len(bad)} parameter(s), e.g. {', '.join(bad[:3])}")
        nonfinite = step.record.status_counts.get("nonfinite", 0) if step is not None else 0
        if nonfinite:
            reasons.append(f"{nonfinite} solve(s) ended nonfinite")
        return reasons

    def _source(self, step: Optional[PendingStep]) -> str:
        """Where the non-finite values first appear, in data-flow order, so that a NaN pixel is blamed on
        the data and not on the shortcut or the solver downstream of it."""
        if self._bad_samples:
            idx = self._bad_samples
            copy = " (the model ran on a zero-filled copy whose update is dropped)" if self._stand_in else ""
            return (
                f"source: the input batch itself has NaN/Inf in {len(idx)} sample(s) (indices {idx[:8]}): the "
                f"data, not the model, produced them{copy}"
            )
        solutions = step.solutions if step is not None else []
        for i, sol in enumerate(solutions):
            if sol.u0 is not None and not _finite(sol.u0):
                return f"source: DEQ layer {i}'s initial guess u0 is non-finite for a finite input"
        for i, sol in enumerate(solutions):
            if not _finite(sol.z_star):
                return f"source: DEQ layer {i}'s solve returned a non-finite z* from a finite input and u0"
        if step is None:
            return "source: the input is finite; the model, the loss or the backward produced the non-finite values"
        return "source: the input, u0 and z* are finite; the loss or the backward produced the non-finite values"

    def _close_window(self, pl_module: Any) -> None:
        """Before the optimizer step that ends a window: drop the window's update when any of its batches was
        non-finite, and warn once per run naming those batches."""
        bad, message, start = self._window_bad, self._window_message, self._window_start
        self._window_bad, self._window_message, self._window_start = [], None, None
        if not bad:
            return
        for p in pl_module.parameters():
            p.grad = None
        step = _pending(pl_module)
        if step is not None:
            step.record.skipped = True  # this step's update is dropped, whichever batch of the window was bad
        if self._warned:
            return
        self._warned = True
        window = ""
        if start is not None and start != self._batch_idx:
            window = (
                f" With gradient accumulation the optimizer step of batches {start}-{self._batch_idx} is "
                f"dropped as a whole; its non-finite batches: {', '.join(bad)}."
            )
        warnings.warn(
            f"deqlab: skipped the update of {message}.{window} Weights are unchanged; further skipped "
            "batches are counted in train/skipped_batches without another warning (on_nonfinite='raise' "
            "stops instead).",
            NonFiniteBatchWarning,
            stacklevel=2,
        )

    # ---- buffers (BatchNorm running statistics): the forward updates them before the batch is judged
    def _snapshot_buffers(self, pl_module: nn.Module) -> None:
        """Copy every buffer before a training batch's forward. The owners are listed once per epoch (the module
        walk costs more than the copies); a model without buffers copies nothing."""
        if self._owners is None:
            self._owners = [(m, n) for m in pl_module.modules() for n, _ in m.named_buffers(recurse=False)]
        self._snapshot = [
            (m, n, getattr(m, n).detach().clone()) for m, n in self._owners if torch.is_tensor(getattr(m, n, None))
        ]

    def _restore_buffers(self) -> None:
        with torch.no_grad():
            for owner, name, saved in self._snapshot:
                current = getattr(owner, name, None)
                if torch.is_tensor(current) and current.shape == saved.shape and current.dtype == saved.dtype:
                    current.copy_(saved)
                else:  # the forward replaced the buffer: put the old tensor back
                    setattr(owner, name, saved)


def _loss_scaler(trainer: "pl.Trainer") -> bool:
    """Whether Lightning's mixed-precision plugin scales the loss (``precision="16-mixed"``)."""
    plugin = trainer.precision_plugin
    return isinstance(plugin, MixedPrecision) and plugin.scaler is not None


def _pending(pl_module: Any) -> Optional[PendingStep]:
    step = getattr(pl_module, "pending_step", None)
    return step if isinstance(step, PendingStep) else None
