"""Building blocks: weight norm computed once per DEQ forward, variational dropout fixed per solve."""

import torch
from torch import nn

from deqlab_nn_helpers import make_solver

from deqlab.nn import (
    DEQ,
    DenseDEQBlock,
    Downsample,
    MultiScaleDeepEquilibriumNetwork,
    PostFuse,
    ResidualBlock,
    Upsample,
    VariationalHiddenDropout,
    WeightNorm,
)


def test_weight_norm_computed_once_per_forward():
    torch.manual_seed(0)
    lin = WeightNorm(nn.Linear(4, 4))
    calls = [0]
    orig = lin.compute_weight

    def counting():
        calls[0] += 1
        return orig()

    lin.compute_weight = counting

    class Map(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, z, x):
            return torch.tanh(0.3 * self.lin(z) + x)

    deq = DEQ(Map(), make_solver("fixed_point", tol=1e-6))
    z, sol = deq(torch.randn(2, 4))
    assert sol.nfe > 5 and calls[0] == 1
    z.sum().backward()
    assert calls[0] == 1  # the backward re-uses the forward's normalised weight
    assert lin.weight_g.grad is not None and lin.weight_v.grad is not None
    assert lin._cache is None  # no stale cache after the forward
    # outside a DEQ it is an ordinary layer
    y = lin(torch.randn(3, 4))
    assert calls[0] == 2 and y.shape == (3, 4)
    w = lin.weight_g * lin.weight_v / lin.weight_v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(lin(torch.eye(4)), torch.eye(4) @ w.T + lin.module.bias)


def test_variational_dropout_mask_fixed_per_forward_and_off_in_eval():
    torch.manual_seed(1)
    drop = VariationalHiddenDropout(0.5)
    masks = []

    class Map(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = drop

        def forward(self, z, x):
            out = self.drop(torch.ones_like(z))
            masks.append(out.clone())
            return 0.5 * z + x * out

    deq = DEQ(Map(), make_solver("fixed_point", tol=1e-8, max_steps=200))
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    _, sol = deq(x)
    assert sol.status == "converged"
    assert all(torch.equal(m, masks[0]) for m in masks)
    assert masks[0].dtype == torch.float64 and masks[0].device == x.device
    assert masks[0].shape == x.shape and torch.equal(masks[0], masks[0][:, :, :1, :1].expand_as(masks[0]))
    first = masks[0]
    masks.clear()
    deq(x)
    assert not torch.equal(masks[0], first)  # a new mask per forward
    deq.eval()
    masks.clear()
    deq(x)
    assert all(bool((m == 1).all()) for m in masks)


def test_residual_block_and_mdeq_pieces_build_a_multiscale_deq():
    torch.manual_seed(2)
    c1, c2 = 8, 8
    main = [ResidualBlock(c1, expansion=2, num_groups=4, dropout=0.1), ResidualBlock(c2, expansion=2, num_groups=4)]
    mapping = [[None, Downsample(c1, c2, 2)], [Upsample(c2, c1, 2), None]]
    post = [PostFuse(c1), PostFuse(c2)]
    deq = MultiScaleDeepEquilibriumNetwork(
        main, mapping, post, make_solver("anderson", tol=1e-2, max_steps=30), [(c1, 8, 8), (c2, 4, 4)]
    )
    x = torch.randn(2, c1, 8, 8)
    z, sol = deq(x)
    assert [tuple(t.shape) for t in z] == [(2, c1, 8, 8), (2, c2, 4, 4)]
    (z[0].mean() + z[1].mean()).backward()
    for name, p in deq.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_dense_block():
    blk = DenseDEQBlock(4, 3)
    out = blk(torch.randn(2, 4), torch.randn(2, 3))
    assert out.shape == (2, 4) and (out >= 0).all()
    assert blk.w_z.bias is None and blk.w_x.bias is None
