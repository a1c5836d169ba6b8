"""DEQ layers with per-sample early exit: the layer's map evaluates sub-batches exactly (injection rows and
per-sample dropout masks), refuses maps that couple samples, and gives the full-batch solve's z* and
gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deqlab.nn import (
    DeepEquilibriumNetwork,
    MultiScaleDeepEquilibriumNetwork,
    SkipDeepEquilibriumNetwork,
    VariationalHiddenDropout,
)
from deqlab.solvers import DiscreteDEQSolver


class HeterogeneousMap(nn.Module):
    """``f(z, x) = drop(tanh(x_0 * W z)) + x``: the first input column sets each sample's contraction."""

    def __init__(self, width=12, p=0.0):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.drop = VariationalHiddenDropout(p)

    def forward(self, z, x):
        return self.drop(torch.tanh(x[:, :1] * self.lin(z))) + 0.5 * x


def inputs(batch=20, width=12):
    x = torch.randn(batch, width, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x[:, 0] = torch.linspace(0.05, 1.2, batch, dtype=torch.float64)  # rate 0.05 .. 1.2 (times ||W||)
    return x


def solver(per_sample_exit):
    return DiscreteDEQSolver(
        "lbroyden", max_steps=80, abstol_termination=1e-10, reltol_termination=1e-10, per_sample_exit=per_sample_exit
    )


def run(layer, x, seed=1):
    torch.manual_seed(seed)  # the same dropout masks in both runs
    x = x.clone().requires_grad_()
    z, solution = layer(x)
    (z * torch.linspace(-1, 1, z.shape[1], dtype=z.dtype)).square().sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    return z.detach(), grads, solution


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_z_star_and_gradients_match_the_full_batch_solve(p):
    torch.manual_seed(0)
    model = HeterogeneousMap(p=p).double().train()
    x = inputs()
    z_full, g_full, s_full = run(DeepEquilibriumNetwork(model, solver(False)), x)
    z_part, g_part, s_part = run(DeepEquilibriumNetwork(model, solver(True)), x)
    torch.testing.assert_close(z_part, z_full, rtol=0, atol=1e-12)
    for a, b in zip(g_part, g_full):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert torch.equal(s_part.converged, s_full.converged) and s_part.nfe == s_full.nfe
    assert s_part.solver_result.sample_weighted_nfe < 0.9 * s_full.solver_result.sample_weighted_nfe


def test_dropout_masks_follow_their_samples_into_sub_batches():
    # with a fresh mask drawn per sub-batch (what a plain VariationalHiddenDropout does when the batch
    # size changes) the iteration would chase a different map after the first exit
    torch.manual_seed(0)
    model = HeterogeneousMap(p=0.5).double().train()
    x = inputs()
    z_part, _, s = run(DeepEquilibriumNetwork(model, solver(True)), x)
    assert s.solver_result.sample_weighted_nfe < s.nfe  # sub-batches were evaluated
    torch.manual_seed(1)
    with torch.no_grad():
        layer = DeepEquilibriumNetwork(model, solver(False))
        z_full, _ = layer(x)
    torch.testing.assert_close(z_part, z_full, rtol=0, atol=1e-12)


def test_skip_deq_and_multiscale_layers_exit_per_sample():
    torch.manual_seed(0)
    model = HeterogeneousMap().double()
    x = inputs()
    shortcut = nn.Linear(12, 12).double()
    skip = SkipDeepEquilibriumNetwork(model, solver(True), shortcut)
    z, s = skip(x)
    ref, _ = SkipDeepEquilibriumNetwork(model, solver(False), shortcut)(x)
    torch.testing.assert_close(z, ref, rtol=0, atol=1e-12)

    class Scale0(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)

        def forward(self, z, x):
            return torch.tanh(x[:, :1] * self.lin(z)) + x[:, :6]

    def mdeq(per_sample_exit):
        torch.manual_seed(0)
        return MultiScaleDeepEquilibriumNetwork(
            [Scale0(), nn.Tanh()],
            [[None, nn.Linear(6, 3)], [nn.Linear(3, 6), None]],
            None,
            solver(per_sample_exit),
            scales=[(6,), (3,)],
        ).double()

    z_part, s_part = mdeq(True)(x)
    z_full, _ = mdeq(False)(x)
    for a, b in zip(z_part, z_full):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert s_part.solver_result.sample_weighted_nfe < s_part.nfe


class BatchNormMap(nn.Module):
    def __init__(self, track_running_stats=True):
        super().__init__()
        self.lin = nn.Linear(12, 12)
        self.norm = nn.BatchNorm1d(12, track_running_stats=track_running_stats)

    def forward(self, z, x):
        return 0.5 * torch.tanh(self.norm(self.lin(z))) + x


def test_batchnorm_with_batch_statistics_is_refused_before_any_solve_and_allowed_in_eval():
    layer = DeepEquilibriumNetwork(BatchNormMap().double(), solver(True))
    x = inputs()
    with pytest.raises(ValueError, match=r"BatchNorm1d 'norm' normalises with batch statistics.*GroupNorm"):
        layer(x)
    layer.eval()  # running statistics: per sample
    z, s = layer(x)
    assert s.status == "converged"
    always_batch = DeepEquilibriumNetwork(BatchNormMap(track_running_stats=False).double().eval(), solver(True))
    with pytest.raises(ValueError, match="batch statistics"):
        always_batch(x)
