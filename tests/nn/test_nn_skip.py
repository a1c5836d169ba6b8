"""Skip DEQ / Skip Reg. DEQ semantics."""

import torch
from torch import nn

from deqlab_nn_helpers import DenseMap, make_solver

from deqlab.nn import DEQ, SkipDEQ


def _skip():
    torch.manual_seed(0)
    model = DenseMap(4, 3)
    shortcut = nn.Linear(3, 4)
    return SkipDEQ(model, make_solver("anderson", tol=1e-6), shortcut, z_shape=(4,)), torch.randn(5, 3)


def test_shortcut_learns_only_from_skip_loss():
    deq, x = _skip()
    z, sol = deq(x)
    z.pow(2).sum().backward()  # task loss only
    for p in deq.shortcut.parameters():
        assert p.grad is None or bool((p.grad == 0).all())
    for p in deq.model.parameters():
        assert p.grad is not None
    deq.zero_grad(set_to_none=True)
    z, sol = deq(x)
    sol.skip_loss.backward()  # skip loss only: the shortcut learns, the DEQ map gets nothing
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in deq.shortcut.parameters())
    assert all(p.grad is None or bool((p.grad == 0).all()) for p in deq.model.parameters())


def test_skip_loss_value_and_u0():
    deq, x = _skip()
    z, sol = deq(x)
    u0 = deq.shortcut(x)
    torch.testing.assert_close(sol.u0, u0)
    torch.testing.assert_close(sol.skip_loss, (u0 - z).abs().mean())
    torch.testing.assert_close(deq.explicit(x), u0)
    deq.init.skip_loss_kind = "l2"
    z, sol = deq(x)
    torch.testing.assert_close(sol.skip_loss, (u0 - z).pow(2).mean())


def test_skip_reg_u0_is_f_of_zero():
    torch.manual_seed(1)
    model = DenseMap(4, 3)
    deq = SkipDEQ(model, make_solver("anderson", tol=1e-6), None, z_shape=(4,))
    x = torch.randn(2, 3)
    z, sol = deq(x)
    torch.testing.assert_close(sol.u0, model(torch.zeros(2, 4), x))
    assert sol.u0.requires_grad
    deq.zero_grad()
    sol.skip_loss.backward()  # Skip Reg.: the skip loss trains f's one-step map
    assert model.wz.bias.grad.abs().sum() > 0


def test_skip_target_coupling_option():
    torch.manual_seed(2)
    model = DenseMap(4, 3)
    shortcut = nn.Linear(3, 4)
    deq = SkipDEQ(model, make_solver("anderson", tol=1e-6), shortcut, z_shape=(4,), detach_skip_target=False)
    z, sol = deq(torch.randn(2, 3))
    sol.skip_loss.backward()  # now the skip loss also reaches the map through z*
    assert model.wx.weight.grad.abs().sum() > 0


def test_skip_needs_fewer_steps_with_a_good_shortcut():
    torch.manual_seed(3)
    model = DenseMap(4, 4)
    solver = make_solver("fixed_point", tol=1e-6, max_steps=500)
    x = torch.randn(3, 4)
    vanilla = DEQ(model, solver)
    _, s0 = vanilla(x)

    class Oracle(nn.Module):  # predicts the fixed point
        def forward(self, x_):
            with torch.no_grad():
                return vanilla(x_)[0]

    _, s1 = SkipDEQ(model, solver, Oracle())(x)
    assert s1.nfe < s0.nfe


def test_skip_reg_skip_loss_is_coupled_through_z_star_by_default():
    """Skip Reg. differentiates its skip loss through z* too (the reference's form): the gradient of
    mean|f(0, x) - z*| w.r.t. the map equals the dense-linear-algebra gradient of the coupled loss, not the
    detached one (a detached target let |z*| run away on MNIST dense)."""
    from deqlab.nn import MapGuess, SkipDeepEquilibriumNetwork

    torch.manual_seed(3)
    a = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 2, dtype=torch.float64)

    class Affine(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(a.detach().clone())

        def forward(self, z, x):
            return self.a * z + x

    model = Affine()
    deq = SkipDeepEquilibriumNetwork(model, make_solver("anderson", tol=1e-12), None, z_shape=(2,)).double()
    assert isinstance(deq.init, MapGuess) and deq.init.detach_skip_target is False
    assert MapGuess().detach_skip_target is False
    _, sol = deq(x)
    sol.skip_loss.backward()
    # u0 = f(0, x) = x, z* = x / (1 - a): the coupled loss mean|x - x/(1-a)| = mean|x| a/(1-a) has
    # d/da = mean|x| / (1-a)^2
    expected = x.abs().mean() / (1 - 0.5) ** 2
    torch.testing.assert_close(model.a.grad, expected, rtol=1e-6, atol=1e-9)
    # forcing the detached form gives no gradient to a (u0 = x does not depend on a)
    detached = SkipDeepEquilibriumNetwork(Affine(), deq.solver, None, z_shape=(2,), detach_skip_target=True).double()
    _, sol = detached(x)
    sol.skip_loss.backward()
    assert detached.model.a.grad is None or float(detached.model.a.grad.abs()) == 0.0
