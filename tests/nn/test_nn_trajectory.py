"""Trajectory sampling (``sample_states`` / ``sample_at``) and the fixed-point correction loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deqlab.nn import DeepEquilibriumNetwork, correction_weights, fixed_point_correction_loss
from deqlab.nn.trajectory import sample_steps
from deqlab.solvers import DiscreteDEQSolver, record_iterates


class Tanh(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.lin = nn.Linear(width, width).double()
        with torch.no_grad():
            self.lin.weight.mul_(0.4)

    def forward(self, z, x):
        return torch.tanh(self.lin(z)) + x


def _solver(**kw):
    kw.setdefault("max_steps", 40)
    return DiscreteDEQSolver("fixed_point", mode="abs_norm", abstol_termination=1e-12, **kw)


@pytest.mark.parametrize("tau,grad_steps", [(1.0, 1), (0.5, 2)])
def test_sampled_state_gradients_match_unrolled_oracle(tau, grad_steps):
    torch.manual_seed(0)
    model = Tanh()
    deq = DeepEquilibriumNetwork(
        model, _solver(max_steps=60), sample_at=[0, 2, 5], sample_grad=grad_steps, sample_tau=tau
    )
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    probes = [torch.randn(3, 4, dtype=torch.float64) for _ in range(4)]
    _, sol = deq(x)
    assert len(sol.states) == 4
    loss = sum((p * s).sum() for p, s in zip(probes, sol.states))
    params = [x, *model.parameters()]
    got = torch.autograd.grad(loss, params)

    # the oracle: plain iterates (no graph) at the sampled steps, the same damped steps by hand with
    # autograd, and z* as 200 unrolled applications of f (whose gradient converges to the implicit one)
    xs = x.detach().clone().requires_grad_()
    oracle_states = []
    z = torch.zeros_like(xs)
    with torch.no_grad():
        iterates = {}
        for i in range(6):
            iterates[i] = z.clone()
            z = model(z, xs)
    for i in (0, 2, 5):
        s = iterates[i]
        for _ in range(grad_steps):
            s = (1 - tau) * s + tau * model(s, xs)
        oracle_states.append(s)
    z = torch.zeros_like(xs)
    for _ in range(200):
        z = model(z, xs)
    oracle_states.append(z)
    for a, b in zip(sol.states, oracle_states):
        torch.testing.assert_close(a, b.detach(), atol=1e-9, rtol=1e-9)
    oracle_loss = sum((p * s).sum() for p, s in zip(probes, oracle_states))
    want = torch.autograd.grad(oracle_loss, [xs, *model.parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-8, rtol=1e-7)


def test_sample_states_spacing_and_nfe():
    assert sample_steps(3, 30) == [10, 20] and sample_steps(3, 50) == [18, 34] and sample_steps(1, 9) == []
    assert sample_steps(100, 4) == [1, 2, 3]  # never more states than steps
    torch.manual_seed(1)
    deq = DeepEquilibriumNetwork(Tanh(), _solver(max_steps=30), sample_states=3, on_unconverged="ignore")
    _, sol = deq(torch.randn(2, 4, dtype=torch.float64))
    assert len(sol.states) == 3 and sol.solver_result.iterate_steps == [10, 20]
    assert sol.nfe == sol.solver_result.nfe + 2  # one phantom step per intermediate state
    assert sol.states[-1] is sol.z_star


@pytest.mark.parametrize("per_sample_exit", [False, True])
def test_early_converging_samples_still_give_k_states(per_sample_exit):
    class Half(nn.Module):
        def forward(self, z, x):
            return 0.5 * z + x

    x = torch.tensor([[0.0, 0.0], [1.0, -2.0], [3.0, 0.5]], dtype=torch.float64)  # sample 0 starts at z*
    solver = DiscreteDEQSolver(
        "fixed_point",
        mode="abs_norm",
        abstol_termination=1e-6,
        max_steps=60,
        per_sample_exit=per_sample_exit,
        compact_below=1.0,
    )
    deq = DeepEquilibriumNetwork(Half(), solver, sample_at=[0, 3, 40, 59])
    z, sol = deq(x)
    steps = sol.solver_result.sample_steps
    assert int(steps[0]) == 0 and int(steps.max()) < 40  # every sample stopped before step 40
    assert len(sol.states) == 5 and all(s.shape == x.shape for s in sol.states)
    its = sol.solver_result.iterates
    for late in its[2:]:  # after a sample stopped: its returned iterate
        torch.testing.assert_close(late, sol.solver_result.z)
    torch.testing.assert_close(its[0][0], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(its[1][0], sol.solver_result.z[0])  # sample 0 stopped at step 0
    torch.testing.assert_close(its[1][1:], 2 * x[1:] * (1 - 0.5**3))  # the others: z_3 = 2x(1 - 2^-3)


def test_record_iterates_only_first_solve_and_plain_solver():
    solver = _solver(max_steps=10)
    with record_iterates([1]):
        first = solver(lambda z: 0.5 * z + 1, torch.zeros(1, 1, dtype=torch.float64))
        second = solver(lambda z: 0.5 * z + 1, torch.zeros(1, 1, dtype=torch.float64))
    assert first.iterate_steps == [1] and float(first.iterates[0]) == 1.0 and second.iterates is None
    with pytest.raises(ValueError, match="ints >= 0"):
        with record_iterates([-1]):
            pass


def test_fixed_depth_states_are_the_unrolled_iterates():
    torch.manual_seed(2)
    model = Tanh()
    deq = DeepEquilibriumNetwork(model, _solver(), sample_states=3)
    x = torch.randn(2, 4, dtype=torch.float64)
    with deq.fixed_depth_mode(6):
        z, sol = deq(x)
    want, zz = [], torch.zeros_like(x)
    for i in range(7):
        if i in (2, 4, 6):
            want.append(zz)
        zz = model(zz, x)
    for a, b in zip(sol.states, want):
        torch.testing.assert_close(a, b)
    assert sol.states[0].requires_grad


def test_layer_without_sampling_has_no_states_and_errors():
    _, sol = DeepEquilibriumNetwork(Tanh(), _solver())(torch.randn(2, 4, dtype=torch.float64))
    assert sol.states is None
    with pytest.raises(ValueError, match="sample_states and sample_at"):
        DeepEquilibriumNetwork(Tanh(), _solver(), sample_states=2, sample_at=[1])
    for bad in (
        dict(sample_states=0),
        dict(sample_at=[3, 1]),
        dict(sample_states=2, sample_grad=0),
        dict(sample_states=2, sample_tau=0.0),
    ):
        with pytest.raises(ValueError):
            DeepEquilibriumNetwork(Tanh(), _solver(), **bad)

    def plain(f, z0):  # a callable solver that keeps no iterates
        return dataclasses.replace(_solver()(f, z0), iterates=None, iterate_steps=None)

    deq = DeepEquilibriumNetwork(Tanh(), plain, sample_at=[1])
    with pytest.raises(TypeError, match="records its iterates"):
        deq(torch.randn(2, 4, dtype=torch.float64))


def test_correction_loss_weights_exactly():
    assert correction_weights(4, "exp", 0.8) == [0.8**3, 0.8**2, 0.8, 1.0]
    assert correction_weights(4, "linear") == [0.25, 0.5, 0.75, 1.0]
    assert correction_weights(3, "const") == [1.0, 1.0, 1.0]
    states = [torch.full((2,), float(v), dtype=torch.float64) for v in (3.0, 2.0, 1.5, 1.0)]
    target = torch.ones(2, dtype=torch.float64)
    parts = [(v - 1.0) ** 2 for v in (3.0, 2.0, 1.5, 1.0)]
    for kind, gamma in (("exp", 0.8), ("exp", 0.5), ("linear", 0.8), ("const", 0.8)):
        loss, got = fixed_point_correction_loss(F.mse_loss, states, target, kind, gamma, return_parts=True)
        want = sum(w * p for w, p in zip(correction_weights(4, kind, gamma), parts))
        assert float(loss) == pytest.approx(want, abs=1e-12)
        assert [float(p) for p in got] == pytest.approx(parts)
    with pytest.raises(ValueError, match="weight must be"):
        fixed_point_correction_loss(F.mse_loss, states, target, "cosine")
    with pytest.raises(ValueError, match="gamma"):
        fixed_point_correction_loss(F.mse_loss, states, target, "exp", 1.5)
    with pytest.raises(ValueError, match="at least one"):
        fixed_point_correction_loss(F.mse_loss, [], target)


def test_correction_loss_takes_a_weight_per_state():
    # a schedule of the user's own (torchdeq's "linear" weights go through here): w_i * criterion(s_i)
    states = [torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([3.0])]
    loss, parts = fixed_point_correction_loss(
        F.mse_loss, states, torch.tensor([3.0]), [0.5, 2.0, 7.0], return_parts=True
    )  # fmt: skip
    assert [float(p) for p in parts] == [9.0, 4.0, 0.0]
    assert float(loss) == 0.5 * 9.0 + 2.0 * 4.0
    with pytest.raises(ValueError, match="2 weights for 3 states"):
        fixed_point_correction_loss(F.mse_loss, states, torch.tensor([3.0]), [1.0, 1.0])
