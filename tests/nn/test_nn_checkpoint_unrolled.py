"""checkpoint_unrolled=True (torchdeq's mem_gc): the fixed-depth mode's gradients are unchanged, and the
activations of f are not kept for the backward (only each step's input state)."""

import torch
from torch import nn

from deqlab_nn_helpers import make_solver

from deqlab.nn import DEQ, VariationalHiddenDropout, WeightNorm, ZeroGuess


class _Map(nn.Module):
    """Weight-normed, with a per-solve dropout mask and a BatchNorm: every per-solve state kind."""

    def __init__(self, n=8):
        super().__init__()
        self.lin = WeightNorm(nn.Linear(n, 4 * n))
        self.out = nn.Linear(4 * n, n)
        self.bn = nn.BatchNorm1d(4 * n)
        self.drop = VariationalHiddenDropout(0.3)

    def forward(self, z, x):
        return 0.5 * torch.tanh(self.out(self.drop(torch.tanh(self.bn(self.lin(z)))))) + x


def _run(checkpoint, depth, seed=0):
    torch.manual_seed(0)
    model = _Map().double()
    deq = DEQ(model, make_solver("anderson"), fixed_depth=depth, checkpoint_unrolled=checkpoint)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(seed)  # the same dropout mask in both runs
    z, sol = deq(x)
    (z**2).sum().backward()
    return z.detach(), [x.grad, *[p.grad for p in model.parameters()]], model.bn.running_mean.clone(), sol


def test_gradients_identical_to_plain_unrolling():
    z0, g0, rm0, sol0 = _run(False, 6)
    z1, g1, rm1, sol1 = _run(True, 6)
    assert torch.equal(z0, z1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(rm0, rm1)  # the recomputation does not update the running statistics again
    assert sol0.backward_nfe == sol1.backward_nfe == 6


def _saved_elements(checkpoint, depth):
    torch.manual_seed(0)
    model = _Map().double()
    deq = DEQ(model, make_solver("anderson"), fixed_depth=depth, checkpoint_unrolled=checkpoint)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    count = [0]

    def pack(t):
        count[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        deq(x)
    return count[0]


def test_saved_tensors_do_not_grow_with_the_activations_of_f():
    state = 5 * 8
    plain = [_saved_elements(False, d) for d in (2, 10)]
    ckpt = [_saved_elements(True, d) for d in (2, 10)]
    # plain unrolling keeps every activation of f (several hidden-width tensors per step); checkpointing
    # keeps at most one state per step, whatever f computes inside
    assert (plain[1] - plain[0]) / 8 > 4 * state
    assert (ckpt[1] - ckpt[0]) / 8 <= state
    assert ckpt[1] < plain[1] / 4


def test_no_grad_and_repr():
    deq = DEQ(_Map(), make_solver("anderson"), fixed_depth=3, checkpoint_unrolled=True)
    assert "checkpoint_unrolled=True" in repr(deq)
    with torch.no_grad():
        z, sol = deq(torch.randn(2, 8))
    assert sol.nfe == 3


class _TwoScaleMap(nn.Module):
    """A multiscale (list) state: two resolutions exchanging information, a GroupNorm on the fine one."""

    def __init__(self):
        super().__init__()
        self.fine = nn.Conv2d(2, 2, 3, padding=1)
        self.coarse = nn.Linear(4, 4)
        self.norm = nn.GroupNorm(1, 2)
        self.drop = VariationalHiddenDropout(0.2)

    def forward(self, z, x):
        fine, coarse = z
        up = coarse.view(-1, 1, 2, 2).repeat_interleave(2, -1).repeat_interleave(2, -2).expand(-1, 2, 4, 4)
        new_fine = 0.4 * torch.tanh(self.norm(self.fine(self.drop(fine)) + up)) + x
        new_coarse = 0.4 * torch.tanh(self.coarse(new_fine.mean(1).view(-1, 4, 4)[:, ::2, ::2].reshape(-1, 4)))
        return [new_fine, new_coarse]


def _run_two_scale(checkpoint):
    torch.manual_seed(0)
    model = _TwoScaleMap().double()
    deq = DEQ(
        model, make_solver("anderson"), init=ZeroGuess(shape=[(2, 4, 4), (4,)]), fixed_depth=5,
        checkpoint_unrolled=checkpoint,
    )  # fmt: skip
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    z, sol = deq(x)
    assert isinstance(z, list) and [tuple(t.shape) for t in z] == [(3, 2, 4, 4), (3, 4)]
    (z[0].square().sum() + z[1].sin().sum()).backward()
    return [t.detach() for t in z], [x.grad, *[p.grad for p in model.parameters()]]


def test_multiscale_state_gradients_identical_to_plain_unrolling():
    z0, g0 = _run_two_scale(False)
    z1, g1 = _run_two_scale(True)
    for a, b in zip(z0, z1):
        assert torch.equal(a, b)
    assert all(g is not None for g in g1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
