"""Multiscale DEQs (list states) and the multiscale neural-ODE baseline."""

import warnings

import pytest
import torch
from torch import nn

from deqlab_nn_helpers import make_solver

from deqlab.nn import (
    ImplicitBackward,
    MultiScaleDeepEquilibriumNetwork,
    MultiScaleMap,
    MultiScaleNeuralODE,
    MultiScaleSkipDeepEquilibriumNetwork,
)
from deqlab.solvers import SolverStatus

SCALES = [(2, 4, 4), (3, 2, 2)]


class Main0(nn.Module):
    def __init__(self):
        super().__init__()
        self.cz = nn.Conv2d(2, 2, 3, padding=1)
        self.cx = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        with torch.no_grad():
            self.cz.weight.mul_(0.3)

    def forward(self, z, x):
        return torch.tanh(self.cz(z) + self.cx(x))


class Main1(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3, padding=1)
        with torch.no_grad():
            self.c.weight.mul_(0.3)

    def forward(self, z):
        return torch.tanh(self.c(z))


def pieces():
    down = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    up = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Upsample(scale_factor=2))
    with torch.no_grad():
        down.weight.mul_(0.3)
        up[0].weight.mul_(0.3)
    return [Main0(), Main1()], [[None, down], [up, None]], [nn.Tanh(), nn.Tanh()]


@pytest.mark.parametrize("solver_name", ["anderson", "lbroyden", "tsit5"])
@pytest.mark.parametrize("variant", ["deq", "skip", "skipreg"])
def test_multiscale_shapes_residual_gradients(solver_name, variant):
    torch.manual_seed(0)
    main, mapping, post = pieces()
    solver = make_solver(solver_name, tol=1e-5, max_steps=300)
    if variant == "deq":
        layer = MultiScaleDeepEquilibriumNetwork(main, mapping, post, solver, SCALES, jacobian_regularization=True)
    else:
        shortcut = (
            None if variant == "skipreg" else [nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(1, 3, 3, stride=2, padding=1)]
        )
        layer = MultiScaleSkipDeepEquilibriumNetwork(main, mapping, post, solver, SCALES, shortcut)
    layer = layer.double()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    z, sol = layer(x)
    assert isinstance(z, list) and [tuple(t.shape) for t in z] == [(2, *s) for s in SCALES]
    assert sol.status == SolverStatus.CONVERGED and float(sol.abs_residual.max()) <= 1e-5
    loss = sum(t.pow(2).mean() for t in z) + sol.skip_loss + sol.jacobian_loss
    loss.backward()
    assert torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with layer.fixed_depth_mode(10):
        _, sol10 = layer(x)
    assert sol10.nfe == 10


def test_multiscale_implicit_gradient_matches_unroll():
    torch.manual_seed(1)
    main, mapping, post = pieces()
    layer = MultiScaleDeepEquilibriumNetwork(
        main,
        mapping,
        post,
        make_solver("anderson", tol=1e-12, max_steps=500),
        SCALES,
        backward=ImplicitBackward(tol=1e-12, max_steps=200),
    ).double()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    z, _ = layer(x)
    (z[0].sum() + z[1].pow(2).sum()).backward()
    implicit = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    with layer.fixed_depth_mode(150):
        z2, _ = layer(x)
    (z2[0].sum() + z2[1].pow(2).sum()).backward()
    for a, b in zip(implicit, [x.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_mapping_matrix_semantics():
    """out_j = sum_i map[i][j](main_i); None on the diagonal is identity, off it no connection."""
    a, b = nn.Linear(2, 3, bias=False), nn.Linear(3, 2, bias=False)
    m = MultiScaleMap(
        [lambda_module(lambda z, x: z + x), lambda_module(lambda z: 2 * z)], [[None, a], [None, None]], None
    )
    z = [torch.randn(1, 2), torch.randn(1, 3)]
    x = torch.randn(1, 2)
    out = m(z, x)
    torch.testing.assert_close(out[0], z[0] + x)
    torch.testing.assert_close(out[1], a(z[0] + x) + 2 * z[1])
    del b


class lambda_module(nn.Module):  # tiny test helper
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def manual_rk4(model, x, dt, steps):
    """Backprop-through-the-solver oracle independent of torchdyn."""
    u = [x.new_zeros((x.shape[0], *s)) for s in SCALES]

    def vf(u_):
        return [a - b for a, b in zip(model(u_, x), u_)]

    for _ in range(steps):
        k1 = vf(u)
        k2 = vf([a + 0.5 * dt * k for a, k in zip(u, k1)])
        k3 = vf([a + 0.5 * dt * k for a, k in zip(u, k2)])
        k4 = vf([a + dt * k for a, k in zip(u, k3)])
        u = [a + dt / 6 * (p + 2 * q + 2 * r + s) for a, p, q, r, s in zip(u, k1, k2, k3, k4)]
    return u


def _node_grads(node, x):
    x = x.clone().requires_grad_()
    node.zero_grad()
    u, sol = node(x)
    (u[0].sin().sum() + u[1].pow(2).sum()).backward()
    return [x.grad] + [
        p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in node.model.parameters()
    ], sol


def test_neural_ode_gradients_match_backprop_through_solver():
    torch.manual_seed(2)
    main, mapping, post = pieces()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    node = MultiScaleNeuralODE(main, mapping, post, "rk4", SCALES, dt=0.1).double()
    got, sol = _node_grads(node, x)
    assert sol.nfe == 40  # 10 steps x 4 stages
    assert [tuple(t.shape) for t in sol.z_star] == [(2, *s) for s in SCALES]
    # oracle: the same RK4 written out by hand
    xx = x.clone().requires_grad_()
    node.zero_grad()
    u = manual_rk4(node.model, xx, 0.1, 10)
    (u[0].sin().sum() + u[1].pow(2).sum()).backward()
    want = [xx.grad] + [p.grad for p in node.model.parameters()]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # adaptive tsit5 at tight tolerance: same gradients as a fine RK4 (both approximate the exact ODE)
    node5 = MultiScaleNeuralODE(main, mapping, post, "tsit5", SCALES, ode_abstol=1e-10, ode_reltol=1e-10).double()
    got5, sol5 = _node_grads(node5, x)
    assert sol5.nfe > 0
    xx = x.clone().requires_grad_()
    node5.zero_grad()
    u = manual_rk4(node5.model, xx, 0.01, 100)
    (u[0].sin().sum() + u[1].pow(2).sum()).backward()
    for a, b in zip(got5, [xx.grad] + [p.grad for p in node5.model.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_torchdyn_adjoint_is_wrong_for_the_injection_path():
    """Documents why MultiScaleNeuralODE defaults to sensitivity='autograd'."""
    torch.manual_seed(3)
    main, mapping, post = pieces()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    ref, _ = _node_grads(
        MultiScaleNeuralODE(main, mapping, post, "tsit5", SCALES, ode_abstol=1e-4, ode_reltol=1e-4).double(), x
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adj, _ = _node_grads(
            MultiScaleNeuralODE(
                main, mapping, post, "tsit5", SCALES, ode_abstol=1e-4, ode_reltol=1e-4, sensitivity="adjoint"
            ).double(),
            x,
        )
    # the stem would get no gradient through the injection x
    assert adj[0] is None or float(adj[0].abs().sum()) == 0.0 or not torch.allclose(adj[0], ref[0], rtol=1e-3)
    assert float(ref[0].abs().sum()) > 0
