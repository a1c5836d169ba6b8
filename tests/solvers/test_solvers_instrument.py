"""``deqlab.instrument``: the recording's bookkeeping, and the regions every solver reports to it.

Why: the benchmarks' breakdown tables read these regions instead of patching private methods, so a solver
that stops reporting a region (or reports it twice, or nests it wrongly) must fail here, not in a table
nobody reads; and the hook must cost nothing when off, so an unrecorded solve must not even read the clock.
"""

from __future__ import annotations

import threading

import pytest
import torch

from deqlab_solvers_helpers import CONTINUOUS, DISCRETE, FIXED_DT

import deqlab.instrument as instrument
from deqlab.instrument import REGIONS, Recording
from deqlab.solvers import ContinuousDEQSolver, DiscreteDEQSolver, PerSampleMap

DISCRETE_REGIONS = {"solver", "solver.setup", "f", "termination", "algorithm.init", "algorithm.step", "solver.result"}
CONTINUOUS_REGIONS = {"solver", "solver.setup", "f", "termination", "stepper.init", "stepper.step", "solver.result"}


def _map(dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    W = W * (0.6 / torch.linalg.matrix_norm(W, ord=2))
    b = torch.randn(4, dim, generator=g, dtype=torch.float64)
    return lambda z: torch.tanh(z @ W.T + b), torch.zeros(4, dim, dtype=torch.float64)


def _continuous(method: str) -> ContinuousDEQSolver:
    return ContinuousDEQSolver(method, mode="abs_norm", abstol_termination=1e-6, max_steps=300, dt=FIXED_DT.get(method))


# ------------------------------------------------------------------------------------------- the recording


def test_exclusive_times_add_up_to_the_total_and_inclusive_times_nest():
    rec = Recording()
    with rec.region("a"):
        for _ in range(2):
            with rec.region("b"):
                with rec.region("c"):
                    sum(range(1000))
        with rec.region("c"):
            sum(range(1000))
    ex, inc = rec.exclusive(), rec.inclusive()
    assert sum(ex.values()) == pytest.approx(rec.total, rel=1e-12)
    assert inc["a"] == pytest.approx(rec.total, rel=1e-12)
    assert inc["b"] == pytest.approx(ex["b"] + rec.seconds("c", within="b"), rel=1e-12)
    assert rec.calls() == {"a": 1, "b": 2, "c": 3}
    assert rec.counts[("a", "b", "c")] == 2 and rec.counts[("a", "c")] == 1
    assert rec.seconds("a", excluding=["b"]) == pytest.approx(ex["a"] + rec.paths[("a", "c")], rel=1e-12)


def test_a_region_nested_in_itself_is_counted_once_inclusively():
    rec = Recording()
    with rec.region("solver"):
        with rec.region("solver"):
            sum(range(1000))
    assert rec.inclusive()["solver"] == pytest.approx(rec.total, rel=1e-12)
    assert rec.calls() == {"solver": 2}


def test_an_exception_closes_the_regions_it_skipped():
    rec = Recording()
    boom = rec.wrap("inner", lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        with rec.region("outer"):
            rec.begin("left open")
            boom()
    assert rec.calls() == {"outer": 1, "left open": 1, "inner": 1}
    assert rec._stack == []
    with instrument.record() as rec2:
        rec2.begin("never ended")
    assert rec2.calls() == {"never ended": 1} and rec2._stack == []


def test_record_is_per_thread_and_nested_blocks_restore_the_outer_one():
    assert instrument.current() is None
    f, z0 = _map()
    solver = DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-8)
    seen = []

    def other_thread():
        seen.append(instrument.current())
        solver(f, z0)  # not counted: the recording belongs to the main thread

    with instrument.record() as outer:
        with instrument.record() as inner:
            assert instrument.current() is inner
            solver(f, z0)
        assert instrument.current() is outer
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert instrument.current() is None
    assert seen == [None]
    assert inner.calls()["solver"] == 1 and outer.calls() == {}


def test_bad_arguments_say_what_to_pass():
    with pytest.raises(TypeError, match="non-empty string"):
        instrument.region("")
    with pytest.raises(TypeError, match="True, False or a device"):
        Recording(sync=3)
    with pytest.raises(ValueError, match="cannot synchronise"):
        Recording(sync="meta")


def test_sync_true_never_initialises_cuda_and_sync_false_never_synchronises(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(a))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    f, z0 = _map()
    with instrument.record(sync=True):
        DiscreteDEQSolver("anderson")(f, z0)
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with instrument.record(sync=False):
        DiscreteDEQSolver("anderson")(f, z0)
    assert calls == []
    with instrument.record(sync=True) as rec:
        DiscreteDEQSolver("anderson")(f, z0)
    assert len(calls) == 2 * sum(rec.calls().values())  # one sync at each boundary of each region


# ----------------------------------------------------------------------------------------- zero cost off


class _NoClock:
    @staticmethod
    def perf_counter():
        raise AssertionError("the clock was read although nothing records")


@pytest.mark.parametrize("kind", ["anderson", "newton_krylov", "tsit5", "vcab3", "euler"])
def test_an_unrecorded_solve_never_reads_the_clock_or_wraps_anything(monkeypatch, kind):
    monkeypatch.setattr(instrument, "time", _NoClock)
    f, z0 = _map()
    solver = DiscreteDEQSolver(kind) if kind in DISCRETE else _continuous(kind)
    assert solver(f, z0).nfe > 1

    def step(s, z, fz, g, F):
        return None

    assert instrument.wrap("algorithm.step", step) is step  # what the loops call: the function itself


# ------------------------------------------------------------------------------------- solver regions


@pytest.mark.parametrize("algorithm", DISCRETE)
def test_every_discrete_algorithm_reports_its_regions(algorithm):
    f, z0 = _map()
    solver = DiscreteDEQSolver(algorithm, mode="abs_norm", abstol_termination=1e-8, max_steps=60)
    plain = solver(f, z0)
    with instrument.record() as rec:
        res = solver(f, z0)
    calls = rec.calls()
    assert set(calls) == DISCRETE_REGIONS
    assert calls["f"] == res.nfe  # Newton-Krylov's JVPs go through the counted map too
    assert calls["algorithm.step"] == res.steps and calls["termination"] == res.steps + 1
    assert calls["solver"] == calls["solver.setup"] == calls["algorithm.init"] == calls["solver.result"] == 1
    assert torch.equal(res.z, plain.z)  # recording changes no result
    assert rec.seconds("solver") == pytest.approx(rec.total, rel=1e-12)  # everything nested in the call
    assert set(calls) <= set(REGIONS)


@pytest.mark.parametrize("method", CONTINUOUS)
def test_every_continuous_method_reports_its_regions(method):
    f, z0 = _map()
    solver = _continuous(method)
    plain = solver(f, z0)
    with instrument.record() as rec:
        res = solver(f, z0)
    calls = rec.calls()
    assert set(calls) == CONTINUOUS_REGIONS
    assert calls["f"] == res.nfe and calls["stepper.step"] == res.steps
    assert calls["termination"] == res.steps + 1
    # the termination test of a step runs inside that step's region
    assert rec.counts[("solver", "stepper.step", "termination")] == res.steps
    assert torch.equal(res.z, plain.z)
    assert set(calls) <= set(REGIONS)


def test_per_sample_exit_keeps_timing_the_restricted_map():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 8, generator=g, dtype=torch.float64)
    W = W / torch.linalg.matrix_norm(W, ord=2)
    rate = torch.linspace(0.1, 0.9, 16, dtype=torch.float64).unsqueeze(1)
    x = torch.randn(16, 8, generator=g, dtype=torch.float64)
    f = PerSampleMap(lambda z, r, x: r * torch.tanh(z @ W.T) + x, rate, x)
    solver = DiscreteDEQSolver(
        "anderson", mode="abs_norm", abstol_termination=1e-9, per_sample_exit=True, compact_below=1.0, max_steps=100
    )
    with instrument.record() as rec:
        res = solver(f, torch.zeros(16, 8, dtype=torch.float64))
    assert res.sample_weighted_nfe < res.nfe  # the batch did shrink
    assert rec.calls()["f"] == res.nfe


def test_every_example_in_the_module_runs():
    # tests/test_docstrings.py runs the examples of public names, not of their methods; these are the API
    import doctest

    result = doctest.testmod(instrument, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 20 and result.failed == 0


def test_every_region_is_documented_in_the_performance_guide():
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[2] / "docs" / "performance.md").read_text(encoding="utf-8")
    assert [name for name in REGIONS if f"`{name}`" not in guide] == []
