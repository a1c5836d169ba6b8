"""``TerminationCondition(batch_wide=True)``: the reference package's batch-wide stop rule.

The reference checked ``||du|| <= reltol ||du + u||`` with norms over the entire ``(B, N)`` batch, so
every sample stopped together. Each test here failed on the code before (no ``batch_wide`` field or
keyword: a ``TypeError``).
"""

import math

import pytest
import torch

from deqlab_solvers_helpers import CONTINUOUS, DISCRETE, FIXED_DT, AffineMap, ode_tol

from deqlab.solvers import (
    TERMINATION_MODES,
    DiscreteDEQSolver,
    PerSampleMap,
    SolverError,
    SolverStatus,
    TerminationCondition,
    TerminationTracker,
    get_solver,
)

F64 = torch.float64
SOLVERS = [*DISCRETE, *(f"continuous_{m}" for m in CONTINUOUS)]


def _solver(name, max_steps=300, **kw):
    method = name.split("_", 1)[1] if name.startswith("continuous") else None
    if method in FIXED_DT:
        kw["dt"] = FIXED_DT[method]
    if method is not None:  # VCAB3 at the termination tolerance (see ode_tol)
        tol = ode_tol(method, 1e-8, kw.get("reltol_termination", kw.get("abstol_termination", 1e-8)))
        kw.setdefault("ode_abstol", tol)
        kw.setdefault("ode_reltol", tol)
    return get_solver(name, max_steps=max_steps, **kw)


def _batch_rel(z, fz):
    """The reference's objective: ``||f(z) - z|| / ||f(z)||`` over the whole batch tensor."""
    return float(torch.linalg.vector_norm(fz - z) / torch.linalg.vector_norm(fz))


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("mode", ["rel_norm", "abs_norm", "rel_deq_default", "abs", "rel", "norm"])
def test_one_sample_batch_wide_is_the_per_sample_rule(name, mode):
    f = AffineMap(1, 5, norm=0.8, generator=torch.Generator().manual_seed(3))
    z0 = torch.zeros(1, 5, dtype=F64)
    per = _solver(name, mode=mode, abstol_termination=1e-6, reltol_termination=1e-6)(f, z0)
    whole = _solver(name, mode=mode, abstol_termination=1e-6, reltol_termination=1e-6, batch_wide=True)(f, z0)
    assert whole.status is per.status and whole.steps == per.steps and whole.nfe == per.nfe
    assert torch.equal(whole.z, per.z) and torch.equal(whole.abs_residual, per.abs_residual)
    assert torch.equal(whole.converged, per.converged) and torch.equal(whole.sample_steps, per.sample_steps)


@pytest.mark.parametrize("name", SOLVERS)
def test_a_far_sample_keeps_the_whole_batch_running(name):
    # Sample 0 contracts fast (a = 0.5), sample 1 slowly (a = 0.95): per sample, sample 0 stops long before
    # sample 1; batch-wide every sample stops at the same step, when the batch's test holds.
    a = torch.tensor([[0.5], [0.95]], dtype=F64)
    f = lambda z: a * z + 1  # noqa: E731
    z0 = torch.zeros(2, 3, dtype=F64)
    per = _solver(name, mode="rel_norm", reltol_termination=1e-6, max_steps=1000)(f, z0)
    whole = _solver(name, mode="rel_norm", reltol_termination=1e-6, max_steps=1000, batch_wide=True)(f, z0)
    assert per.all_converged and whole.all_converged
    if name not in ("broyden", "lbroyden", "newton_krylov", "anderson"):  # (those solve z = a z + 1 at once)
        assert int(per.sample_steps[0]) < int(per.sample_steps[1])
    assert whole.sample_steps.tolist() == [whole.steps, whole.steps]
    # the reference's test holds for the batch at the returned iterate ...
    assert _batch_rel(whole.z, f(whole.z)) <= 1e-6 * (1 + 1e-9)
    # ... and every sample reports its own residual
    torch.testing.assert_close(whole.abs_residual, torch.linalg.vector_norm(f(whole.z) - whole.z, dim=1))


def test_a_sample_converges_when_the_batch_test_holds_even_above_its_own_tolerance():
    # Sample 0 is large and fast (z* ~ 1.1e6), sample 1 small and slow (z* = 10): the batch norm is
    # dominated by sample 0, so the
    # batch-wide relative test holds while sample 1's own relative residual is still far above 1e-6. That
    # is the reference's semantics; the per-sample residuals say so.
    a, b = torch.tensor([[0.1], [0.9]], dtype=F64), torch.tensor([[1e6], [1.0]], dtype=F64)
    f = lambda z: a * z + b  # noqa: E731
    res = DiscreteDEQSolver("fixed_point", mode="rel_norm", reltol_termination=1e-6, max_steps=200, batch_wide=True)(
        f, torch.zeros(2, 4, dtype=F64)
    )
    assert res.status is SolverStatus.CONVERGED and res.converged.tolist() == [True, True]
    assert _batch_rel(res.z, f(res.z)) <= 1e-6
    assert float(res.rel_residual[1]) > 1e-3  # honest per-sample record: sample 1 alone is not within 1e-6
    per = DiscreteDEQSolver("fixed_point", mode="rel_norm", reltol_termination=1e-6, max_steps=200)(
        f, torch.zeros(2, 4, dtype=F64)
    )
    assert float(per.rel_residual[1]) <= 1e-6 and per.sample_steps[1] > res.steps


@pytest.mark.parametrize("name", ["fixed_point", "continuous_euler", "continuous_tsit5"])
def test_batch_wide_failures_are_honest_and_shared(name):
    # One sample without a fixed point makes the batch fail: no sample is converged, one status for all,
    # and the returned iterate is finite.
    cases = {
        "diverged": (lambda z: torch.cat([0.5 * z[:1] + 1, 2 * z[1:] + 1]), {SolverStatus.DIVERGED}),
        "nonfinite": (lambda z: torch.cat([0.5 * z[:1] + 1, z[1:] + math.nan]), {SolverStatus.NONFINITE}),
        "no fixed point": (
            lambda z: torch.cat([0.5 * z[:1] + 1, z[1:] + 1]),
            {SolverStatus.MAX_STEPS, SolverStatus.DIVERGED},
        ),
    }
    for case, (f, statuses) in cases.items():
        res = _solver(name, mode="rel_deq_default", reltol_termination=1e-6, batch_wide=True)(
            f, torch.zeros(2, 3, dtype=F64)
        )
        assert res.status in statuses, (case, res.status)
        assert not res.converged.any() and not res.stalled.any(), case
        assert res.sample_steps[0] == res.sample_steps[1], case
        assert torch.isfinite(res.z).all(), case


def test_batch_wide_patience_stalls_the_whole_batch_together():
    a = torch.tensor([[0.995], [0.99]], dtype=F64)
    res = DiscreteDEQSolver(
        "fixed_point", mode="rel_deq_default", reltol_termination=1e-3, max_steps=1000, batch_wide=True
    )(lambda z: a * z + 1, torch.zeros(2, 3, dtype=F64))
    assert res.status is SolverStatus.STALLED and res.stalled.tolist() == [True, True]
    assert not res.converged.any() and res.sample_steps[0] == res.sample_steps[1] == res.steps


@pytest.mark.parametrize("mode", TERMINATION_MODES)
@pytest.mark.parametrize("norm", ["l2", "rms"])
def test_the_batch_objective_is_the_norm_of_the_whole_tensor(mode, norm):
    g = torch.Generator().manual_seed(0)
    z, du = torch.randn(3, 4, generator=g, dtype=F64), 1e-2 * torch.randn(3, 4, generator=g, dtype=F64)
    cond = TerminationCondition(mode, abstol=0.05, reltol=0.05, norm=norm, batch_wide=True)
    obj, met, res, rel = cond.evaluate(z, du)
    scale = math.sqrt(z.numel()) if norm == "rms" else 1.0
    r, fzn = torch.linalg.vector_norm(du) / scale, torch.linalg.vector_norm(z + du) / scale
    expected = {"abs": du.abs().max(), "rel": (du.abs() / z.abs()).max(), "norm": r}.get(
        mode, r if mode.startswith("abs") else r / fzn
    )
    torch.testing.assert_close(obj, expected.expand(3))
    assert met.unique().numel() == 1  # one verdict for the batch
    # the per-sample residuals stay per sample
    torch.testing.assert_close(res, torch.linalg.vector_norm(du, dim=1) / (2.0 if norm == "rms" else 1.0))


def test_check_every_and_per_sample_exit_keep_the_batch_wide_result():
    affine = AffineMap(4, 6, norm=0.9, generator=torch.Generator().manual_seed(1))
    f = PerSampleMap(lambda z, A, b: torch.bmm(A, z.unsqueeze(2)).squeeze(2) + b, affine.A, affine.b)
    z0 = torch.zeros(4, 6, dtype=F64)
    ref = DiscreteDEQSolver("anderson", mode="rel_norm", reltol_termination=1e-8, batch_wide=True)(f, z0)
    for kw in ({"check_every": 3}, {"per_sample_exit": True}):
        other = DiscreteDEQSolver("anderson", mode="rel_norm", reltol_termination=1e-8, batch_wide=True, **kw)(f, z0)
        assert torch.equal(other.z, ref.z) and torch.equal(other.sample_steps, ref.sample_steps)
        assert other.status is ref.status


def test_the_flat_keyword_and_the_condition_object():
    solver = DiscreteDEQSolver("anderson", batch_wide=True)
    assert solver.termination.batch_wide and "batch_wide=True" in repr(solver)
    assert "batch_wide" not in repr(DiscreteDEQSolver("anderson"))
    assert get_solver("continuous", batch_wide=True).termination.batch_wide
    with pytest.raises(ValueError, match="batch_wide"):
        DiscreteDEQSolver(termination=TerminationCondition(), batch_wide=True)
    with pytest.raises(ValueError, match="batch_wide"):
        TerminationCondition(batch_wide="yes")
    with pytest.raises(SolverError):
        DiscreteDEQSolver("fixed_point", mode="abs_norm", max_steps=3, batch_wide=True, throw=True)(
            lambda z: z + 1, torch.zeros(2, 2)
        )


def test_tracker_stops_every_sample_at_once():
    cond = TerminationCondition("abs_norm", abstol=1e-3, batch_wide=True)
    tracker = TerminationTracker(cond, batch=2, numel=1, device="cpu", dtype=F64)
    z = torch.zeros(2, 1, dtype=F64)
    assert not tracker.update(z, torch.tensor([[1e-4], [1e-2]], dtype=F64))  # batch norm 1e-2: go on
    assert tracker.active.all()
    assert tracker.update(z, torch.tensor([[1e-4], [5e-4]], dtype=F64))  # batch norm 5.1e-4: stop
    assert tracker.converged.all() and tracker.sample_steps.tolist() == [1, 1]
