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
from deqlab.solvers.result import SolverStatus

log = logging.getLogger(__name__)

__all__ = ["NFEHistogram", "ConvergenceFigure", "tensorboard_writers", "convergence_figure", "fixed_point_figure"]


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

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        nfe = self._nfe(outputs)
        if nfe is not None:
            self._train.append(nfe)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, self.train_tag, self._train)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val = []

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
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
        fixed_point_image: also add ``solver/fixed_point``, a figure with axes and a colour bar (image
            states: the channel mean of each sample as a heat map; dense states: the samples × features heat
            map; see `fixed_point_figure`). Default ``True``: the picture is cheap once the forward ran.

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
        self._batch: Optional[Tensor] = None
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
        if not writers or self._batch is None:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():  # the forward contract checked as in the steps
                _, solutions = split_forward_output(
                    pl_module(self._batch.to(pl_module.device)), owner=type(pl_module).__name__
                )
        finally:
            pl_module.train(was_training)
        if not solutions:
            return
        first = solutions[0]
        step = trainer.global_step
        trace = None if first.solver_result is None else first.solver_result.trace  # None in fixed-depth mode
        plt = _plt()
        if trace is not None:
            termination = _termination_of(pl_module)
            fig = convergence_figure(
                trace,
                title=f"epoch {trainer.current_epoch}: NFE {first.nfe}, {SolverStatus(first.status).value}",
                tol=None if termination is None else termination.tol,
                objective="termination objective" if termination is None else termination.objective_name,
            )
            for w in writers:
                w.add_figure("solver/convergence", fig, global_step=step, close=False)
            plt.close(fig)
        elif not self._warned:
            self._warned = True
            log.info("deqlab: the solver recorded no trace; solver/convergence is not drawn")
        if self.fixed_point_image:
            fig = fixed_point_figure(first.z_star, title=f"fixed point z*, epoch {trainer.current_epoch}")
            if fig is not None:
                for w in writers:
                    w.add_figure("solver/fixed_point", fig, global_step=step, close=False)
                plt.close(fig)


def _termination_of(pl_module: Any) -> Any:
    """The first DEQ layer's ``TerminationCondition`` (its tolerance and objective label the plot), or
    ``None`` when the model's solver has none."""
    method = getattr(pl_module, "deq_layers", None)  # DEQLightningModule.deq_layers (this module sits below it)
    layers = method() if callable(method) else []
    solver = getattr(layers[0], "solver", None) if layers else None
    return getattr(solver, "termination", None)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def convergence_figure(
    trace: Tensor, title: str = "", tol: Optional[float] = None, objective: str = "termination objective"
) -> Any:
    """A log-scale plot of the ``(steps + 1, B)`` per-sample objective, one thin line per sample, the median
    bold, and the tolerance the objective must reach as a dashed line.

    Args:
        trace: the solver's ``trace``, ``(steps + 1, B)`` (or ``(steps + 1,)``).
        title: the figure title.
        tol: the termination tolerance, drawn as a horizontal line. Default ``None``: none drawn.
        objective: what the trace records, for the y axis (``TerminationCondition.objective_name``).

    Returns:
        A matplotlib figure (about 640 × 400 pixels).

    Examples:
        >>> import torch
        >>> from deqlab.lightning.callbacks import convergence_figure
        >>> fig = convergence_figure(torch.tensor([[1.0, 2.0], [0.1, 0.3], [0.01, 0.02]]), tol=0.05)
        >>> [tuple(int(v) for v in fig.get_size_inches() * fig.dpi)], fig.axes[0].get_yscale()
        ([(640, 400)], 'log')
    """
    plt = _plt()
    t = trace.detach().float().cpu()
    if t.dim() == 1:
        t = t[:, None]
    t = t.clamp_min(1e-12)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    steps = torch.arange(t.shape[0])
    for j in range(t.shape[1]):
        ax.semilogy(steps, t[:, j], color="0.65", linewidth=0.7)
    ax.semilogy(steps, t.median(dim=1).values, color="C0", linewidth=2.0, label="median over the samples")
    if tol is not None and tol > 0:
        ax.axhline(tol, color="C3", linestyle="--", linewidth=1.2, label=f"tolerance {tol:g}")
    ax.set_xlabel("solver step")
    ax.set_ylabel(objective, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def fixed_point_figure(z: Any, max_samples: int = 8, title: str = "") -> Any:
    """A readable picture of the fixed point, with axes and a colour bar (``None`` for a state it cannot
    draw).

    Image states ``(B, C, H, W)`` (the first scale of a multiscale state): the channel mean of up to
    ``max_samples`` samples as heat maps side by side, one shared colour scale. Dense states ``(B, D)``: the
    samples × features heat map (rows: samples, columns: features), wide enough to read a few hundred
    features.

    Args:
        z: the fixed point ``z*`` (a tensor, or a list of tensors: the first is drawn).
        max_samples: samples drawn. Default 8.
        title: the figure title.

    Returns:
        A matplotlib figure, or ``None``.

    Examples:
        >>> import torch
        >>> from deqlab.lightning.callbacks import fixed_point_figure
        >>> fig = fixed_point_figure(torch.randn(4, 128))
        >>> [ax.get_xlabel() for ax in fig.axes][:1], len(fig.axes)   # the heat map and its colour bar
        (['feature'], 2)
        >>> len(fixed_point_figure(torch.randn(3, 2, 8, 8)).axes)      # 3 samples and the colour bar
        4
    """
    if isinstance(z, (list, tuple)):
        z = z[0] if z else None
    if not torch.is_tensor(z) or z.dim() not in (2, 4) or z.numel() == 0:
        return None
    plt = _plt()
    z = z.detach().float().cpu()[:max_samples]
    if z.dim() == 2:
        n, d = z.shape
        fig, ax = plt.subplots(figsize=(min(12.0, max(6.0, d / 24)), max(2.5, 1.0 + 0.35 * n)), dpi=100)
        im = ax.imshow(z.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("feature")
        ax.set_ylabel("sample")
        ax.set_yticks(range(n))
        fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="z*")
    else:
        maps = z.mean(dim=1)  # (n, H, W)
        n = maps.shape[0]
        lo, hi = float(maps.min()), float(maps.max())
        fig, axes = plt.subplots(1, n, figsize=(max(4.0, 2.2 * n + 1.0), 2.8), dpi=100, squeeze=False)
        im = None
        for j, ax in enumerate(axes[0]):
            im = ax.imshow(maps[j].numpy(), cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(f"sample {j}", fontsize=8)
            ax.set_xlabel("x", fontsize=7)
            if j == 0:
                ax.set_ylabel("y", fontsize=7)
            ax.tick_params(labelsize=6)
        fig.colorbar(im, ax=list(axes[0]), fraction=0.03, pad=0.02, label="channel mean of z*")
    if title:
        fig.suptitle(title, fontsize=9)
    if z.dim() == 2:
        fig.tight_layout()
    return fig
