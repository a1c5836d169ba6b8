"""``deqlab.instrument`` in the DEQ layer: the forward and the implicit backward report their regions, nested
where the breakdown tables expect them, in the thread that ran the forward; off, nothing reads the clock.

Why: ``benchmarks/backward.py`` and ``benchmarks/train_step.py`` split the backward into the graph of f at
z*, the adjoint VJPs, the adjoint solver's own work and the parameter VJP from these regions alone.
"""

from __future__ import annotations

import threading

import pytest
import torch

from deqlab_nn_helpers import DenseMap, make_solver

import deqlab.instrument as instrument
from deqlab.instrument import REGIONS
from deqlab.nn import DEQ, ImplicitBackward, JacobianFreeBackward, SkipDEQ

FORWARD = {
    "deq.forward",
    "deq.init",
    "solver",
    "solver.setup",
    "f",
    "termination",
    "algorithm.init",
    "algorithm.step",
    "solver.result",
}
BACKWARD = {"deq.backward", "adjoint.linearize", "adjoint.solve", "adjoint.vjp", "adjoint.vjp_inputs"}


def _layer(backward, solver="anderson", seed=0):
    torch.manual_seed(seed)
    return DEQ(DenseMap(5, 3).double(), make_solver(solver, tol=1e-8), backward=backward, z_shape=(5,))


def _step(deq, seed=1):
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    z, sol = deq(x)
    z.square().sum().backward()
    return x.grad, sol


def _calls_within(rec, name: str, within: str) -> int:
    return sum(n for path, n in rec.counts.items() if path[-1] == name and within in path[:-1])


@pytest.mark.parametrize("adjoint", ["gmres", "anderson"])
def test_forward_and_implicit_backward_report_their_regions(adjoint):
    grad_plain, _ = _step(_layer(ImplicitBackward(adjoint, tol=1e-10, max_steps=40)))
    deq = _layer(ImplicitBackward(adjoint, tol=1e-10, max_steps=40))
    with instrument.record() as rec:
        grad, sol = _step(deq)
    calls = rec.calls()
    assert FORWARD | BACKWARD <= set(calls) <= set(REGIONS)
    assert calls["deq.forward"] == calls["deq.backward"] == calls["adjoint.solve"] == 1
    assert _calls_within(rec, "f", "deq.forward") == sol.nfe
    # every VJP of the backward is either an adjoint product or the final parameter VJP
    assert calls["adjoint.vjp"] + calls["adjoint.vjp_inputs"] == sol.backward_nfe
    assert _calls_within(rec, "adjoint.vjp", "adjoint.solve") == calls["adjoint.vjp"]
    if adjoint == "anderson":  # a fixed-point adjoint runs a solver inside the adjoint solve
        assert _calls_within(rec, "solver", "adjoint.solve") == 1
        solve_own = rec.seconds("adjoint.solve", excluding=["adjoint.vjp"])
        assert solve_own >= rec.seconds("termination", within="adjoint.solve")
    assert torch.equal(grad, grad_plain)  # recording changes no gradient


def test_jacobian_free_backward_reports_the_linearization_and_one_vjp():
    deq = _layer(JacobianFreeBackward())
    with instrument.record() as rec:
        _step(deq)
    calls = rec.calls()
    assert calls["adjoint.linearize"] == calls["adjoint.vjp_inputs"] == 1
    assert "adjoint.solve" not in calls and "adjoint.vjp" not in calls


def test_a_skip_layer_times_its_shortcut_as_the_initial_guess():
    torch.manual_seed(0)
    deq = SkipDEQ(DenseMap(5, 3).double(), make_solver("anderson"), torch.nn.Linear(3, 5).double())
    with instrument.record() as rec:
        deq(torch.randn(4, 3, dtype=torch.float64))
    assert rec.counts[("deq.forward", "deq.init")] == 1


def test_a_backward_in_another_thread_reports_to_the_forward_threads_recording():
    # autograd runs a CUDA backward in its device thread; here a thread calls backward() on CPU
    deq = _layer(ImplicitBackward("gmres", tol=1e-10))
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    with instrument.record() as rec:
        z, sol = deq(x)
        t = threading.Thread(target=lambda: z.sum().backward())
        t.start()
        t.join()
    assert x.grad is not None
    assert BACKWARD <= set(rec.calls())
    assert rec.counts[("deq.backward", "adjoint.solve", "adjoint.vjp")] == rec.calls()["adjoint.vjp"]


def test_a_forward_in_another_thread_is_not_recorded():
    deq = _layer(ImplicitBackward("gmres"))
    with instrument.record() as rec:
        t = threading.Thread(target=lambda: _step(deq))
        t.start()
        t.join()
    assert rec.calls() == {}


class _NoClock:
    @staticmethod
    def perf_counter():
        raise AssertionError("the clock was read although nothing records")


@pytest.mark.parametrize(
    "backward",
    [ImplicitBackward("gmres"), ImplicitBackward("anderson"), JacobianFreeBackward()],
    ids=["gmres", "anderson", "jfb"],
)
def test_an_unrecorded_forward_and_backward_never_read_the_clock(monkeypatch, backward):
    monkeypatch.setattr(instrument, "time", _NoClock)
    grad, sol = _step(_layer(backward))
    assert grad is not None and sol.backward_nfe >= 1


@pytest.mark.parametrize("solver", ["anderson", "tsit5"])
def test_a_recorded_step_leaves_no_reference_cycles(solver):
    # a cycle through a timed bound method would keep the tracker's iterates or the backward's graph of f
    # alive until the garbage collector runs
    import gc

    deq = _layer(ImplicitBackward("anderson", tol=1e-6, max_steps=40), solver=solver)
    _step(deq)
    gc.collect()
    gc.disable()
    try:
        _step(deq)
        unrecorded = gc.collect()  # whatever else the suite leaves behind per step (0 when run alone)
        with instrument.record():
            _step(deq)
        assert gc.collect() <= unrecorded
    finally:
        gc.enable()
