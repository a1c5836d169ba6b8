"""The researcher's own loss terms (``extra_losses``), checked before they join the loss.

Why checked here: a term under a name the module logs itself would overwrite that scalar, a non-scalar
term would break DDP's batch-mean contract, and a weight whose term never comes would drop it silently.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import torch
from torch import Tensor

__all__ = ["RESERVED_LOSS_NAMES", "checked_extra_terms"]

#: Names under ``train/`` etc. that the module logs itself; ``extra_losses`` may not reuse them.
RESERVED_LOSS_NAMES = frozenset({
    "loss", "task_loss", "skip_loss", "jacobian_loss", "accuracy", "batch_accuracy", "top5_accuracy",
    "explicit_accuracy", "explicit_time", "loss_epoch", "pretraining", "skipped_batches",
})


def checked_extra_terms(owner: str, terms: Any, weights: Mapping[str, float],
                        stage: str) -> Dict[str, Tuple[Tensor, float]]:
    """``{name: (scalar term, weight)}`` from what ``owner.extra_losses`` returned in a ``stage`` step.

    Args:
        owner: the model's class name, for the messages.
        terms: what ``extra_losses`` returned (a mapping name -> scalar tensor; ``None`` or empty: none).
        weights: ``extra_loss_weights`` of the training settings (1.0 for a name without one).
        stage: ``"train"``, ``"val"`` or ``"test"``; a training step must return every weighted name.

    Returns:
        Each term as a 0-d tensor with its weight.

    Raises:
        TypeError: when ``terms`` is not a mapping or a term is not a one-element tensor.
        ValueError: when a name is reserved (`RESERVED_LOSS_NAMES`) or contains ``/``, or a weighted name is
            missing from a training step's terms.

    Examples:
        >>> import torch
        >>> from deqlab.lightning.losses import checked_extra_terms
        >>> checked_extra_terms("Model", {"z_norm": torch.tensor([2.0])}, {"z_norm": 0.5}, "train")
        {'z_norm': (tensor(2.), 0.5)}
    """
    terms = terms or {}
    if not isinstance(terms, Mapping):
        raise TypeError(f"{owner}.extra_losses must return a mapping name -> scalar tensor, got {type(terms).__name__}")
    out: Dict[str, Tuple[Tensor, float]] = {}
    for name, value in terms.items():
        if name in RESERVED_LOSS_NAMES or "/" in str(name):
            raise ValueError(f"extra_losses: the name {name!r} is reserved or contains '/'; pick another")
        if not (torch.is_tensor(value) and value.numel() == 1):
            raise TypeError(f"extra_losses: term {name!r} must be a scalar tensor (a batch mean), got "
                            f"{type(value).__name__}{tuple(value.shape) if torch.is_tensor(value) else ''}")
        out[str(name)] = (value.reshape(()), float(weights.get(name, 1.0)))
    orphans = sorted(set(weights) - set(out)) if stage == "train" else []
    if orphans:
        raise ValueError(f"extra_loss_weights names {', '.join(map(repr, orphans))} but {owner}.extra_losses "
                         f"returned {sorted(out) or 'no terms'} in this training step; fix the name or drop the weight")
    return out
