"""The reference package's test matrix: {solver} x {DEQ, Skip DEQ, Skip Reg. DEQ} x {Jacobian reg off/on}
x {dense, conv}: residual within tolerance, finite gradients everywhere, fixed depth gives nfe == depth."""

import pytest
import torch
from torch import nn

from deqlab_nn_helpers import ALL_SOLVERS, ConvMap, DenseMap, make_solver

from deqlab.nn import DEQ, ImplicitBackward, SkipDEQ
from deqlab.solvers import SolverStatus

TOL = 1e-5


def build(kind: str, shape: str, solver, jac: bool):
    if shape == "dense":
        model, x = DenseMap(6, 4), torch.randn(3, 4)
        shortcut = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        kwargs = {"z_shape": (6,)}
    else:
        model, x = ConvMap(2, 1), torch.randn(2, 1, 4, 4)
        shortcut = nn.Conv2d(1, 2, 3, padding=1)
        kwargs = {"z_shape": (2, 4, 4)}
    common = dict(backward=ImplicitBackward(tol=1e-8, max_steps=60), jacobian_regularization=jac, **kwargs)
    if kind == "deq":
        layer = DEQ(model, solver, **common)
    elif kind == "skip":
        layer = SkipDEQ(model, solver, shortcut, **common)
    else:
        layer = SkipDEQ(model, solver, None, **common)
    return layer.double(), x.double().requires_grad_()


@pytest.mark.parametrize("shape", ["dense", "conv"])
@pytest.mark.parametrize("jac", [False, True], ids=["nojac", "jac"])
@pytest.mark.parametrize("kind", ["deq", "skip", "skipreg"])
@pytest.mark.parametrize("solver_name", ALL_SOLVERS)
def test_matrix(solver_name, kind, jac, shape):
    torch.manual_seed(0)
    layer, x = build(kind, shape, make_solver(solver_name, tol=TOL, max_steps=300), jac)
    z, sol = layer(x)
    assert sol.status == SolverStatus.CONVERGED, sol.status
    assert bool(sol.converged.all())
    assert float(sol.abs_residual.max()) <= TOL
    assert sol.nfe > 0
    loss = z.pow(2).mean() + sol.jacobian_loss + sol.skip_loss
    if jac:
        assert sol.jacobian_loss.item() > 0 and sol.jacobian_loss.requires_grad
    else:
        assert sol.jacobian_loss.item() == 0
    if kind == "deq":
        assert sol.skip_loss.item() == 0
    else:
        assert sol.skip_loss.item() > 0
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert sol.backward_nfe > 0

    layer.fixed_depth = 10
    x.grad = None
    z10, sol10 = layer(x)
    assert sol10.nfe == 10
    assert sol10.abs_residual.shape == (x.shape[0],) and not sol10.abs_residual.requires_grad
    (z10.pow(2).mean() + sol10.skip_loss + sol10.jacobian_loss).backward()
    assert torch.isfinite(x.grad).all()
