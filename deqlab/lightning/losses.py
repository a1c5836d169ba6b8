"""The researcher's own loss terms (``extra_losses``), checked before they join the loss.

Why checked here: a term under a name the module logs itself would overwrite that scalar, a non-scalar
term would break DDP's batch-mean contract, and a weight whose term never comes would drop it silently.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, cast

import torch
from torch import Tensor

from deqlab.nn.trajectory import CorrectionWeight, fixed_point_correction_loss
from deqlab.state import State

__all__ = ["RESERVED_LOSS_NAMES", "checked_extra_terms", "correction_task_loss"]

#: Names under ``train/`` etc. that the module logs itself; ``extra_losses`` may not reuse them.
RESERVED_LOSS_NAMES = frozenset(
    {
        "loss",
        "task_loss",
        "skip_loss",
        "jacobian_loss",
        "accuracy",
        "batch_accuracy",
        "top5_accuracy",
        "explicit_accuracy",
        "explicit_time",
        "loss_epoch",
        "pretraining",
        "skipped_batches",
    }
)
#: the per-state parts of the fixed-point correction loss are logged as ``{stage}/state_loss_{i}``
STATE_LOSS_PREFIX = "state_loss_"


def correction_task_loss(
    owner: str,
    task_loss: Callable[[Tensor, Tensor], Tensor],
    state_output: Callable[[Any], Tensor],
    output: Tensor,
    solutions: Sequence[Any],
    target: Tensor,
    weight: str = "exp",
    gamma: float = 0.8,
) -> Tuple[Tensor, Optional[List[Tensor]]]:
    """The task term of a step: ``task_loss(output, target)``, or, when a DEQ layer of the step samples
    states (``sample_states`` / ``sample_at``), DEQ-Flow's fixed-point correction loss over the outputs
    decoded from them.

    The last state is ``z*``, whose output is the model's ``output``; each earlier state ``s`` is decoded
    by ``state_output(s)`` (the module's hook) and all of them enter
    [`fixed_point_correction_loss`][deqlab.nn.fixed_point_correction_loss] with ``task_loss`` as the
    criterion.

    Args:
        owner: the model's class name, for the messages.
        task_loss: the module's ``task_loss(output, target)``.
        state_output: the module's ``state_output(state) -> output`` hook.
        output: the model's output (from ``z*``).
        solutions: the step's DEQ solution records.
        target: the targets.
        weight: ``"exp"``, ``"linear"`` or ``"const"`` (see [`correction_weights`][deqlab.nn.correction_weights]).
        gamma: the decay of ``"exp"``.

    Returns:
        ``(task term, per-state unweighted losses)``; the parts are ``None`` when no layer samples states.

    Raises:
        ValueError: more than one DEQ layer of the step samples states (which trajectory to correct is
            ambiguous: combine them yourself in ``extra_losses``).

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from types import SimpleNamespace
        >>> from deqlab.lightning.losses import correction_task_loss
        >>> sol = SimpleNamespace(states=[torch.tensor([0.0]), torch.tensor([1.0])])
        >>> loss, parts = correction_task_loss("M", F.mse_loss, lambda s: s, torch.tensor([1.0]), [sol],
        ...                                    torch.tensor([1.0]), "exp", 0.5)
        >>> float(loss), [float(p) for p in parts]      # 0.5 * (0 - 1)^2 + 1 * 0
        (0.5, [1.0, 0.0])
    """
    sampled = [s for s in solutions if getattr(s, "states", None) is not None]
    if not sampled:
        return task_loss(output, target), None
    if len(sampled) > 1:
        raise ValueError(
            f"{owner}: {len(sampled)} DEQ layers sample states; the fixed-point correction loss "
            f"corrects one trajectory. Sample in one layer, or add the others' terms in extra_losses"
        )
    states = sampled[0].states
    outputs = [state_output(s) for s in states[:-1]] + [output]
    criterion = cast(Callable[[State, Tensor], Tensor], task_loss)  # it sees the decoded outputs: tensors
    kind = cast(CorrectionWeight, weight)  # checked by correction_weights
    return fixed_point_correction_loss(criterion, outputs, target, kind, gamma, return_parts=True)


def checked_extra_terms(
    owner: str, terms: Any, weights: Mapping[str, float], stage: str
) -> Dict[str, Tuple[Tensor, float]]:
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
        if name in RESERVED_LOSS_NAMES or "/" in str(name) or str(name).startswith(STATE_LOSS_PREFIX):
            raise ValueError(f"extra_losses: the name {name!r} is reserved or contains '/'; pick another")
        if not (torch.is_tensor(value) and value.numel() == 1):
            raise TypeError(
                f"extra_losses: term {name!r} must be a scalar tensor (a batch mean), got "
                f"{type(value).__name__}{tuple(value.shape) if torch.is_tensor(value) else ''}"
            )
        out[str(name)] = (value.reshape(()), float(weights.get(name, 1.0)))
    orphans = sorted(set(weights) - set(out)) if stage == "train" else []
    if orphans:
        raise ValueError(
            f"extra_loss_weights names {', '.join(map(repr, orphans))} but {owner}.extra_losses "
            f"returned {sorted(out) or 'no terms'} in this training step; fix the name or drop the weight"
        )
    return out
