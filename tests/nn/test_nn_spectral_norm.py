"""SpectralNorm: σ(w) = target after the forward's update, one update per DEQ forward whatever the NFE,
gradients (gradcheck, float64), conv weights; apply_norm wraps the right layers."""

import pytest
import torch
from torch import nn

from deqlab_nn_helpers import make_solver

from deqlab.nn import DEQ, ImplicitBackward, SpectralNorm, WeightNorm, apply_norm


def _gapped(n_out, n_in, top=3.0, seed=0):
    """A weight with a clear gap between its two largest singular values (power iteration converges fast)."""
    gen = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(n_out, n_out, dtype=torch.float64, generator=gen))
    q2, _ = torch.linalg.qr(torch.randn(n_in, n_in, dtype=torch.float64, generator=gen))
    s = torch.linspace(top, 0.1, min(n_out, n_in), dtype=torch.float64)
    s[1:] = s[1:] * 0.5
    return q1[:, : len(s)] @ torch.diag(s) @ q2[:, : len(s)].T


def _linear(weight):
    lin = nn.Linear(weight.shape[1], weight.shape[0]).double()
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


@pytest.mark.parametrize(
    "target,clamp,want", [(1.0, False, 1.0), (0.7, False, 0.7), (5.0, True, 3.0), (0.5, True, 0.5)]
)
def test_largest_singular_value_is_the_target(target, clamp, want):
    sn = SpectralNorm(_linear(_gapped(6, 5)), target=target, clamp=clamp)
    sn(torch.randn(2, 5, dtype=torch.float64))  # one training-mode forward: one update
    sigma = torch.linalg.matrix_norm(sn.compute_weight().detach(), ord=2)
    assert abs(float(sigma) - want) < 1e-8


def test_learned_scale_and_conv_weights():
    sn = SpectralNorm(_linear(_gapped(4, 4)), target=0.9, learn_scale=True)
    with torch.no_grad():
        sn.scale.fill_(0.5)
    assert abs(float(torch.linalg.matrix_norm(sn.compute_weight().detach(), ord=2)) - 0.45) < 1e-8
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    sc = SpectralNorm(conv, target=0.8, init_iterations=500)
    y = sc(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    assert y.shape == (2, 4, 5, 5)
    mat = sc.compute_weight().detach().reshape(4, -1)  # the 2-D reshape, as torch's spectral_norm
    assert abs(float(torch.linalg.matrix_norm(mat, ord=2)) - 0.8) < 1e-6


class _Map(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = SpectralNorm(_linear(_gapped(5, 5, top=2.0)), target=0.9)

    def forward(self, z, x):
        return torch.tanh(self.lin(z)) + x


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_one_update_per_deq_forward_whatever_the_nfe(solver):
    model = _Map()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    before = model.lin.num_updates
    for tol in (1e-3, 1e-10):
        deq = DEQ(
            model, make_solver(solver, tol=tol, max_steps=300), backward=ImplicitBackward(tol=1e-10, max_steps=30)
        )
        z, sol = deq(x)
        assert sol.nfe > 2
        z.sum().backward()  # the backward re-evaluates f: no update either
    assert model.lin.num_updates == before + 2
    model.eval()
    DEQ(model, make_solver(solver))(x)
    assert model.lin.num_updates == before + 2  # eval mode: no update
    assert model.lin.weight_orig.grad is not None


def test_implicit_gradient_matches_autograd_through_the_normalisation():
    # the weight computed once per forward is routed through the implicit backward: the gradient of
    # weight_orig equals the chain rule through the DEQ's gradient w.r.t. the normalised weight
    torch.manual_seed(0)
    model = _Map()
    model.eval()
    x = torch.randn(3, 5, dtype=torch.float64)
    deq = DEQ(
        model, make_solver("anderson", tol=1e-12, max_steps=300), backward=ImplicitBackward(tol=1e-12, max_steps=50)
    )
    z, _ = deq(x)
    (z**2).sum().backward()
    got = model.lin.weight_orig.grad.clone()

    def loss(w_orig):
        w = model.lin.normalised(w_orig)
        zz = z.detach()
        for _ in range(200):  # the fixed point for the given weight
            zz = torch.tanh(zz @ w.T + model.lin.module.bias) + x
        return (zz**2).sum()

    want = torch.autograd.functional.jacobian(loss, model.lin.weight_orig.detach())
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_gradcheck_of_the_normalised_weight():
    for clamp, learn in ((False, False), (True, False), (False, True)):
        sn = SpectralNorm(
            _linear(_gapped(4, 3)), target=0.8 if not clamp else 10.0, clamp=clamp, learn_scale=learn
        ).eval()
        w = sn.weight_orig.detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(sn.normalised, (w,))
        x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(sn, (x,))


def test_apply_norm_wraps_the_right_modules():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(2, 2, 3, padding=1)
            self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
            self.gn = nn.GroupNorm(1, 2)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(8, 3))

    net = apply_norm(Block(), "spectral_norm", filter_out=["conv2", "head.1"], target=0.5)
    assert isinstance(net.conv1, SpectralNorm) and net.conv1.target == 0.5
    assert type(net.conv2) is nn.Conv2d and type(net.head[1]) is nn.Linear and type(net.gn) is nn.GroupNorm
    net = apply_norm(net, "weight_norm")  # wraps the rest, never a wrapped layer twice
    assert isinstance(net.conv1, SpectralNorm) and isinstance(net.conv1.module, nn.Conv2d)
    assert isinstance(net.conv2, WeightNorm) and isinstance(net.head[1], WeightNorm)
    assert isinstance(apply_norm(nn.Linear(2, 2), "spectral_norm"), SpectralNorm)
    with pytest.raises(ValueError, match="norm"):
        apply_norm(net, "batch_norm")
    with pytest.raises(ValueError, match="target"):
        SpectralNorm(nn.Linear(2, 2), target=0.0)
