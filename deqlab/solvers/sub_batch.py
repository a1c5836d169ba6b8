"""Maps a solver may evaluate on a subset of the batch: the contract behind per-sample early exit.

Why: a batch converges unevenly (easy samples in 3 steps, hard ones in 30), yet a batched solver keeps
evaluating ``f`` on every sample until the last one stops. When ``f`` treats samples independently (no
BatchNorm with batch statistics, no attention across the batch), evaluating it only on the samples still
iterating gives the same fixed points for less work. A solver cannot know that from a plain callable, so a
map that allows it says so by having ``restrict(index)``: a map on the samples ``index`` of the original
batch. [`DiscreteDEQSolver`][deqlab.solvers.DiscreteDEQSolver] with ``per_sample_exit=True`` requires it; the DEQ
layers of `deqlab.nn` provide it (and refuse it, with the reason, when their map couples samples).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

from torch import Tensor

from deqlab.state import State

__all__ = ["PerSampleMap", "SubBatchMap"]


@runtime_checkable
class SubBatchMap(Protocol):
    """A map ``f(z)`` that can also be evaluated on a subset of its batch.

    ``restrict(index)`` returns the map of the samples ``index`` (a 1-D long tensor of positions in the
    *original* batch, not in a previous restriction): called on a state of ``len(index)`` samples it must
    return, row for row, what ``f`` returns for those samples of the full batch. It may raise
    ``ValueError`` when the map couples samples (then per-sample early exit would change ``f``); solvers
    call it once on the whole batch before any work so such an error comes first.

    Raises:
        TypeError: when the protocol itself is instantiated (it is a contract to implement, or to check
            with ``isinstance``).

    Example:
        >>> import torch
        >>> from deqlab.solvers import PerSampleMap, SubBatchMap
        >>> f = PerSampleMap(lambda z, b: 0.5 * z + b, torch.tensor([[1.0], [2.0]]))
        >>> isinstance(f, SubBatchMap)
        True
    """

    def __call__(self, z: State) -> State: ...

    def restrict(self, index: Tensor) -> Callable[[State], State]: ...


class PerSampleMap:
    """``z -> fn(z, *inputs)`` for a map whose samples are independent, with per-sample early exit support.

    Every tensor in ``inputs`` is batch-first and is indexed with the samples of a restriction; other
    values (floats, modules, ``None``) are passed unchanged. Use it to give a plain function to a solver
    with ``per_sample_exit=True``; DEQ layers build their own restrictable map.

    Args:
        fn: the map ``fn(z, *inputs) -> state shaped like z``; it must treat samples independently
            (sample ``i`` of the output depends only on sample ``i`` of ``z`` and of each input), which is
            what makes evaluating a subset exact.
        *inputs: per-sample tensors (the injection ``x``, per-sample parameters) and constants.

    Example:
        >>> import torch
        >>> from deqlab.solvers import DiscreteDEQSolver, PerSampleMap
        >>> rate = torch.tensor([[0.1], [0.9]], dtype=torch.float64)   # one easy and one slow sample
        >>> f = PerSampleMap(lambda z, r: r * z + 1.0, rate)
        >>> solver = DiscreteDEQSolver("fixed_point", per_sample_exit=True, max_steps=500,
        ...                            abstol_termination=1e-8, reltol_termination=1e-8)
        >>> result = solver(f, torch.zeros(2, 1, dtype=torch.float64))
        >>> result.z.squeeze(1).round(decimals=5).tolist()        # 1 / (1 - rate)
        [1.11111, 10.0]
        >>> result.sample_weighted_nfe < result.nfe                # the easy sample stopped being evaluated
        True
    """

    def __init__(self, fn: Callable[..., State], *inputs: Any):
        self.fn = fn
        self.inputs = inputs

    def __call__(self, z: State) -> State:
        return self.fn(z, *self.inputs)

    def restrict(self, index: Tensor) -> "PerSampleMap":
        """The map of the samples ``index`` of the original batch.

        Args:
            index: 1-D long tensor of sample positions.

        Returns:
            A [`PerSampleMap`][deqlab.solvers.PerSampleMap] over ``inputs`` indexed with ``index``.
        """
        return PerSampleMap(self.fn, *(v.index_select(0, index) if isinstance(v, Tensor) else v for v in self.inputs))
