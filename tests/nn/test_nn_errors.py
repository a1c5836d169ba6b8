"""Bad inputs give ValueErrors that name the shapes."""
import pytest
import torch
from torch import nn

from deqlab.nn import DEQ, ImplicitBackward, MultiScaleDeepEquilibriumNetwork, SkipDEQ

from deqlab_nn_helpers import DenseMap, make_solver


def test_wrong_x_shape():
    deq = DEQ(DenseMap(4, 3), make_solver("anderson"), z_shape=(4,))
    with pytest.raises(ValueError, match=r"x of shape \(B, 5\)"):
        deq(torch.randn(2, 5))


def test_reduced_dim_without_z_shape_hints():
    deq = DEQ(DenseMap(4, 3), make_solver("anderson"))
    with pytest.raises(ValueError, match="z_shape"):
        deq(torch.randn(2, 3))


def test_wrong_dtype():
    deq = DEQ(DenseMap(4), make_solver("anderson"))
    with pytest.raises(ValueError, match="float64"):
        deq(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="floating-point"):
        deq(torch.ones(2, 4, dtype=torch.long))


def test_model_output_shape_differs():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, z, x):
            return self.lin(z + x)

    deq = DEQ(Bad(), make_solver("anderson"))
    with pytest.raises(ValueError, match=r"expected \(B, 4\), got \(B, 3\)"):
        deq(torch.randn(2, 4))
    skipreg = SkipDEQ(Bad(), make_solver("anderson"))
    with pytest.raises(ValueError, match=r"expected \(B, 4\), got \(B, 3\)"):
        skipreg(torch.randn(2, 4))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError):
        ImplicitBackward("nope")
    with pytest.raises(TypeError):
        DEQ(DenseMap(3), make_solver("anderson"), backward="implicit")
    with pytest.raises(TypeError):
        DEQ(DenseMap(3), make_solver("anderson"), bogus=1)
    with pytest.raises(ValueError, match="2x2"):
        MultiScaleDeepEquilibriumNetwork([nn.Identity(), nn.Identity()], [[None]], None,
                                         make_solver("anderson"), [(2,), (3,)])
    with pytest.raises(ValueError, match="skip_loss"):
        SkipDEQ(DenseMap(3), make_solver("anderson"), skip_loss="l3")
