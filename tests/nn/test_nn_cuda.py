"""Device-agnostic code: the layers on CUDA (skipped without a GPU)."""

import pytest
import torch
from torch import nn

from deqlab_nn_helpers import ALL_SOLVERS, make_solver

from deqlab.nn import (
    DEQ,
    Downsample,
    MultiScaleDeepEquilibriumNetwork,
    MultiScaleNeuralODE,
    PostFuse,
    ResidualBlock,
    SkipDEQ,
    Upsample,
    VariationalHiddenDropout,
    WeightNorm,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class WNConvMap(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = WeightNorm(nn.Conv2d(4, 4, 3, padding=1))
        self.drop = VariationalHiddenDropout(0.2)
        self.x = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.c.weight_g.mul_(0.3)

    def forward(self, z, x):
        return torch.tanh(self.drop(self.c(z)) + self.x(x))


@pytest.mark.parametrize("kind", ["deq", "skip", "skipreg"])
@pytest.mark.parametrize("solver_name", ALL_SOLVERS)
def test_cuda_layers(solver_name, kind):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = WNConvMap()
    solver = make_solver(solver_name, tol=1e-4, max_steps=200)
    if kind == "deq":
        layer = DEQ(model, solver, z_shape=(4, 8, 8), jacobian_regularization=True)
    else:
        layer = SkipDEQ(model, solver, nn.Conv2d(3, 4, 3, padding=1) if kind == "skip" else None, z_shape=(4, 8, 8))
    layer = layer.to(dev)
    x = torch.randn(2, 3, 8, 8, device=dev, requires_grad=True)
    z, sol = layer(x)
    assert z.device.type == "cuda" and sol.abs_residual.device.type == "cuda"
    assert float(sol.abs_residual.max()) < 1e-3
    (z.pow(2).mean() + sol.skip_loss + sol.jacobian_loss).backward()
    assert torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.device.type == "cuda" and torch.isfinite(p.grad).all(), name
    with layer.fixed_depth_mode(10):
        _, sol10 = layer(x)
    assert sol10.nfe == 10


def test_cuda_multiscale_and_neural_ode():
    torch.manual_seed(1)
    dev = torch.device("cuda")
    C = 8

    def pieces():
        return (
            [ResidualBlock(C, 2, 4, dropout=0.1), ResidualBlock(C, 2, 4)],
            [[None, Downsample(C, C)], [Upsample(C, C), None]],
            [PostFuse(C), PostFuse(C)],
        )

    x = torch.randn(2, C, 8, 8, device=dev, requires_grad=True)
    for solver_name in ("lbroyden", "tsit5"):
        m = MultiScaleDeepEquilibriumNetwork(
            *pieces(), make_solver(solver_name, tol=1e-2, max_steps=30), [(C, 8, 8), (C, 4, 4)]
        ).to(dev)
        zs, sol = m(x)
        sum(z.mean() for z in zs).backward()
        assert all(p.grad is not None for p in m.parameters())
    node = MultiScaleNeuralODE(*pieces(), "tsit5", [(C, 8, 8), (C, 4, 4)]).to(dev)
    us, sol = node(x)
    sum(u.mean() for u in us).backward()
    assert sol.nfe > 0 and all(u.device.type == "cuda" for u in us)
