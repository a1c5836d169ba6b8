"""The January-2022 reference code's semantics, offered as options (``paper_repro --protocol v1``):
``reapply_map`` (z* = f(u_T, x)), ``ZeroGuess(fixed_point_penalty=True)`` (the skip loss λ·mean|z*| on a
vanilla model), and the paper's NFE count beside ours on the layer's record."""

import pytest
import torch
from torch import nn

from deqlab_nn_helpers import DenseMap

from deqlab.nn import DEQ, MapGuess, ZeroGuess
from deqlab.solvers import ContinuousDEQSolver, DiscreteDEQSolver

F64 = torch.float64


class Linear(nn.Module):
    """``f(z, x) = A z + x`` with a fixed ``A`` (``||A|| = 0.5``): ``z* = (I - A)^-1 x``."""

    def __init__(self, dim: int):
        super().__init__()
        a = torch.randn(dim, dim, dtype=F64)
        self.A = nn.Parameter(0.5 * a / torch.linalg.matrix_norm(a, ord=2))

    def forward(self, z, x):
        return z @ self.A.T + x


def _solver(tol=1e-8):
    return DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=tol, max_steps=100)


def test_reapply_map_returns_f_of_the_last_iterate_and_its_exact_gradient():
    torch.manual_seed(0)
    f = Linear(4)
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    plain = DEQ(f, _solver(tol=1e-3))
    z_t, sol_t = plain(x)
    deq = DEQ(f, _solver(tol=1e-3), reapply_map=True)
    z, sol = deq(x)
    torch.testing.assert_close(z, f(z_t.detach(), x.detach()))  # one more application of f
    assert sol.nfe == sol_t.nfe + 1 and sol.solver_result.nfe == sol_t.nfe
    # the returned value is g(x) = A z*(x) + x with z*(x) = (I - A)^-1 x: dg/dx = A (I - A)^-1 + I = (I - A)^-1
    tight = DEQ(f, _solver(), reapply_map=True)
    w = torch.randn(3, 4, dtype=F64)
    (tight(x)[0] * w).sum().backward()
    eye = torch.eye(4, dtype=F64)
    oracle = w @ torch.linalg.inv(eye - f.A.detach())
    torch.testing.assert_close(x.grad, oracle, atol=1e-6, rtol=1e-6)


def test_the_vanilla_penalty_is_the_mean_absolute_fixed_point_and_trains_it():
    torch.manual_seed(0)
    deq = DEQ(DenseMap(4).double(), _solver(), init=ZeroGuess(fixed_point_penalty=True))
    x = torch.randn(5, 4, dtype=F64, requires_grad=True)
    z, sol = deq(x)
    torch.testing.assert_close(sol.skip_loss, z.abs().mean())
    sol.skip_loss.backward()  # coupled: the penalty reaches the map's parameters through z*
    assert deq.model.wx.weight.grad is not None and deq.model.wx.weight.grad.abs().sum() > 0
    assert float(DEQ(DenseMap(4).double(), _solver())(x)[1].skip_loss) == 0.0  # off by default


@pytest.mark.parametrize("counting", ["deqjl", "fastdeq"])
def test_the_layers_record_carries_the_papers_count(counting):
    torch.manual_seed(0)
    solver = DiscreteDEQSolver("lbroyden", mode="rel_norm", reltol_termination=1e-4, reference_counting=counting)
    x = torch.randn(4, 6)
    for jac in (False, True):
        z, sol = DEQ(DenseMap(6), solver, jacobian_regularization=jac)(x)
        k = sol.solver_result.steps
        # DeepEquilibriumNetworks.jl v0.2 counted Jacobian regularization as one evaluation, FastDEQ did not
        extra = int(jac and counting == "deqjl")
        assert sol.reference_nfe == sol.solver_result.reference_nfe + extra
        assert sol.reference_nfe == k + (2 if counting == "deqjl" else 3) + extra
    z, sol = DEQ(DenseMap(6), solver, reapply_map=True)(x)
    assert sol.reference_nfe == sol.solver_result.reference_nfe  # the reference always made that application
    layer = DEQ(DenseMap(6), solver, init=MapGuess())
    with layer.fixed_depth_mode(5):
        _, sol = layer(x)
    assert sol.nfe == sol.reference_nfe == 5  # fixed depth: exactly d in both codes
    continuous = DEQ(DenseMap(6), ContinuousDEQSolver(reference_counting=counting))
    _, sol = continuous(x)
    assert sol.reference_nfe == sol.solver_result.reference_nfe > sol.nfe
