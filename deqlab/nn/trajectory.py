"""Trajectory sampling and the fixed-point correction loss (Bai et al. 2022, DEQ-Flow).

A layer built with ``sample_states=k`` or ``sample_at=[...]`` returns, in ``solution.states``, ``k``
differentiable states along the solver's path, the last one ``z*`` itself. Each intermediate state
gets its gradient the way torchdeq's ``indexing`` core gives it with phantom gradients: the solver's
iterate ``z_i`` at the sampled step is detached and ``sample_grad`` damped steps
``z <- (1 - sample_tau) z + sample_tau f(z, x)`` are taken from it with autograd on (so the state's
value is that of those extra steps, and its gradient flows through them into ``x`` and the map's
parameters). The last state is ``z*`` with the layer's own backward mode (implicit by default).
[`fixed_point_correction_loss`][deqlab.nn.fixed_point_correction_loss] then weighs a loss over all the
states, so the early iterates are trained to move towards the fixed point too.

The solver keeps its iterates at the sampled steps per sample (see
[`record_iterates`][deqlab.solvers.record_iterates]): a sample that converged before a sampled step gives
its converged iterate there, so every sample always yields ``k`` states (torchdeq returns fewer there).
"""

from __future__ import annotations

from typing import Any, Callable, List, Literal, Optional, Sequence, Union

from torch import Tensor

from deqlab.state import State, as_parts, from_parts

__all__ = ["fixed_point_correction_loss", "correction_weights", "sample_steps"]

CorrectionWeight = Literal["exp", "linear", "const"]


def sample_steps(n_states: int, max_steps: int) -> List[int]:
    """The solver steps of the ``n_states - 1`` intermediate states of ``sample_states=n_states``: the
    states split ``max_steps`` evenly (torchdeq's ``n_states`` spacing), the last one, at ``max_steps``, is
    replaced by ``z*``.

    Args:
        n_states: states to sample (``>= 1``; 1 samples ``z*`` alone).
        max_steps: the solver's step budget.

    Returns:
        The increasing step indices of the intermediate states.

    Example:
        >>> from deqlab.nn.trajectory import sample_steps
        >>> sample_steps(3, 30), sample_steps(3, 50), sample_steps(1, 50)
        ([10, 20], [18, 34], [])
    """
    n = max(min(int(max_steps), int(n_states)), 1)
    delta = int(max_steps) // n
    if int(max_steps) % n == 0:
        steps = [(j + 1) * delta for j in range(n)]
    else:
        steps = [int(max_steps) - (n - j - 1) * delta for j in range(n)]
    return steps[:-1]


def correction_weights(k: int, weight: CorrectionWeight = "exp", gamma: float = 0.8) -> List[float]:
    """The weights of [`fixed_point_correction_loss`][deqlab.nn.fixed_point_correction_loss] for ``k`` states.

    Args:
        k: the number of states (``>= 1``).
        weight: ``"exp"``: ``gamma ** (k - 1 - i)`` (DEQ-Flow; the last state weighs 1, earlier ones
            decay geometrically); ``"linear"``: ``(i + 1) / k`` (the last weighs 1, the first ``1/k``);
            ``"const"``: 1 for every state.
        gamma: the decay of ``"exp"``, in ``(0, 1]``. Default 0.8, DEQ-Flow's.

    Returns:
        ``k`` floats, first state first.

    Raises:
        ValueError: ``k < 1``, an unknown ``weight``, or ``gamma`` outside ``(0, 1]``.

    Example:
        >>> from deqlab.nn import correction_weights
        >>> correction_weights(3, "exp", 0.5), correction_weights(4, "linear"), correction_weights(2, "const")
        ([0.25, 0.5, 1.0], [0.25, 0.5, 0.75, 1.0], [1.0, 1.0])
    """
    if k < 1:
        raise ValueError(f"fixed_point_correction_loss: need at least one state, got {k}")
    if weight == "exp":
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"fixed_point_correction_loss: gamma must be in (0, 1], got {gamma}")
        return [float(gamma) ** (k - 1 - i) for i in range(k)]
    if weight == "linear":
        return [(i + 1) / k for i in range(k)]
    if weight == "const":
        return [1.0] * k
    raise ValueError(f"fixed_point_correction_loss: weight must be 'exp', 'linear' or 'const', got {weight!r}")


def fixed_point_correction_loss(
    criterion: Callable[[Any, Any], Tensor],
    states: Sequence[Any],
    target: Any,
    weight: Union[CorrectionWeight, Sequence[float]] = "exp",
    gamma: float = 0.8,
    *,
    return_parts: bool = False,
):
    """DEQ-Flow's fixed-point correction: ``sum_i w_i * criterion(states[i], target)``.

    ``states`` are the sampled states of ``solution.states`` (or outputs decoded from them), first to
    last, the last being ``z*`` (or its output). The weights are those of
    [`correction_weights`][deqlab.nn.correction_weights]: ``"exp"`` (default) ``gamma ** (k - 1 - i)``,
    ``"linear"`` ``(i + 1) / k``, ``"const"`` 1. The sum is not normalized (as DEQ-Flow's), so with
    ``"exp"`` the last state's term enters with weight 1 and the loss of one state equals ``criterion``.

    Args:
        criterion: ``criterion(state, target) -> scalar`` (e.g. ``torch.nn.functional.mse_loss``).
        states: the states (or outputs), first to last.
        target: passed to ``criterion`` with every state.
        weight: ``"exp"``, ``"linear"`` or ``"const"``, or one float per state (first state first) for a
            schedule of your own (torchdeq's ``"linear"`` weights, for example).
        gamma: the decay of ``"exp"`` (DEQ-Flow: 0.8).
        return_parts: also return the unweighted per-state losses.

    Returns:
        The scalar loss, or ``(loss, [per-state losses])`` with ``return_parts=True``.

    Raises:
        ValueError: no states, an unknown ``weight`` (or a list of weights of another length than
            ``states``), or ``gamma`` outside ``(0, 1]``.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from deqlab.nn import fixed_point_correction_loss
        >>> states = [torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([2.0])]
        >>> loss, parts = fixed_point_correction_loss(F.mse_loss, states, torch.tensor([2.0]), "exp", 0.5,
        ...                                           return_parts=True)
        >>> float(loss), [float(p) for p in parts]   # 0.25 * 4 + 0.5 * 1 + 1 * 0
        (1.5, [4.0, 1.0, 0.0])
    """
    states = list(states)
    if isinstance(weight, str):
        weights = correction_weights(len(states), weight, gamma)
    else:
        weights = [float(w) for w in weight]
        if not states or len(weights) != len(states):
            raise ValueError(
                f"fixed_point_correction_loss: {len(weights)} weights for {len(states)} states; give one per state"
            )
    parts = [criterion(s, target) for s in states]
    loss = sum(w * p for w, p in zip(weights, parts))
    return (loss, parts) if return_parts else loss


def check_sampling(
    owner: str, sample_states: Optional[int], sample_at: Optional[Sequence[int]], sample_grad: int, sample_tau: float
) -> Optional[List[int]]:
    """Validate the sampling options of a layer; ``None`` (no sampling), ``[]`` (``z*`` alone, or steps
    computed from the solver's budget at each forward: see `resolve_steps`) or the explicit steps."""
    if sample_states is not None and sample_at is not None:
        raise ValueError(
            f"{owner}: sample_states and sample_at both choose the sampled states; pass one "
            f"(sample_states=k spreads k states, sample_at=[...] names the solver steps)"
        )
    if isinstance(sample_grad, bool) or not isinstance(sample_grad, int) or sample_grad < 1:
        raise ValueError(f"{owner}: sample_grad must be an int >= 1, got {sample_grad!r}")
    if not 0.0 < float(sample_tau) <= 1.0:
        raise ValueError(f"{owner}: sample_tau must be in (0, 1], got {sample_tau!r}")
    if sample_states is not None:
        if isinstance(sample_states, bool) or not isinstance(sample_states, int) or sample_states < 1:
            raise ValueError(f"{owner}: sample_states must be an int >= 1, got {sample_states!r}")
        return None
    if sample_at is not None:
        steps = list(sample_at)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps) or steps != sorted(set(steps)):
            raise ValueError(f"{owner}: sample_at must be increasing ints >= 0, got {list(sample_at)!r}")
        return steps
    return None


def phantom_states(fmap: Callable[[State], State], iterates: Sequence[State], n_steps: int, tau: float) -> List[State]:
    """``n_steps`` damped steps ``z <- (1 - tau) z + tau f(z)`` from each detached iterate, with autograd
    on when it is enabled: the gradient of each intermediate sampled state."""
    out = []
    for it in iterates:
        is_list = not isinstance(it, Tensor)
        z = [t.detach() for t in as_parts(it)]
        for _ in range(n_steps):
            fz = as_parts(fmap(from_parts(z, is_list)))
            z = list(fz) if tau == 1.0 else [(1 - tau) * a + tau * b for a, b in zip(z, fz)]
        out.append(from_parts(z, is_list))
    return out
