"""Exact NFE accounting: every call of ``f`` is counted, including line searches, JVPs and rejected
ODE steps."""

import pytest
import torch

from deqlab_solvers_helpers import ADAPTIVE, CONTINUOUS, FIXED_DT, RK_ADAPTIVE, Counted, TanhMap

from deqlab.solvers import ContinuousDEQSolver, DiscreteDEQSolver, SolverStatus, get_solver

F64 = torch.float64


def test_fixed_point_nfe_is_steps_plus_one_at_a_known_crossing():
    # f(z) = z / 2 from ones: max |du_k| = 2^-(k+1); with abstol 1e-3 the first k with 2^-(k+1) <= 1e-3
    # is k = 9 (2^-10 = 9.8e-4 while 2^-9 = 2.0e-3).
    f = Counted(lambda z: 0.5 * z)
    res = DiscreteDEQSolver("fixed_point", mode="abs", abstol_termination=1e-3, max_steps=100)(
        f, torch.ones(2, 5, dtype=F64)
    )
    assert res.status is SolverStatus.CONVERGED
    assert res.steps == 9
    assert res.nfe == 10 == f.calls
    assert res.sample_steps.tolist() == [9, 9]
    torch.testing.assert_close(res.z, torch.full((2, 5), 2.0**-9, dtype=F64), rtol=0, atol=0)


@pytest.mark.parametrize("max_steps", [0, 1, 7])
def test_fixed_point_nfe_at_the_step_cap(max_steps):
    f = Counted(lambda z: z + 1.0)
    res = DiscreteDEQSolver("fixed_point", mode="abs_norm", max_steps=max_steps)(f, torch.zeros(3, 2, dtype=F64))
    assert res.status is SolverStatus.MAX_STEPS
    assert res.steps == max_steps
    assert res.nfe == max_steps + 1 == f.calls
    torch.testing.assert_close(res.z, torch.full((3, 2), float(max_steps), dtype=F64))


# name, options, expected nfe as a function of steps (None: only compare with the counter)
DISCRETE_CASES = [
    ("fixed_point", {}, lambda s: s + 1),
    ("fixed_point", {"damping": 0.5}, lambda s: s + 1),
    ("anderson", {"memory": 3}, lambda s: s + 1),
    ("broyden", {}, lambda s: s + 1),
    ("lbroyden", {"memory": 4}, lambda s: s + 1),
    ("broyden", {"line_search": True}, None),
    ("newton_krylov", {}, None),
    ("newton_krylov", {"jvp": "fd"}, None),
    ("newton_krylov", {"line_search": True, "krylov_dim": 3}, None),
]


@pytest.mark.parametrize(
    "name,opts,formula",
    DISCRETE_CASES,
    ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o, _ in DISCRETE_CASES],
)
def test_counting_wrapper_agrees_with_nfe_discrete(name, opts, formula):
    m = TanhMap(3, [(2, 3)], as_list=False, norm=0.9, generator=torch.Generator().manual_seed(4))
    f = Counted(m)
    res = get_solver(name, mode="abs_norm", abstol_termination=1e-10, max_steps=60, **opts)(f, 3 * m.zeros() + 1)
    assert res.nfe == f.calls
    assert res.nfe >= res.steps + 1
    if formula is not None:
        assert res.nfe == formula(res.steps)
    if name == "newton_krylov":
        assert res.nfe > res.steps + 1  # every JVP counts


def test_line_search_trials_are_counted():
    # A map where the full Broyden step overshoots: the line search must spend extra evaluations.
    f = Counted(lambda z: 2.5 * torch.tanh(z) - 1.5 * z + 0.3)
    res = DiscreteDEQSolver("broyden", line_search=True, mode="abs_norm", abstol_termination=1e-9, max_steps=50)(
        f, torch.full((1, 1), 4.0, dtype=F64)
    )
    assert res.nfe == f.calls
    assert res.nfe > res.steps + 1


@pytest.mark.parametrize("method", CONTINUOUS)
def test_counting_wrapper_agrees_with_nfe_continuous(method):
    m = TanhMap(2, [(4,), (2, 2)], as_list=True, generator=torch.Generator().manual_seed(6))
    f = Counted(m)
    res = ContinuousDEQSolver(
        method,
        mode="abs_norm",
        ode_abstol=1e-6,
        ode_reltol=1e-6,
        abstol_termination=1e-5,
        max_steps=500,
        dt=FIXED_DT.get(method),
    )(f, m.zeros())
    assert res.status is SolverStatus.CONVERGED
    assert res.nfe == f.calls
    # Evaluations per stepper call follow from the method: Euler 1 (f at the new point), RK4 4 (k1 is
    # reused from the previous point), Tsit5/Dopri5 6 (first same as last); adaptive methods without dt
    # spend one more call choosing the first step. VCAB3: 3 per start-up call, then 1 per call in which
    # a step was accepted (exact accounting in test_solvers_vcab3.py).
    extra = 1 if method in ADAPTIVE else 0
    if method == "vcab3":
        after_startup = int(res.accepted_steps.max()) - 2
        assert 1 + extra + 6 + after_startup <= res.nfe <= 1 + extra + 3 * res.steps
        return
    per_step = {"euler": 1, "rk4": 4, "tsit5": 6, "dopri5": 6}[method]
    assert res.nfe == 1 + extra + per_step * res.steps


def _tableau(method):
    from torchdyn.numerics.solvers._constants import construct_dopri5, construct_tsit5

    c, a, _, _ = {"tsit5": construct_tsit5, "dopri5": construct_dopri5}[method](F64)
    return float(c[0]), float(a[1][0]), float(a[1][1])


def _classify_calls(method, inputs, outputs, z_final):
    """Replay the recorded calls of an adaptive 7-stage FSAL stepper on one sample (dt given, so no
    probe call) and decide, independently of the solver, whether each stepper call was accepted.

    Call 0 evaluates u0; each stepper call then makes 6 calls, stage 2 at ``base + c2 h k1`` and stage 3
    at ``base + h (a31 k1 + a32 k2)`` (``k = f(x) - x``), the last one at the candidate new point. A
    hypothesis for a call's base point is right iff, with ``h`` read off stage 2, it predicts stage 3.
    A call was accepted iff the next call starts from its candidate, rejected iff from the same base.
    """
    c2, a31, a32 = _tableau(method)
    k = [o[0] - i[0] for i, o in zip(inputs, outputs)]

    def starts_from(call, base, k1):
        j = 1 + 6 * call  # index of the call's stage-2 evaluation
        x2, x3, k2 = inputs[j][0], inputs[j + 1][0], k[j]
        h = float((x2 - base) @ k1) / (c2 * float(k1 @ k1))
        pred = base + h * (a31 * k1 + a32 * k2)
        # Right hypotheses miss by rounding only (<= 1e-9 relative near convergence), wrong ones by
        # a sizeable fraction of the stage displacement.
        return float((pred - x3).norm()) <= 1e-6 * float((x3 - base).norm())

    n = (len(inputs) - 1) // 6
    assert len(inputs) == 1 + 6 * n
    base, k_base = inputs[0][0], k[0]
    accepted = []
    for g in range(n):
        assert starts_from(g, base, k_base), "a stepper call must start from the current base"
        cand, k_cand = inputs[6 + 6 * g][0], k[6 + 6 * g]
        if g + 1 < n:
            acc, rej = starts_from(g + 1, cand, k_cand), starts_from(g + 1, base, k_base)
            assert acc != rej, "ambiguous step"
        else:
            acc = bool(torch.allclose(z_final[0], cand, rtol=1e-12, atol=1e-12))
        accepted.append(acc)
        if acc:
            base, k_base = cand, k_cand
    return accepted


@pytest.mark.parametrize("method", RK_ADAPTIVE)
def test_continuous_nfe_counts_rejected_steps(method):
    # A huge first step (dt=50) on a fast, nonlinear field: the controller must reject and shrink it
    # several times. The rejected attempts cost 6 evaluations each and must all be in res.nfe.
    W = torch.tensor([[0.3, -0.8, 0.1], [0.7, 0.2, -0.4], [-0.2, 0.5, 0.3]], dtype=F64)
    x = torch.tensor([[0.5, -1.0, 2.0]], dtype=F64)
    f = Counted(lambda z: 4.0 * torch.tanh(z @ W.T + x) - 3.0 * z, record=True)  # du = 4 tanh(.) - 4 z
    res = ContinuousDEQSolver(
        method, mode="abs_norm", ode_abstol=1e-8, ode_reltol=1e-8, abstol_termination=1e-6, max_steps=2000, dt=50.0
    )(f, torch.zeros(1, 3, dtype=F64))
    assert res.status is SolverStatus.CONVERGED
    accepted = _classify_calls(method, f.inputs, f.outputs, res.z)
    n_acc, n_rej = sum(accepted), len(accepted) - sum(accepted)
    assert n_rej >= 2 and not accepted[0]  # the first, huge, step was rejected
    assert res.steps == n_acc + n_rej  # steps counts stepper calls, accepted or rejected
    assert res.nfe == f.calls == 1 + 6 * (n_acc + n_rej)
    assert res.nfe > 6 * n_acc + 1
    # The steps that moved the state add up to the time reached.
    assert float(res.t[0]) > 0


def test_continuous_max_steps_caps_stepper_calls_including_rejections():
    f = Counted(lambda z: 4.0 * torch.tanh(z + 1.0) - 3.0 * z)
    res = ContinuousDEQSolver(
        "tsit5", mode="abs_norm", ode_abstol=1e-10, ode_reltol=1e-10, abstol_termination=1e-12, max_steps=5, dt=1e3
    )(f, torch.zeros(1, 2, dtype=F64))
    assert res.status is SolverStatus.MAX_STEPS
    assert res.steps == 5 and res.nfe == f.calls == 1 + 6 * 5
