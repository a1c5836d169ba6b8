"""Host syncs per solve: ``ceil(steps / check_every) + 2``, also when samples stop on different steps.

Each device-to-host scalar read (``bool``, ``int``, ``float``, ``item``, ``tolist`` of a tensor) is a
synchronisation on a GPU. Counted here on CPU by patching those conversions, which predicts the GPU's
count; the workload makes samples stop on many different steps, the case that used to cost two syncs per
step.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from deqlab.solvers import DiscreteDEQSolver, PerSampleMap

METHODS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")


@contextlib.contextmanager
def count_syncs():
    counter = {"n": 0}
    saved = {m: getattr(torch.Tensor, m) for m in METHODS}

    def wrap(fn):
        def wrapped(*a, **k):
            counter["n"] += 1
            return fn(*a, **k)

        return wrapped

    for m, fn in saved.items():
        setattr(torch.Tensor, m, wrap(fn))
    try:
        yield counter
    finally:
        for m, fn in saved.items():
            setattr(torch.Tensor, m, fn)


def staggered():
    rate = torch.linspace(0.05, 0.9, 16, dtype=torch.float64).view(16, 1)
    return PerSampleMap(lambda z, r: r * torch.tanh(z) + 1.0, rate), torch.zeros(16, 4, dtype=torch.float64)


@pytest.mark.parametrize("algorithm", ["fixed_point", "anderson", "lbroyden"])
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("mode", ["rel_deq_default", "abs_norm", "rel_norm"])
def test_one_sync_per_check_even_when_samples_stop(algorithm, k, mode):
    f, z0 = staggered()
    solver = DiscreteDEQSolver(
        algorithm, mode=mode, abstol_termination=1e-8, reltol_termination=1e-8, max_steps=300, check_every=k
    )
    with count_syncs() as syncs:
        result = solver(f, z0)
    assert result.all_converged
    assert len(set(result.sample_steps.tolist())) >= 3  # samples stopped on several different steps
    assert syncs["n"] <= math.ceil(result.steps / k) + 2, (syncs["n"], result.steps)
