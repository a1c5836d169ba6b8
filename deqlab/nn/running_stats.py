"""BatchNorm running statistics inside a DEQ map: updated once per training forward, at the fixed point.

Why: a DEQ layer evaluates its map tens of times per forward (every solver step, the Skip Reg. guess, the
Jacobian loss, the backward's re-evaluations). A train-mode ``nn.BatchNorm*`` inside the map would fold
the batch statistics of *every* iterate into its running statistics (a 14-step solve plus its backward:
15 or more momentum updates per training step, most of them at iterates far from ``z*``), so in eval mode
the layer would normalise with statistics of states it never returns. The layers therefore freeze the
running statistics during those evaluations and update them once, with one evaluation of the map at
``z*``.

Freezing keeps the normalisation itself unchanged: a train-mode BatchNorm still normalises with the
statistics of the current batch, only ``running_mean``, ``running_var`` and ``num_batches_tracked`` are
left alone (done by setting ``track_running_stats = False`` for the duration, which is what a train-mode
BatchNorm reads to decide whether to update them). The switch is per module, not per thread: while one
thread's solve holds it, another thread's evaluations of the same module do not update the statistics
either (concurrent training of one BatchNorm has no well-defined running statistics anyway).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Iterator, List, Sequence, TypeGuard

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["frozen_running_stats", "updating_batch_norms"]

_LOCK = threading.Lock()
# module -> number of open frozen_running_stats blocks holding it (its tracking is restored at 0)
_HELD: "weakref.WeakKeyDictionary[_BatchNorm, int]" = weakref.WeakKeyDictionary()


def _held_or_tracking(m: nn.Module) -> TypeGuard[_BatchNorm]:
    return isinstance(m, _BatchNorm) and m.training and (m.track_running_stats or m in _HELD)


def updating_batch_norms(modules: Sequence[nn.Module]) -> List[_BatchNorm]:
    """The BatchNorm modules among ``modules`` (searched recursively) whose forward updates running
    statistics: in training mode with ``track_running_stats=True`` (or frozen by an open
    `frozen_running_stats` block, which restores that).

    Args:
        modules: the modules of a DEQ map.

    Returns:
        The BatchNorm modules, each once, in ``modules()`` order.

    Example:
        >>> from torch import nn
        >>> from deqlab.nn.running_stats import updating_batch_norms
        >>> block = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4, track_running_stats=False))
        >>> [type(m).__name__ for m in updating_batch_norms([block])]
        ['BatchNorm1d']
        >>> updating_batch_norms([block.eval()])
        []
    """
    seen, found = set(), []
    for root in modules:
        for m in root.modules():
            if id(m) not in seen and _held_or_tracking(m):
                seen.add(id(m))
                found.append(m)
    return found


@contextlib.contextmanager
def frozen_running_stats(modules: Sequence[nn.Module]) -> Iterator[List[_BatchNorm]]:
    """Inside the block, the train-mode BatchNorms of ``modules`` normalise with batch statistics as
    usual but do not update their running statistics (nor ``num_batches_tracked``).

    Blocks nest and may overlap between threads: a module's tracking is restored when the last block
    holding it exits. Modules in eval mode are left alone (they use their running statistics and update
    nothing).

    Args:
        modules: the modules of a DEQ map (searched recursively).

    Returns:
        A context manager yielding the BatchNorm modules it froze (empty when there are none: then it
        costs one module walk).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deqlab.nn.running_stats import frozen_running_stats
        >>> bn = nn.BatchNorm1d(3)
        >>> x = torch.randn(8, 3) + 5
        >>> with frozen_running_stats([bn]):
        ...     y = bn(x)                       # normalised with the batch's statistics ...
        >>> int(bn.num_batches_tracked), bn.running_mean.tolist()   # ... and nothing was recorded
        (0, [0.0, 0.0, 0.0])
        >>> bool(y.mean(0).abs().max() < 1e-5), bn.track_running_stats
        (True, True)
    """
    with _LOCK:
        held = updating_batch_norms(modules)
        for m in held:
            _HELD[m] = _HELD.get(m, 0) + 1
            m.track_running_stats = False
    try:
        yield held
    finally:
        with _LOCK:
            for m in held:
                n = _HELD.get(m, 1) - 1
                if n <= 0:
                    _HELD.pop(m, None)
                    m.track_running_stats = True
                else:
                    _HELD[m] = n
