"""The backward writes into the record of *its own* forward, for every layer type, through
`DeepEquilibriumSolution.record_backward`; and a backward that really ran always counts its work (also
when it is autograd's own: fixed-depth mode, the neural ODE with ``sensitivity="autograd"``)."""

import warnings

import pytest
import torch
from torch import nn

from deqlab_nn_helpers import DenseMap

from deqlab.nn import DEQ, MultiScaleNeuralODE, ZeroGuess
from deqlab.solvers import DiscreteDEQSolver


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, z, x=None):
        return torch.tanh(self.lin(z)) + (0 if x is None else x)


def _node(sensitivity: str) -> MultiScaleNeuralODE:
    torch.manual_seed(0)
    return MultiScaleNeuralODE([_Block()], [[None]], None, "rk4", [(2,)], dt=0.25, sensitivity=sensitivity).double()


@pytest.mark.parametrize("sensitivity", ["autograd", "adjoint"])
def test_neural_ode_backward_fills_its_own_record_with_two_forwards_in_flight(sensitivity):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchdyn's adjoint warns about its own API
        node = _node(sensitivity)
        xa = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
        xb = 5 * torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
        ua, sa = node(xa)
        ua[0].sum().backward()  # reference: A alone
        alone_nfe = sa.backward_nfe
        alone = [p.grad.clone() for p in node.parameters()]
        node.zero_grad()
        ua, sa = node(xa)
        ub, sb = node(xb)  # B's forward runs before A's backward
        ua[0].sum().backward()
    assert sa.backward_nfe == alone_nfe > 0 and sa.backward_converged is True
    assert sb.backward_nfe == 0 and sb.backward_converged is None
    # and A's gradients are A's: an adjoint re-integrates with A's injection, not the last forward's
    for p, want in zip(node.parameters(), alone):
        torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=1e-12)


def test_neural_ode_autograd_counts_one_vjp_per_recorded_evaluation():
    node = _node("autograd")
    u, sol = node(torch.randn(4, 2, dtype=torch.float64, requires_grad=True))
    assert sol.nfe == 16 and sol.backward_nfe == 0  # rk4, 4 steps x 4 stages; nothing before the backward
    u[0].sum().backward()
    assert sol.backward_nfe == sol.nfe and sol.backward_converged is True and sol.backward_residual is None


def test_fixed_depth_backward_counts_d_vjps():
    torch.manual_seed(1)
    deq = DEQ(DenseMap(4, 3), DiscreteDEQSolver("anderson", max_steps=20), init=ZeroGuess(shape=(4,)))
    with deq.fixed_depth_mode(4):
        z, sol = deq(torch.randn(2, 3, requires_grad=True))
    assert sol.backward_nfe == 0 and sol.backward_converged is None
    z.sum().backward(retain_graph=True)
    assert sol.backward_nfe == 4 and sol.backward_converged is True
    z.sum().backward()  # every backward through the solve is counted
    assert sol.backward_nfe == 8


def test_fixed_depth_list_state_counts_one_vjp_per_application():
    from deqlab.nn import MultiScaleDeepEquilibriumNetwork

    torch.manual_seed(2)
    mdeq = MultiScaleDeepEquilibriumNetwork(
        [_Block(), nn.Tanh()],
        [[None, nn.Linear(2, 3)], [None, None]],
        None,
        DiscreteDEQSolver("anderson", max_steps=20),
        scales=[(2,), (3,)],
    )
    with mdeq.fixed_depth_mode(3):
        zs, sol = mdeq(torch.randn(2, 2, requires_grad=True))
    sum(z.sum() for z in zs).backward()
    assert sol.backward_nfe == 3


def test_two_deq_forwards_in_flight_keep_their_records():
    torch.manual_seed(3)
    deq = DEQ(
        DenseMap(4, 3),
        DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-5),
        init=ZeroGuess(shape=(4,)),
    )
    za, sa = deq(torch.randn(2, 3, requires_grad=True))
    zb, sb = deq(torch.randn(2, 3, requires_grad=True))
    za.sum().backward()
    assert sa.backward_nfe > 0 and sa.backward_converged is True
    assert sb.backward_nfe == 0 and sb.backward_converged is None
