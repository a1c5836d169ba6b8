"""Termination modes on hand-built ``(z, du)`` sequences fed straight to ``TerminationTracker``."""

import math

import pytest
import torch

from deqlab.solvers import TERMINATION_MODES, DiscreteDEQSolver, SolverStatus, TerminationCondition, TerminationTracker

F64 = torch.float64


def t(*rows):
    return torch.tensor(rows, dtype=F64)


def vec(x):
    """A per-sample ``(1,)`` value."""
    return torch.tensor([x], dtype=F64)


def feed(cond, pairs):
    """Feed ``(z, du)`` pairs (each ``(B, N)``); return (index of the update that stopped everything or
    None, tracker)."""
    B, N = pairs[0][0].shape
    tr = TerminationTracker(cond, B, N, device="cpu", dtype=F64)
    for i, (z, du) in enumerate(pairs):
        if tr.update(z, du):
            return i, tr
    return None, tr


def scalar_objectives(cond, objs, N=1, z_value=None):
    """A one-sample sequence whose objective is ``objs[k]`` at step ``k`` in both abs and rel modes.

    abs modes: ||du|| = o (du spread evenly over N entries). rel modes: z = 1 - du makes ||du + z|| = 1
    up to rounding, so ||du|| / ||du + z|| = o.
    """
    pairs = []
    for k, o in enumerate(objs):
        du = torch.full((1, N), o / math.sqrt(N), dtype=F64)
        z = (1.0 / math.sqrt(N)) - du if z_value is None else torch.full((1, N), z_value(k), dtype=F64)
        pairs.append((z, du))
    return feed(cond, pairs)


# ---------------------------------------------------------------------------------------------------
# Each plain mode, on a sequence designed so that it stops at a known step while its neighbours differ.
# ---------------------------------------------------------------------------------------------------


def test_abs_is_elementwise_max_not_the_norm():
    # 100 entries of 0.9e-3: max |du| <= 1e-3 (abs stops) but ||du|| = 9e-3 (abs_norm does not).
    z = torch.ones(1, 100, dtype=F64)
    seq = [(z, torch.full((1, 100), 5e-3, dtype=F64)), (z, torch.full((1, 100), 0.9e-3, dtype=F64))]
    assert feed(TerminationCondition("abs", abstol=1e-3), seq)[0] == 1
    assert feed(TerminationCondition("abs_norm", abstol=1e-3), seq)[0] is None
    # One entry above the tolerance is enough to keep going.
    du = torch.full((1, 100), 1e-4, dtype=F64)
    du[0, 57] = 1.1e-3
    assert feed(TerminationCondition("abs", abstol=1e-3), [(z, du)])[0] is None


def test_abs_norm_uses_the_l2_norm():
    z = torch.zeros(1, 2, dtype=F64)
    seq = [(z, t([3e-3, 4e-3])), (z, t([0.6e-3, 0.8e-3])), (z, t([0.5e-3, 0.5e-3]))]
    # norms 5e-3, 1e-3 (exactly the tolerance: stops, the test is <=), 0.7e-3
    assert feed(TerminationCondition("abs_norm", abstol=1e-3 + 1e-15), seq)[0] == 1
    assert feed(TerminationCondition("abs_norm", abstol=0.9e-3), seq)[0] == 2


def test_rel_is_elementwise_against_abs_z():
    # |du| <= 1e-3 |z| must hold entry by entry: the small entry of z (0.05) blocks it at step 0
    # (1e-4 > 5e-5) and lets it stop at step 1 (4e-5 <= 5e-5).
    seq = [(t([1.0, 0.05]), t([1e-4, 1e-4])), (t([1.0, 0.05]), t([1e-4, 4e-5]))]
    assert feed(TerminationCondition("rel", reltol=1e-3), seq)[0] == 1
    assert feed(TerminationCondition("rel", reltol=1e-3), seq[:1])[0] is None
    seq2 = [(t([1.0, 0.5]), t([1e-4, 4e-4]))]
    assert feed(TerminationCondition("rel", reltol=1e-3), seq2)[0] == 0
    # rel_norm only looks at norms: ||du|| = 1.4e-4 <= 1e-3 * ||du + z|| ~ 1e-3 stops at once.
    assert feed(TerminationCondition("rel_norm", reltol=1e-3), seq)[0] == 0


def test_rel_norm_scales_with_f_of_z():
    # ||du|| = 0.5: not small in absolute terms, but 0.5 / ||du + z|| = 0.5 / 1000.5 < 1e-3.
    seq = [(t([1000.0]), t([0.5]))]
    assert feed(TerminationCondition("rel_norm", reltol=1e-3), seq)[0] == 0
    assert feed(TerminationCondition("abs_norm", abstol=1e-3), seq)[0] is None
    seq = [(t([10.0]), t([0.5]))]
    assert feed(TerminationCondition("rel_norm", reltol=1e-3), seq)[0] is None


def test_norm_needs_both_abs_and_rel():
    rel_only = (t([1000.0]), t([0.5]))  # rel 5e-4 ok, abs 0.5 not
    abs_only = (t([0.0]), t([5e-4]))  # abs 5e-4 ok, rel = 1 not
    both = (t([1.0]), t([5e-4]))  # both ok
    cond = TerminationCondition("norm", abstol=1e-3, reltol=1e-3)
    assert feed(cond, [rel_only, abs_only, both])[0] == 2
    assert feed(TerminationCondition("abs_norm", abstol=1e-3), [rel_only, abs_only, both])[0] == 1
    assert feed(TerminationCondition("rel_norm", reltol=1e-3), [rel_only, abs_only, both])[0] == 0


@pytest.mark.parametrize("mode", ["abs_deq_default", "rel_deq_default", "abs_deq_best", "rel_deq_best"])
def test_deq_modes_stop_at_the_tolerance(mode):
    cond = TerminationCondition(mode, abstol=1e-3, reltol=1e-3)
    stop, tr = scalar_objectives(cond, [1.0, 0.1, 0.01, 1.01e-3, 0.99e-3, 1e-4])
    assert stop == 4
    assert tr.converged.all() and tr.status() is SolverStatus.CONVERGED
    assert tr.sample_steps.tolist() == [4]


def test_rel_deq_objective_definition():
    # objective = ||du|| / (||du + z|| + eps): with du = (3, 4), z = (-3, 8): 5 / ||(0, 12)|| = 5/12.
    cond = TerminationCondition("rel_deq_default", reltol=1e-3)
    obj, met, res, rel = cond.evaluate(t([-3.0, 8.0]), t([3.0, 4.0]))
    torch.testing.assert_close(obj, vec(5 / 12))
    torch.testing.assert_close(res, vec(5.0))
    assert not met.any()
    cond_abs = TerminationCondition("abs_deq_default", abstol=1e-3)
    torch.testing.assert_close(cond_abs.evaluate(t([-3.0, 8.0]), t([3.0, 4.0]))[0], vec(5.0))


# ---------------------------------------------------------------------------------------------------
# Patience rule of the *_deq_* modes: objective <= 3 tol after >= 30 objectives, max/min of the last
# 30 below 1.3.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["abs_deq_default", "rel_deq_default", "abs_deq_best", "rel_deq_best"])
def test_patience_rule_fires_when_stalled_below_3_tol(mode):
    cond = TerminationCondition(mode, abstol=1e-3, reltol=1e-3)
    # A constant objective of 2 tol: never meets tol, meets 3 tol, ratio 1 < 1.3.
    stop, tr = scalar_objectives(cond, [2e-3] * 60)
    assert stop == 29  # the 30th objective is the first moment 30 of them exist
    # stopped, but near (2 tol), not within the tolerance: stalled, never converged
    assert tr.stalled.all() and not tr.converged.any() and tr.status() is SolverStatus.STALLED
    # Ratio 1.25 < 1.3: still stalled.
    stop, _ = scalar_objectives(cond, [2e-3, 2.5e-3] * 30)
    assert stop == 29


@pytest.mark.parametrize("mode", ["abs_deq_default", "rel_deq_default"])
def test_patience_rule_needs_small_spread(mode):
    cond = TerminationCondition(mode, abstol=1e-3, reltol=1e-3)
    # max/min = 1.4 >= 1.3: the objective still oscillates, no stop however long.
    stop, tr = scalar_objectives(cond, [2e-3, 2.8e-3] * 40)
    assert stop is None and not tr.converged.any()
    # Just above the factor (1.31) does not stop either; just below (1.29) does.
    stop, _ = scalar_objectives(cond, [2e-3, 2.62e-3] * 40)
    assert stop is None
    stop, _ = scalar_objectives(cond, [2e-3, 2.58e-3] * 40)
    assert stop == 29
    # min_max_factor is configurable.
    stop, _ = scalar_objectives(
        TerminationCondition(mode, abstol=1e-3, reltol=1e-3, min_max_factor=1.5), [2e-3, 2.8e-3] * 40
    )
    assert stop == 29


@pytest.mark.parametrize("mode", ["abs_deq_default", "rel_deq_default"])
def test_patience_rule_needs_objective_below_3_tol(mode):
    cond = TerminationCondition(mode, abstol=1e-3, reltol=1e-3)
    stop, _ = scalar_objectives(cond, [3.1e-3] * 60)
    assert stop is None
    stop, _ = scalar_objectives(cond, [2.9e-3] * 60)
    assert stop == 29


@pytest.mark.parametrize("mode", ["abs_deq_default", "rel_deq_default"])
def test_patience_rule_waits_for_30_objectives(mode):
    cond = TerminationCondition(mode, abstol=1e-3, reltol=1e-3)
    # 29 stalled values are not enough; a large first value keeps the window's spread big until it
    # leaves the window of the last 30.
    stop, _ = scalar_objectives(cond, [2e-3] * 29)
    assert stop is None
    stop, _ = scalar_objectives(cond, [1.0] + [2e-3] * 40)
    assert stop == 30
    # The patience length and factors are configurable.
    stop, _ = scalar_objectives(TerminationCondition(mode, abstol=1e-3, reltol=1e-3, patience=5), [2e-3] * 10)
    assert stop == 4


@pytest.mark.parametrize("mode", ["abs", "abs_norm", "rel", "rel_norm", "norm"])
def test_plain_modes_have_no_patience_rule(mode):
    cond = TerminationCondition(mode, abstol=1e-3, reltol=1e-3)
    stop, _ = scalar_objectives(cond, [2e-3] * 60)
    assert stop is None


# ---------------------------------------------------------------------------------------------------
# Protective break: objective >= 1e3 * N * objective_0 marks the sample diverged (every mode).
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", TERMINATION_MODES)
def test_protective_break(mode):
    # Every entry: du = m, z = 1 - m (so du + z = 1). Every mode's objective is then proportional to m
    # (abs: m, abs_norm/norm/abs_deq: 2 m, rel_norm/rel_deq: m, rel: m / (1 - m) ~ m), and the limit is
    # 1e3 * N * objective_0 = 4000 objective_0 with N = 4 and m_0 = 1e-6.
    N = 4
    cond = TerminationCondition(mode, abstol=1e-9, reltol=1e-9)

    def seq(ms):
        return [(torch.full((1, N), 1.0 - m, dtype=F64), torch.full((1, N), m, dtype=F64)) for m in ms]

    below = [1e-6, 1e-4, 1e-3, 3.9e-3]  # 3900 x objective_0: not yet
    stop, tr = feed(cond, seq(below))
    assert stop is None and not tr.diverged.any()
    stop, tr = feed(cond, seq(below + [4.1e-3]))
    assert stop == 4
    assert tr.diverged.all() and not tr.converged.any()
    assert tr.status() is SolverStatus.DIVERGED
    assert tr.sample_steps.tolist() == [4]
    # A larger threshold lets the same sequence run on.
    loose = TerminationCondition(mode, abstol=1e-9, reltol=1e-9, protective_threshold=1e4)
    assert feed(loose, seq(below + [4.1e-3]))[0] is None


def test_protective_break_inactive_when_objective0_is_zero():
    # A sample starting exactly at its fixed point converges at step 0 and is never flagged.
    cond = TerminationCondition("abs_deq_default", abstol=1e-3)
    stop, tr = feed(cond, [(t([1.0]), t([0.0])), (t([1.0]), t([100.0]))])
    assert stop == 0 and tr.converged.all() and not tr.diverged.any()


# ---------------------------------------------------------------------------------------------------
# *_deq_best: the returned iterate is the one with the lowest objective.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["abs_deq_best", "rel_deq_best"])
def test_best_mode_returns_the_lowest_objective_iterate(mode):
    cond = TerminationCondition(mode, abstol=1e-9, reltol=1e-9)
    objs = [1.0, 0.5, 0.1, 0.03, 0.2, 0.7, 0.9, 0.95]  # minimum at index 3, in the middle
    pairs = []
    for k, o in enumerate(objs):
        du = t([o, 0.0])
        z = t([1.0 - o, float(k)])  # second entry tags the iterate; du + z = (1, k)
        if mode == "abs_deq_best":
            z = t([0.0, float(k)])
        pairs.append((z, du))
    # rel objective is o / ||(1, k)||; recompute the true argmin from the condition itself.
    true_objs = [float(cond.evaluate(z, du)[0]) for z, du in pairs]
    best = min(range(len(objs)), key=lambda i: true_objs[i])
    assert 0 < best < len(objs) - 1
    stop, tr = feed(cond, pairs)
    assert stop is None
    z_ret, du_ret, res, rel = tr.finish(pairs[-1][0], pairs[-1][1])
    assert torch.equal(z_ret, pairs[best][0])
    assert torch.equal(du_ret, pairs[best][1])
    # The default mode returns the last iterate instead.
    dflt = TerminationCondition(mode.replace("best", "default"), abstol=1e-9, reltol=1e-9)
    _, tr2 = feed(dflt, pairs)
    assert torch.equal(tr2.finish(None, None)[0], pairs[-1][0])


def test_best_mode_through_a_solver():
    # Fixed-point iteration on an oscillating map whose residual first shrinks then grows: the best
    # iterate is returned, not the last one.
    seq = iter([2.0, 1.0, 0.25, 0.5, 1.5, 3.0, 5.0, 8.0, 9.0, 9.5, 9.7, 9.8])

    def f(z):
        return z + next(seq)

    z0 = torch.zeros(1, 1, dtype=F64)
    best = DiscreteDEQSolver("fixed_point", mode="abs_deq_best", abstol_termination=1e-6, max_steps=8)(f, z0)
    # iterates z_k = sum of the first k increments; the residual at z_k is increment k (min 0.25 at k=2)
    torch.testing.assert_close(best.z, t([3.0]))
    torch.testing.assert_close(best.abs_residual, vec(0.25))
    torch.testing.assert_close(best.fz, t([3.25]))
    seq = iter([2.0, 1.0, 0.25, 0.5, 1.5, 3.0, 5.0, 8.0, 9.0, 9.5, 9.7, 9.8])
    last = DiscreteDEQSolver("fixed_point", mode="abs_deq_default", abstol_termination=1e-6, max_steps=8)(f, z0)
    torch.testing.assert_close(last.z, t([2.0 + 1.0 + 0.25 + 0.5 + 1.5 + 3.0 + 5.0 + 8.0]))


# ---------------------------------------------------------------------------------------------------
# RMS norm: one tolerance, any state size.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["abs_norm", "abs_deq_default", "norm"])
def test_rms_norm_is_dimension_independent(mode):
    c = 3e-4
    for N in (4, 100_000):
        z = torch.ones(1, N, dtype=F64)
        du = torch.full((1, N), c, dtype=F64)
        rms = TerminationCondition(mode, abstol=c * 1.01, reltol=1.0, norm="rms")
        obj, met, res, rel = rms.evaluate(z, du)
        torch.testing.assert_close(res, vec(c), rtol=1e-12, atol=0)
        assert met.all()
        assert not TerminationCondition(mode, abstol=c * 0.99, reltol=1.0, norm="rms").evaluate(z, du)[1].any()
        # The L2 norm grows with sqrt(N) instead.
        l2 = TerminationCondition(mode, abstol=c * 1.01, reltol=1.0, norm="l2").evaluate(z, du)
        torch.testing.assert_close(l2[2], vec(c * math.sqrt(N)), rtol=1e-12, atol=0)
        assert not l2[1].any()


def test_rms_norm_same_steps_for_any_size():
    # f(z) = z / 2 from ones: du_k = -2^-(k+1) everywhere, rms residual independent of N.
    steps = {}
    for N in (4, 100_000):
        res = DiscreteDEQSolver("fixed_point", mode="abs_norm", abstol_termination=1e-3, norm="rms")(
            lambda z: 0.5 * z, torch.ones(1, N, dtype=F64)
        )
        steps[N] = res.steps
        torch.testing.assert_close(res.abs_residual, vec(2.0 ** -(res.steps + 1)))
    assert steps[4] == steps[100_000] == 9  # 2^-10 <= 1e-3 < 2^-9
    l2 = DiscreteDEQSolver("fixed_point", mode="abs_norm", abstol_termination=1e-3, norm="l2")(
        lambda z: 0.5 * z, torch.ones(1, 100_000, dtype=F64)
    )
    assert l2.steps > steps[100_000]


def test_condition_validation():
    with pytest.raises(ValueError, match="unknown termination mode"):
        TerminationCondition("abs_deq_worst")
    with pytest.raises(ValueError, match="norm"):
        TerminationCondition("abs", norm="l1")
    for bad in (-1e-3, math.nan, math.inf):
        with pytest.raises(ValueError):
            TerminationCondition("abs", abstol=bad)
        with pytest.raises(ValueError):
            TerminationCondition("rel", reltol=bad)
    with pytest.raises(ValueError):
        TerminationCondition("abs_deq_default", patience=0)
    assert TerminationCondition("abs_deq_best").returns_best
    assert not TerminationCondition("abs_deq_default").returns_best
    assert TerminationCondition("rel_deq_default").tol == TerminationCondition("rel", reltol=1e-3).reltol
