"""A train-mode BatchNorm inside a DEQ map records its running statistics once per training forward, at z*.

Old: every evaluation of the map updated them (one per solver evaluation, plus the Skip Reg. guess, the
Jacobian loss and every re-evaluation of the backward), silently: 16 updates in the first training forward
below, 302 in the multiscale layer's, 7 in a fixed-depth forward of depth 6. Each test here failed on the
code before (the counts; checked with git stash of deqlab/).
"""

import pytest
import torch
from torch import nn

from deqlab.nn import (
    DEQ,
    ImplicitBackward,
    JacobianFreeBackward,
    MultiScaleDeepEquilibriumNetwork,
    MultiScaleNeuralODE,
    PhantomGradient,
    SkipDEQ,
)
from deqlab.nn.running_stats import frozen_running_stats, updating_batch_norms
from deqlab.solvers import DiscreteDEQSolver, SolverError


class BNMap(nn.Module):
    """``f(z, x) = tanh(0.2 BN(W z) + x)``; records the BatchNorm's input of every call."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(d)
        self.inputs = []

    def forward(self, z, x):
        h = self.lin(z)
        self.inputs.append(h.detach().clone())
        return torch.tanh(0.2 * self.bn(h) + x)


def _solver():
    return DiscreteDEQSolver("fixed_point", mode="abs_norm", abstol_termination=1e-7, max_steps=300)


BACKWARDS = {"implicit": ImplicitBackward, "jfb": JacobianFreeBackward, "phantom": PhantomGradient}


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("layer", ["deq", "skip_reg", "jacobian"])
def test_one_running_stats_update_per_training_forward(layer, backward):
    torch.manual_seed(0)
    f = BNMap()
    kw = dict(backward=BACKWARDS[backward]())
    deq = (
        SkipDEQ(f, _solver(), **kw)
        if layer == "skip_reg"
        else DEQ(f, _solver(), jacobian_regularization=layer == "jacobian", **kw)
    ).train()
    for step in range(1, 4):
        x = torch.randn(8, 6, requires_grad=True)
        z, sol = deq(x)
        assert int(f.bn.num_batches_tracked) == step  # old: sol.nfe (+1 Skip Reg., +1 Jacobian) per forward
        loss = z.square().sum() + sol.jacobian_loss + sol.skip_loss
        loss.backward()
        assert int(f.bn.num_batches_tracked) == step  # old: +1 (implicit, JFB) or +5 (phantom) per backward
        assert sol.nfe > 5 and f.bn.track_running_stats


def test_the_update_is_the_batch_statistics_at_z_star_and_the_solve_uses_batch_statistics():
    torch.manual_seed(0)
    f = BNMap()
    deq = DEQ(f, _solver()).train()
    x = torch.randn(8, 6)
    with torch.no_grad():
        z, sol = deq(x)
    assert sol.status == "converged"
    # the last evaluation is the update at z*: running = (1 - m) * 0 + m * batch mean at z*
    h_star = f.inputs[-1]
    torch.testing.assert_close(h_star, f.lin(z), rtol=0, atol=0)
    m = f.bn.momentum
    torch.testing.assert_close(f.bn.running_mean, m * h_star.mean(0))
    torch.testing.assert_close(f.bn.running_var, (1 - m) * torch.ones(6) + m * h_star.var(0, unbiased=True))
    # during the solve the map normalised with the batch's statistics: z* is a fixed point of the train-mode
    # map (the frozen call updates nothing), not of the map with the running statistics
    with torch.no_grad(), frozen_running_stats([f]):
        assert float((f(z, x) - z).norm(dim=1).max()) < 1e-6
    with torch.no_grad():
        f.eval()
        assert float((f(z, x) - z).norm(dim=1).max()) > 1e-2


def test_eval_mode_and_fixed_depth_mode():
    torch.manual_seed(0)
    f = BNMap()
    deq = DEQ(f, _solver())
    with torch.no_grad():
        deq.eval()(torch.randn(8, 6))
    assert int(f.bn.num_batches_tracked) == 0  # eval mode: running statistics are read, never written
    deq.train()
    with deq.fixed_depth_mode(6):
        z, sol = deq(torch.randn(8, 6, requires_grad=True))
        z.sum().backward()
    assert sol.nfe == 6 and int(f.bn.num_batches_tracked) == 1  # old: 7 (six steps and the residual's)


def test_multiscale_layers_update_once_too():
    torch.manual_seed(0)

    class Main(nn.Module):
        def __init__(self, d, inject):
            super().__init__()
            self.lin, self.bn, self.inject = nn.Linear(d, d), nn.BatchNorm1d(d), inject

        def forward(self, z, x=None):
            return torch.tanh(0.2 * self.bn(self.lin(z)) + (x if self.inject else 0))

    mains = [Main(4, True), Main(3, False)]
    mdeq = MultiScaleDeepEquilibriumNetwork(
        mains, [[None, nn.Linear(4, 3)], [None, None]], None, _solver(), scales=[(4,), (3,)]
    ).train()
    zs, sol = mdeq(torch.randn(8, 4, requires_grad=True))
    sum(z.sum() for z in zs).backward()
    assert [int(m.bn.num_batches_tracked) for m in mains] == [1, 1]
    node = MultiScaleNeuralODE(
        [Main(4, True), Main(3, False)], [[None, nn.Linear(4, 3)], [None, None]], None, "rk4", [(4,), (3,)], dt=0.25
    ).train()
    us, sol = node(torch.randn(8, 4, requires_grad=True))
    sum(u.sum() for u in us).backward()
    assert sol.nfe == 16  # 4 RK4 steps
    assert [int(m.bn.num_batches_tracked) for m in node.model.main_layers] == [1, 1]  # old: 17 each


def test_tracking_is_restored_when_the_forward_raises():
    torch.manual_seed(0)
    f = BNMap()
    deq = DEQ(
        f,
        DiscreteDEQSolver("fixed_point", mode="abs_norm", abstol_termination=1e-12, max_steps=2),
        on_unconverged="raise",
    ).train()
    with pytest.raises(SolverError):
        deq(torch.randn(8, 6))
    assert f.bn.track_running_stats and updating_batch_norms([f]) == [f.bn]


def test_frozen_blocks_nest():
    bn = nn.BatchNorm1d(2)
    with frozen_running_stats([bn]) as outer:
        with frozen_running_stats([bn]) as inner:
            assert outer == inner == [bn]
        assert not bn.track_running_stats  # the outer block still holds it
        bn(torch.randn(4, 2))
    assert bn.track_running_stats and int(bn.num_batches_tracked) == 0
    untracked = nn.BatchNorm1d(2, track_running_stats=False)
    with frozen_running_stats([untracked]) as held:
        assert held == []
    assert not untracked.track_running_stats


def test_the_helpers_examples_run():
    import doctest

    import deqlab.nn.running_stats as module

    assert doctest.testmod(module).failed == 0
