"""TensorBoard pictures of what the solver did: NFE histograms, convergence curves, the fixed point.

Why callbacks: these are side effects (figures, histograms) that cost extra forward passes or memory;
keeping them out of the module lets a user switch them off (``log_figures=False``) and keeps them on
rank zero only under DDP.
"""
from __future__ import annotations

import logging
from typing import Any, List, Mapping, Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor

from deqlab.lightning._stats import StepRecord, split_forward_output

log = logging.getLogger(__name__)

__all__ = ["NFEHistogram", "ConvergenceFigure", "tensorboard_writers"]


def tensorboard_writers(trainer: pl.Trainer) -> List[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger attached to ``trainer`` (empty when none).

    Why a list: a Trainer may carry several loggers (TensorBoard next to CSV, or two TensorBoard
    directories); the callbacks draw into every TensorBoard one and skip the rest.

    Args:
        trainer: the Trainer whose ``loggers`` are searched (only that attribute is read).

    Returns:
        One ``torch.utils.tensorboard.SummaryWriter`` per ``TensorBoardLogger``, in logger order.

    Examples:
        >>> import tempfile
        >>> from types import SimpleNamespace
        >>> from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
        >>> from deqlab.lightning.callbacks import tensorboard_writers
        >>> with tempfile.TemporaryDirectory() as root:
        ...     trainer = SimpleNamespace(loggers=[CSVLogger(root), TensorBoardLogger(root)])  # a Trainer's loggers
        ...     writers = tensorboard_writers(trainer)
        ...     print([type(w).__name__ for w in writers])
        ...     writers[0].close()
        ['SummaryWriter']
    """
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


class NFEHistogram(pl.Callback):
    """Per epoch, a histogram of the per-batch forward NFE: ``solver/nfe_hist`` (training batches) and
    ``solver/val_nfe_hist`` (validation batches).

    A mean NFE hides the tail: a few batches that hit ``max_steps`` show up here as a separate mode.
    The numbers come from each step's [`StepRecord`][deqlab.lightning.StepRecord] (``outputs["deq"]``).
    Values are collected on rank zero only (each rank sees a shard of the same distribution).

    [`DEQLightningModule`][deqlab.lightning.DEQLightningModule] adds one itself when ``log_figures=True``; pass one to
    the Trainer only to change the tags (a callback of this type given to the Trainer replaces the
    module's). Without a TensorBoard logger nothing is written.

    Args:
        train_tag: TensorBoard tag of the training-batch histogram. Default ``"solver/nfe_hist"``: next to
            the module's other ``solver/`` scalars, so the histogram sits with the NFE curves.
        val_tag: tag of the validation-batch histogram. Default ``"solver/val_nfe_hist"``, the same group.

    Examples:
        >>> from deqlab.lightning import NFEHistogram
        >>> callback = NFEHistogram(train_tag="nfe/train")
        >>> callback.train_tag, callback.val_tag
        ('nfe/train', 'solver/val_nfe_hist')
    """

    def __init__(self, train_tag: str = "solver/nfe_hist", val_tag: str = "solver/val_nfe_hist") -> None:
        self.train_tag = train_tag
        self.val_tag = val_tag
        self._train: List[float] = []
        self._val: List[float] = []

    @staticmethod
    def _nfe(outputs: Any) -> Optional[float]:
        """The forward NFE from the step's record (``outputs["deq"]``, see [`StepRecord`][deqlab.lightning.StepRecord])."""
        record = outputs.get("deq") if isinstance(outputs, Mapping) else None
        if not isinstance(record, StepRecord):
            return None
        return float(record.nfe)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        nfe = self._nfe(outputs)
        if nfe is not None:
            self._train.append(nfe)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, self.train_tag, self._train)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val = []

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        nfe = self._nfe(outputs)
        if nfe is not None:
            self._val.append(nfe)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, self.val_tag, self._val)

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, tag: str, values: Sequence[float]) -> None:
        if not values:
            return
        data = torch.tensor(list(values), dtype=torch.float32)
        for writer in tensorboard_writers(trainer):
            # integer-aligned bins so each NFE value gets its own bar
            lo, hi = float(data.min()), float(data.max())
            bins = int(hi - lo) + 1 if hi - lo < 200 else "auto"
            writer.add_histogram(tag, data, global_step=trainer.global_step, bins=bins if bins != 1 else "auto")


class ConvergenceFigure(pl.Callback):
    """Per validation epoch, for one fixed validation batch: the solver's termination objective versus
    solver step (``solver/convergence``, a matplotlib figure) and a picture of the fixed point
    (``solver/fixed_point``).

    Why a fixed batch: curves from different epochs are then comparable, so one can watch training make
    the fixed point easier (or harder) to find. The curve comes from ``solution.solver_result.trace``;
    solvers that do not record a trace get no figure (logged once at INFO level). The model's forward
    must follow the module's contract (``(output, solution)``); the same ``TypeError`` as in the steps
    says so otherwise.

    [`DEQLightningModule`][deqlab.lightning.DEQLightningModule] adds one with the defaults when ``log_figures=True``;
    give one to the Trainer to change them. Drawing costs one extra forward of the fixed batch per drawn
    epoch, on rank zero only.

    Args:
        num_samples: samples of the batch to plot (each a thin line; the median is bold). Default 16:
            enough lines to see the spread, few enough to tell them apart.
        every_n_epochs: draw every ``n`` validation epochs. Default 1 (every epoch); raise it for long
            runs to save the extra forward and TensorBoard space.
        fixed_point_image: also add ``solver/fixed_point`` (image states: channel mean per sample; dense
            states: the samples × features matrix). Default ``True``: the picture is cheap once the
            forward ran.

    Raises:
        ValueError: when ``num_samples`` or ``every_n_epochs`` is below 1.

    Examples:
        >>> from deqlab.lightning import ConvergenceFigure
        >>> callback = ConvergenceFigure(num_samples=4, every_n_epochs=5)
        >>> callback.num_samples, callback.every_n_epochs, callback.fixed_point_image
        (4, 5, True)
        >>> ConvergenceFigure(num_samples=0)
        Traceback (most recent call last):
        ...
        ValueError: num_samples and every_n_epochs must be >= 1
    """

    def __init__(self, num_samples: int = 16, every_n_epochs: int = 1, fixed_point_image: bool = True) -> None:
        if num_samples < 1 or every_n_epochs < 1:
            raise ValueError("num_samples and every_n_epochs must be >= 1")
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.fixed_point_image = fixed_point_image
        self._batch: Optional[Any] = None
        self._warned = False

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._batch is None and batch_idx == 0 and dataloader_idx == 0:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch["x"] if isinstance(batch, dict) else batch
            if torch.is_tensor(x):
                self._batch = x[: self.num_samples].detach().clone()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._batch is None:
            return
        if trainer.current_epoch % self.every_n_epochs:
            return
        self._draw(trainer, pl_module)

    @rank_zero_only
    def _draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writers = tensorboard_writers(trainer)
        if not writers:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():  # the forward contract checked as in the steps
                _, solutions = split_forward_output(pl_module(self._batch.to(pl_module.device)),
                                                    owner=type(pl_module).__name__)
        finally:
            pl_module.train(was_training)
        if not solutions:
            return
        first = solutions[0]
        step = trainer.global_step
        trace = None if first.solver_result is None else first.solver_result.trace  # None in fixed-depth mode
        if trace is not None:
            fig = convergence_figure(trace, title=f"epoch {trainer.current_epoch}: NFE {first.nfe}, {first.status}")
            for w in writers:
                w.add_figure("solver/convergence", fig, global_step=step, close=False)
            import matplotlib.pyplot as plt

            plt.close(fig)
        elif not self._warned:
            self._warned = True
            log.info("deqlab: the solver recorded no trace; solver/convergence is not drawn")
        if self.fixed_point_image:
            image = fixed_point_image(first.z_star)
            if image is not None:
                for w in writers:
                    w.add_image("solver/fixed_point", image, global_step=step, dataformats="CHW")


def convergence_figure(trace: Tensor, title: str = "") -> Any:
    """A log-scale plot of the ``(steps + 1, B)`` per-sample objective, one thin line per sample."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    t = trace.detach().float().cpu()
    if t.dim() == 1:
        t = t[:, None]
    t = t.clamp_min(1e-12)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=80)
    steps = torch.arange(t.shape[0])
    for j in range(t.shape[1]):
        ax.semilogy(steps, t[:, j], color="0.6", linewidth=0.6)
    ax.semilogy(steps, t.median(dim=1).values, color="C0", linewidth=2.0, label="median")
    ax.set_xlabel("solver step")
    ax.set_ylabel("termination objective")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def fixed_point_image(z: Any, max_samples: int = 8) -> Optional[Tensor]:
    """A ``(1, H, W)`` picture in [0, 1] of the fixed point: image states (B, C, H, W) as the channel mean
    of the first samples side by side; dense states (B, D) as the samples × features matrix."""
    if isinstance(z, (list, tuple)):
        z = z[0] if z else None
    if not torch.is_tensor(z):
        return None
    z = z.detach().float().cpu()
    if z.dim() == 4:
        tiles = z[:max_samples].mean(dim=1)  # (n, H, W)
        img = torch.cat(list(tiles), dim=1)  # (H, n*W)
    elif z.dim() == 2:
        img = z
    else:
        return None
    lo, hi = img.min(), img.max()
    img = (img - lo) / (hi - lo) if hi > lo else torch.zeros_like(img)
    return img[None]
