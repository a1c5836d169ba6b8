"""The accuracy metrics of a `DEQLightningModule` and their logging: top-1 per stage, top-5 for more than
ten classes, and the explicit (Skip predictor only) accuracy in evaluation.

Why a module of its own: which metrics exist and how each is logged (per epoch, the training batch's on
the progress bar) is one policy, separate from the step that computes the loss; the module keeps the
metrics (``self.metrics``, so Lightning moves and resets them) and delegates here.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, cast

from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["STAGES", "accuracy_metrics", "log_accuracy", "log_explicit_accuracy"]

#: the stages a module logs accuracy for
STAGES: Sequence[str] = ("train", "val", "test")


def accuracy_metrics(num_classes: Optional[int]) -> nn.ModuleDict:
    """Top-1 accuracy per stage (top-5 as well for more than ten classes, the explicit path's in evaluation);
    empty for ``num_classes=None`` (a task that is not classification)."""
    metrics = nn.ModuleDict()
    if num_classes is None:
        return metrics
    for stage in STAGES:
        metrics[f"{stage}_accuracy"] = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        if num_classes > 10:
            metrics[f"{stage}_top5_accuracy"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        if stage != "train":
            metrics[f"{stage}_explicit_accuracy"] = MulticlassAccuracy(num_classes, top_k=1, average="micro")
    return metrics


def log_accuracy(module: Any, output: Tensor, y: Tensor, stage: str, batch_size: Optional[int]) -> None:
    """Update and log ``{stage}/accuracy`` (per epoch), ``train/batch_accuracy`` (per step) and
    ``{stage}/top5_accuracy`` from ``output`` logits of shape ``(B, classes)``; nothing for other outputs."""
    if f"{stage}_accuracy" not in module.metrics or output.dim() != 2:
        return
    preds = output.detach()
    acc = cast(MulticlassAccuracy, module.metrics[f"{stage}_accuracy"])  # accuracy_metrics' (as below)
    batch_acc = acc(preds, y)
    module.log(f"{stage}/accuracy", acc, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=batch_size)
    if stage == "train":
        module.log(
            "train/batch_accuracy", batch_acc, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size
        )
    if f"{stage}_top5_accuracy" in module.metrics:
        top5 = cast(MulticlassAccuracy, module.metrics[f"{stage}_top5_accuracy"])
        top5(preds, y)
        module.log(f"{stage}/top5_accuracy", top5, on_step=False, on_epoch=True, batch_size=batch_size)


def log_explicit_accuracy(
    module: Any, out: Optional[Tensor], elapsed: Optional[float], y: Tensor, stage: str, batch_size: Optional[int]
) -> None:
    """Log ``{stage}/explicit_accuracy`` of ``out``, the module's ``explicit_forward`` (the Skip predictor
    alone), and, with ``log_timing``, the ``elapsed`` seconds it took as ``{stage}/explicit_time``; nothing
    when the model has no explicit path (``out`` is ``None``)."""
    if out is None:
        return
    key = f"{stage}_explicit_accuracy"
    if key in module.metrics and out.dim() == 2:
        metric = cast(MulticlassAccuracy, module.metrics[key])
        metric(out.detach(), y)
        module.log(f"{stage}/explicit_accuracy", metric, on_step=False, on_epoch=True, batch_size=batch_size)
    if module.deq_config.log_timing and elapsed is not None:
        module.log(
            f"{stage}/explicit_time", elapsed, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True
        )
