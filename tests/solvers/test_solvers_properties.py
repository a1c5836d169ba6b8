"""Property-based tests over shapes, dtypes, algorithms, modes and tolerances (hypothesis).

The suite profile (tests/conftest.py) bounds every property to 25 derandomized examples.
"""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deqlab_solvers_helpers import DISCRETE, TanhMap, continuous, discrete, flat

from deqlab.solvers import TERMINATION_MODES, DiscreteDEQSolver, SolverStatus, TerminationCondition, TerminationTracker

F64, F32 = torch.float64, torch.float32
TOLS = {F64: [1e-3, 1e-6, 1e-9], F32: [1e-2, 1e-3, 1e-4]}
SLACK = {F64: 1e-9, F32: 1e-5}  # recomputing f(z) may differ from the solver's copy by rounding

shapes_st = st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple), min_size=1, max_size=2)


def mode_criterion(mode, z, fz, abstol, reltol, norm, slack, mult=1.0):
    """Per-sample bool: the tolerance test of ``mode`` recomputed from scratch at ``(z, f(z))``.

    A ``converged`` sample meets it with ``mult = 1``; a ``stalled`` one (the patience rule of the
    ``*_deq_*`` modes) with ``mult = 3``.
    """
    du = fz - z
    scale = math.sqrt(du.shape[1]) if norm == "rms" else 1.0
    res = torch.linalg.vector_norm(du, dim=1) / scale
    fz_norm = torch.linalg.vector_norm(fz, dim=1) / scale
    abs_ok = res <= mult * abstol * (1 + slack) + slack
    rel_ok = res <= mult * reltol * fz_norm * (1 + slack) + slack
    if mode == "abs":
        return du.abs().amax(dim=1) <= abstol * (1 + slack) + slack
    if mode == "rel":
        return (du.abs() <= reltol * z.abs() * (1 + slack) + slack).all(dim=1)
    if mode == "norm":
        return abs_ok & rel_ok
    return abs_ok if mode.startswith("abs") else rel_ok


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from([F64, F32]))
    shapes = draw(shapes_st)
    as_list = len(shapes) > 1 or draw(st.booleans())
    batch = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    f = TanhMap(batch, shapes, as_list=as_list, norm=0.6, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    return f, dtype


def _check_like(z, z0):
    if isinstance(z0, list):
        assert isinstance(z, list) and [t.shape for t in z] == [t.shape for t in z0]
        assert all(t.dtype == s.dtype for t, s in zip(z, z0))
    else:
        assert z.shape == z0.shape and z.dtype == z0.dtype


@settings(max_examples=25, deadline=None)
@given(
    prob=problems(),
    name=st.sampled_from(DISCRETE),
    mode=st.sampled_from(["abs", "abs_norm", "rel_norm", "norm", "abs_deq_default", "rel_deq_best"]),
    norm=st.sampled_from(["l2", "rms"]),
    tol_idx=st.integers(0, 2),
    start=st.floats(-3, 3),
)
def test_contraction_converges_within_tolerance(prob, name, mode, norm, tol_idx, start):
    f, dtype = prob
    tol = TOLS[dtype][tol_idx]
    z0 = f.unflat(torch.full((f.batch, sum(f.sizes)), start, dtype=dtype))
    res = discrete(name, tol, max_steps=200, mode=mode, norm=norm)(f, z0)
    _check_like(res.z, z0)
    _check_like(res.fz, z0)
    assert res.status is SolverStatus.CONVERGED, (res.status, res.abs_residual)
    z, fz = flat(res.z), flat(f(res.z))
    assert mode_criterion(mode, z, fz, tol, tol, norm, SLACK[dtype]).all()
    assert res.abs_residual.shape == res.converged.shape == res.sample_steps.shape == (f.batch,)
    assert res.nfe >= res.steps + 1 and int(res.sample_steps.max()) == res.steps


@settings(max_examples=25, deadline=None)
@given(
    prob=problems(),
    name=st.sampled_from(DISCRETE),
    mode=st.sampled_from(TERMINATION_MODES),
    norm=st.sampled_from(["l2", "rms"]),
    abstol=st.floats(1e-6, 1.0),
    reltol=st.floats(1e-6, 1.0),
    max_steps=st.integers(0, 8),
    spread=st.floats(0.0, 5.0),
)
def test_converged_mask_implies_the_mode_tolerance(prob, name, mode, norm, abstol, reltol, max_steps, spread):
    # Few steps and starts at different distances: some samples converge, some do not. Whatever
    # happens, a sample flagged converged meets its mode's test at the returned iterate.
    f, dtype = prob
    g = torch.Generator().manual_seed(max_steps)
    z0 = f.unflat(spread * torch.randn(f.batch, sum(f.sizes), generator=g, dtype=F64).to(dtype))
    cond = TerminationCondition(mode, abstol=abstol, reltol=reltol, norm=norm)
    res = DiscreteDEQSolver(name, termination=cond, max_steps=max_steps)(f, z0)
    _check_like(res.z, z0)
    assert res.steps <= max_steps
    z, fz = flat(res.z), flat(f(res.z))
    ok = mode_criterion(mode, z, fz, abstol, reltol, norm, SLACK[dtype])
    assert (ok | ~res.converged).all()
    assert (res.status is SolverStatus.CONVERGED) == bool(res.converged.all())
    # a stalled sample (patience rule, *_deq_* modes only) is within 3x the tolerance and never converged
    near = mode_criterion(mode, z, fz, abstol, reltol, norm, SLACK[dtype], mult=3.0)
    assert (near | ~res.stalled).all() and not (res.stalled & res.converged).any()
    assert "_deq_" in mode or not res.stalled.any()
    assert torch.isfinite(z).all()


@settings(max_examples=10, deadline=None)
@given(prob=problems(), method=st.sampled_from(["tsit5", "dopri5", "rk4"]), tol_idx=st.integers(0, 1))
def test_continuous_contraction_converges_within_tolerance(prob, method, tol_idx):
    f, dtype = prob
    tol = TOLS[dtype][tol_idx]
    z0 = f.zeros()
    res = continuous(method, tol=tol, ode_tol=tol / 100, max_steps=3000)(f, z0)
    _check_like(res.z, z0)
    assert res.status is SolverStatus.CONVERGED
    z, fz = flat(res.z), flat(f(res.z))
    # The FSAL residual is evaluated at the stage point, which equals the returned state up to rounding.
    assert mode_criterion("abs_norm", z, fz, tol, tol, "l2", 1e-6 if dtype == F32 else 1e-9).all()
    assert res.t.shape == (f.batch,) and res.t.dtype == dtype


@settings(max_examples=25, deadline=None)
@given(
    objs=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=40), mode=st.sampled_from(["abs_deq_best", "rel_deq_best"])
)
def test_best_mode_returns_the_argmin(objs, mode):
    # The tolerance is below every objective and the patience rule is off, so the sequence runs to its
    # end unless the protective break fires (growth >= 2e3 x objective_0 for N = 2).
    cond = TerminationCondition(mode, abstol=1e-6, reltol=1e-6, patience=1000)
    tr = TerminationTracker(cond, 1, 2, device="cpu", dtype=F64)
    zs = []
    stopped_at = None
    for k, o in enumerate(objs):
        z = torch.tensor([[0.0 if mode.startswith("abs") else 1.0 - o, float(k)]], dtype=F64)
        du = torch.tensor([[o, 0.0]], dtype=F64)
        zs.append(z)
        if tr.update(z, du):
            stopped_at = k
            break
    seen = objs[: (stopped_at + 1 if stopped_at is not None else len(objs))]
    if stopped_at is not None:
        assert bool(tr.diverged.all())  # the tolerance is unreachable: only the protective break stops
    true_obj = [float(cond.evaluate(z, torch.tensor([[o, 0.0]], dtype=F64))[0]) for z, o in zip(zs, seen)]
    best = min(range(len(true_obj)), key=lambda i: (true_obj[i], i))  # first of equal minima
    assert torch.equal(tr.finish(None, None)[0], zs[best])
