"""Property test (issue 8): over random adversarial maps, a reported status is always true.

Maps: contractive (a fixed point, attracting), expansive (a repelling fixed point), linear growth and
exponential growth (no fixed point), overflowing (no fixed point, f reaches Inf) and NaN-producing
(the fixed point lies where f is NaN). For every algorithm x termination mode x dtype (float64,
float32, bfloat16), sampled by hypothesis rather than looped:

* a sample flagged ``converged`` meets its mode's tolerance at the returned iterate, recomputed from
  ``f(z)``, up to the dtype's rounding; one flagged ``stalled`` (``*_deq_*`` modes only) meets 3 x it;
* a map without a finite fixed point never has a converged sample;
* ``status`` is ``converged`` exactly when every sample converged (so ``diverged``, ``nonfinite`` and
  ``max_steps`` are never reported for a fully converged solve, nor ``converged`` for a failed one);
* every call stays within its step budget and returns a finite iterate;
* all of this also with ``check_every=3`` (the stop decisions taken on the device).

Tiny states and few steps keep each example in milliseconds (the suite profile runs 25 per test).
"""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from deqlab_solvers_helpers import DISCRETE, FIXED_DT

from deqlab.solvers import TERMINATION_MODES, ContinuousDEQSolver, DiscreteDEQSolver, SolverStatus

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
DTYPES = [F64, F32, BF16]
TOLS = {F64: [1e-3, 1e-6, 1e-9], F32: [1e-2, 1e-3, 1e-4], BF16: [1e-1, 3e-2]}
KINDS = ["contractive", "expansive", "linear_growth", "exponential_growth", "overflow", "nan"]
NO_FIXED_POINT = {"linear_growth", "exponential_growth", "overflow", "nan"}


class AdversarialMap:
    """``f`` on ``(B, N)`` states of one dtype; ``kind`` picks the family, ``seed`` its parameters."""

    def __init__(self, kind: str, batch: int, dim: int, dtype: torch.dtype, seed: int):
        g = torch.Generator().manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
        unif = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g, dtype=F64))  # noqa: E731
        self.kind, self.dtype = kind, dtype
        W = rnd(dim, dim)
        W = W / torch.linalg.matrix_norm(W, ord=2)
        if kind == "contractive":
            self.W, self.b = (unif(0.2, 0.9) * W).to(dtype), rnd(batch, dim).to(dtype)
        elif kind == "expansive":
            self.W, self.b = (unif(1.5, 3.0) * W).to(dtype), rnd(batch, dim).to(dtype)
        elif kind == "linear_growth":
            self.c = (torch.sign(rnd(batch, dim)) * (0.1 + 5 * torch.rand(batch, dim, generator=g, dtype=F64))).to(
                dtype
            )
        elif kind == "nan":
            self.thr = unif(0.5, 1.8)

    def __call__(self, z):
        k = self.kind
        if k == "contractive":
            return torch.tanh(z @ self.W.T + self.b)
        if k == "expansive":
            return z @ self.W.T + self.b
        if k == "linear_growth":
            return z + self.c  # f(z) - z = c != 0 everywhere
        if k == "exponential_growth":
            return 2 * z.abs() + 1  # |f(z) - z| >= 1 everywhere
        if k == "overflow":
            return 1e30 * (1 + z * z)  # f(z) - z > 0 everywhere; Inf once |z| is large (float32: 1e4)
        # f(z) = z/2 + 1 has its fixed point 2 beyond thr, where f is NaN
        out = 0.5 * z + 1
        return torch.where((z > self.thr).any(dim=1, keepdim=True), torch.full_like(out, math.nan), out)


def _slack(dtype, z, fz):
    """Rounding allowance of a recomputed residual: a few ulps of the state's magnitude."""
    eps = torch.finfo(dtype).eps
    return 4 * eps * (z.double().abs().amax(dim=1) + fz.double().abs().amax(dim=1)) + 1e-300


def _criterion(mode, z, fz, abstol, reltol, slack, mult=1.0):
    """Per-sample: the tolerance test of ``mode`` at ``(z, f(z))``, recomputed in float64 (``mult = 3``:
    the patience rule's looser test, met by a ``stalled`` sample)."""
    z, fz = z.double(), fz.double()
    du = fz - z
    res = torch.linalg.vector_norm(du, dim=1)
    fzn = torch.linalg.vector_norm(fz, dim=1)
    n = math.sqrt(du.shape[1])
    abs_ok = res <= mult * abstol + n * slack
    rel_ok = res <= mult * reltol * fzn + n * slack
    if mode == "abs":
        return du.abs().amax(dim=1) <= abstol + slack
    if mode == "rel":
        return (du.abs() <= reltol * z.abs() + slack.unsqueeze(1)).all(dim=1)
    if mode == "norm":
        return abs_ok & rel_ok
    return abs_ok if mode.startswith("abs") else rel_ok


def _check(res, f, mode, tol, max_steps, dtype, kind, nfe_per_step):
    z = res.z
    assert z.dtype == dtype and torch.isfinite(z).all()
    assert 0 <= res.steps <= max_steps and res.nfe <= 2 + nfe_per_step * res.steps
    assert (res.status is SolverStatus.CONVERGED) == bool(res.converged.all())
    if res.status is not SolverStatus.NONFINITE:  # (an overflowing norm is the non-finite case)
        assert torch.isfinite(res.abs_residual).all()
    if kind in NO_FIXED_POINT:
        assert not (res.converged | res.stalled).any(), (kind, res.status, res.abs_residual, z)
    if res.converged.any():
        fz = f(z)
        ok = _criterion(mode, z, fz, tol, tol, _slack(dtype, z, fz))
        assert (ok | ~res.converged).all(), (res.status, res.abs_residual, res.rel_residual)
    if res.stalled.any():
        fz = f(z)
        near = _criterion(mode, z, fz, tol, tol, _slack(dtype, z, fz), mult=3.0)
        assert "_deq_" in mode and (near | ~res.stalled).all(), (res.status, res.abs_residual, res.rel_residual)
    assert not (res.stalled & res.converged).any()
    # the status is the worst outcome: stalled only when every sample converged or stalled
    if res.status is SolverStatus.STALLED:
        assert bool((res.converged | res.stalled).all()) and res.stalled.any()


common = dict(
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from(DTYPES),
    mode=st.sampled_from(TERMINATION_MODES),
    batch=st.integers(1, 3),
    dim=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    tol_idx=st.integers(0, 2),
    start=st.sampled_from([0.0, 0.5, -1.0]),
)


@given(name=st.sampled_from(DISCRETE), max_steps=st.integers(0, 40), check_every=st.sampled_from([1, 1, 3]), **common)
def test_discrete_status_is_true_on_adversarial_maps(
    name, max_steps, check_every, kind, dtype, mode, batch, dim, seed, tol_idx, start
):
    tol = TOLS[dtype][tol_idx % len(TOLS[dtype])]
    f = AdversarialMap(kind, batch, dim, dtype, seed)
    opts = {"krylov_dim": 4} if name == "newton_krylov" else {}
    solver = DiscreteDEQSolver(
        name,
        mode=mode,
        abstol_termination=tol,
        reltol_termination=tol,
        max_steps=max_steps,
        check_every=check_every,
        **opts,
    )
    res = solver(f, torch.full((batch, dim), start, dtype=dtype))
    _check(res, f, mode, tol, max_steps, dtype, kind, nfe_per_step=1 + 4 + 1)


@given(
    method=st.sampled_from(["tsit5", "dopri5", "euler", "rk4"]),
    max_steps=st.integers(0, 60),
    check_every=st.sampled_from([1, 1, 3]),
    **common,
)
def test_continuous_status_is_true_on_adversarial_maps(
    method, max_steps, check_every, kind, dtype, mode, batch, dim, seed, tol_idx, start
):
    tol = TOLS[dtype][tol_idx % len(TOLS[dtype])]
    f = AdversarialMap(kind, batch, dim, dtype, seed)
    solver = ContinuousDEQSolver(
        method,
        mode=mode,
        ode_abstol=tol / 10,
        ode_reltol=tol / 10,
        abstol_termination=tol,
        reltol_termination=tol,
        max_steps=max_steps,
        dt=FIXED_DT.get(method),
        check_every=check_every,
    )
    res = solver(f, torch.full((batch, dim), start, dtype=dtype))
    _check(res, f, mode, tol, max_steps, dtype, kind, nfe_per_step=6)


@given(name=st.sampled_from([*DISCRETE, "tsit5", "euler"]), **common)
def test_maps_without_fixed_point_never_converge(name, kind, dtype, mode, batch, dim, seed, tol_idx, start):
    # The same check focused on the maps that have no fixed point, with a longer budget (z -> z + c in a
    # relative mode would meet the relative test once z is large enough, if the solver let it).
    kind = {"contractive": "linear_growth", "expansive": "exponential_growth"}.get(kind, kind)
    tol = TOLS[dtype][tol_idx % len(TOLS[dtype])]
    f = AdversarialMap(kind, batch, dim, dtype, seed)
    kw = dict(mode=mode, abstol_termination=tol, reltol_termination=tol, max_steps=150)
    if name in DISCRETE:
        solver = DiscreteDEQSolver(name, **kw, **({"krylov_dim": 4} if name == "newton_krylov" else {}))
    else:
        solver = ContinuousDEQSolver(name, dt=FIXED_DT.get(name), **kw)
    res = solver(f, torch.full((batch, dim), start, dtype=dtype))
    _check(res, f, mode, tol, 150, dtype, kind, nfe_per_step=6)


@given(
    method=st.sampled_from(["tsit5", "dopri5"]),
    dtype=st.sampled_from(DTYPES),
    rate=st.floats(1.2, 3.0),
    batch=st.integers(1, 3),
    dim=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    absolute=st.booleans(),
)
def test_continuous_runaway_flows_end_diverged_in_every_dtype(method, dtype, rate, batch, dim, seed, absolute):
    # du/dt = f(u) - u grows exponentially for f(z) = a z + c (a > 1) or a |z| + c: an adaptive
    # continuous solve must end `diverged` within its budget in float32 and bfloat16 as in float64 (it
    # used to end `max_steps` there: the halved steps made the growth unresolvable in the dtype).
    c = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)
    f = (lambda z: rate * z.abs() + c.abs() + 0.1) if absolute else (lambda z: rate * z + c)
    res = ContinuousDEQSolver(method, max_steps=150)(f, torch.zeros(batch, dim, dtype=dtype))
    assert res.status is SolverStatus.DIVERGED, (res.status, res.steps)
    assert res.steps < 150 and torch.isfinite(res.z).all()
