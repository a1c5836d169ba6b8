"""Bad inputs give ValueErrors that name the shapes."""

import pytest
import torch
from torch import nn

from deqlab_nn_helpers import DenseMap, make_solver

from deqlab.nn import DEQ, ImplicitBackward, MultiScaleDeepEquilibriumNetwork, SkipDEQ, ZeroGuess


def test_wrong_x_shape():
    deq = DEQ(DenseMap(4, 3), make_solver("anderson"), init=ZeroGuess(shape=(4,)))
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
        MultiScaleDeepEquilibriumNetwork(
            [nn.Identity(), nn.Identity()], [[None]], None, make_solver("anderson"), [(2,), (3,)]
        )
    with pytest.raises(ValueError, match="skip_loss"):
        SkipDEQ(DenseMap(3), make_solver("anderson"), skip_loss="l3")


class _InPlaceOnZ(nn.Module):
    """``f(z, x) = 0.3 W relu(z) + x`` with the ReLU applied in place to ``z`` itself (the user's bug)."""

    def __init__(self, d=4):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.act = nn.ReLU(inplace=True)

    def forward(self, z, x):
        return 0.3 * self.lin(self.act(z)) + x


def test_in_place_op_on_z_is_named_with_the_fix():
    # Old: the solve ended max_steps (the iterate was corrupted in place) with a warning about solver
    # tuning, then backward raised "a leaf Variable that requires grad is being used in an in-place operation".
    for layer in (DEQ(_InPlaceOnZ(), make_solver("anderson")), SkipDEQ(_InPlaceOnZ(), make_solver("anderson"))):
        with pytest.raises(ValueError, match=r"modified its input z in place.*nn.ReLU\(inplace=True\).*z.clone\(\)"):
            layer(torch.randn(2, 4, requires_grad=True))


def test_in_place_op_on_one_scale_of_a_list_state():
    class AddOne(nn.Module):
        def forward(self, z, x=None):
            return z.add_(1) * 0.5 if x is None else 0.5 * z + x

    mdeq = MultiScaleDeepEquilibriumNetwork(
        [AddOne(), AddOne()], [[None, nn.Linear(2, 3)], [None, None]], None, make_solver("anderson"), [(2,), (3,)]
    )
    with pytest.raises(ValueError, match="modified its input z in place"):
        mdeq(torch.randn(2, 2))


def test_in_place_op_on_an_intermediate_is_fine():
    class Fine(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.act = nn.ReLU(inplace=True)

        def forward(self, z, x):
            return 0.3 * self.act(self.lin(z)) + x  # in place on lin(z), not on z

    z, sol = DEQ(Fine(), make_solver("anderson"))(torch.randn(2, 4, requires_grad=True))
    z.sum().backward()
    assert sol.status == "converged"


def test_output_on_another_device_is_named():
    # Old: torch's internal "Tensor on device cpu is not on the expected device meta!" from inside the solver.
    class Elsewhere(nn.Module):
        def forward(self, z, x):
            return (0.5 * z + x).to("meta")

    with pytest.raises(ValueError, match="expected device cpu, got meta"):
        DEQ(Elsewhere(), make_solver("anderson"))(torch.randn(2, 4))
