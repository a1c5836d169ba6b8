"""A block of solver steps captured once per solve as a CUDA graph and replayed for every later block.

Why: on a GPU a small map's solver step is dozens of tiny kernels, and each launch costs several
microseconds of host time -- more than the kernel itself. Between two host checks (``check_every``) a
solver needs nothing from the host, so the ``k`` steps of a block can be one CUDA graph: one launch per
block, no host work in between. ``DiscreteDEQSolver(cuda_graphs=True, check_every=k)`` uses it.

How: the first block of a solve runs normally on a side stream (the warm-up CUDA asks for before a
capture, and real work: its steps count). Its outputs become the *static* state, and the block is
captured reading that state and writing its results back into it, so each replay advances the solve by
``k`` steps in place. A graph lives for one solve: the map ``f`` closes over this solve's inputs, whose
addresses a replay in another solve could not know. Shapes are static within a solve (no per-sample
exit), and the step must not depend on the host's step count (``count=None``: Broyden multiplies by all
its zero-filled pairs).

What cannot be captured (a host sync or a host-to-device copy in ``f``, an op without graph support)
makes the capture fail; the solver then warns once
([`CompileFallbackWarning`][deqlab.solvers.CompileFallbackWarning]) and runs the same blocks uncaptured.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from deqlab.solvers.compiled import fallback_warning

#: ``block(*state) -> (new state, objectives)``: the steps of one block, the state a tuple of tensors,
#: dicts and tuples of them, of the same structure in and out
Block = Callable[..., Tuple[tuple, Tensor]]


class CapturedBlock:
    """``(*state) -> (new state, objectives)`` for one solve: the first call runs ``block`` and captures it,
    every later call replays the graph.

    The state returned by a replay is the static buffers themselves (the next replay overwrites them): the
    caller reads it before the next call. ``objectives`` (the ``(k, B)`` termination objectives of the
    block's steps) is cloned here, because the trace keeps it.
    """

    def __init__(self, block: Block, *, owner: str):
        self.block, self.owner = block, owner
        self.graph: Optional[Any] = None
        self.failed = False
        self.replays = 0
        self._static: List[Any] = []
        self._out: Optional[Tuple[tuple, Tensor]] = None

    def __call__(self, *state: Any) -> Tuple[tuple, Tensor]:
        if self.graph is not None:
            self.graph.replay()
            self.replays += 1
            assert self._out is not None
            static_state, objs = self._out
            return static_state, objs.clone()
        new_state, objs = self._warm_up(state)
        if not self.failed:
            self._capture(new_state)
        return new_state, objs

    def _warm_up(self, state: tuple) -> Tuple[tuple, Tensor]:
        """The first block, run on a side stream: CUDA's advice before a capture (lazy initialisation of
        the libraries, the allocator's stream), and real steps of the solve."""
        device = next(t for t in tree_flatten(state)[0] if isinstance(t, Tensor)).device
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            out = self.block(*state)
        current.wait_stream(side)
        return out

    def _capture(self, state: tuple) -> None:
        leaves, spec = tree_flatten(state)
        # the static state: copies of the warm-up's outputs, so nothing the caller holds is overwritten
        self._static = [t.clone() if isinstance(t, Tensor) else t for t in leaves]
        static_state = tree_unflatten(self._static, spec)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                new_state, objs = self.block(*static_state)
                new, new_spec = tree_flatten(new_state)
                if new_spec != spec:
                    raise RuntimeError(f"the step changed the structure of its state ({spec} -> {new_spec})")
                _write_back(self._static, new)
        except Exception as error:  # a host sync or an op without graph support in the step or in f
            self.failed = True
            fallback_warning(f"{self.owner}(cuda_graphs=True)", error)
            return
        self.graph = graph
        self._out = (static_state, objs)


def _write_back(static: List[Any], new: List[Any]) -> None:
    """Copy each new leaf into its static buffer, inside the capture. A new leaf that *is* a static buffer
    (a ring buffer written in place, a constant passed through) needs no copy; one that shares storage with
    a static buffer is cloned first, so no copy reads a buffer an earlier copy already overwrote."""
    storages = {t.untyped_storage().data_ptr() for t in static if isinstance(t, Tensor)}
    sources: List[Optional[Tensor]] = []
    for dst, src in zip(static, new):
        if not isinstance(dst, Tensor) or src is dst:
            sources.append(None)
        elif src.untyped_storage().data_ptr() in storages:
            sources.append(src.clone())
        else:
            sources.append(src)
    for dst, src in zip(static, sources):
        if src is not None:
            dst.copy_(src)


__all__ = ["CapturedBlock"]
