"""ReversibleBackward: the exact gradient of the reversible iteration, O(1) memory, honest reconstruction."""

import warnings
import weakref

import pytest
import torch
from torch import nn

from deqlab.nn import DEQ, ImplicitBackward, JacobianFreeBackward, ReversibleBackward
from deqlab.solvers import ConvergenceWarning, DiscreteDEQSolver, ReversibleSolver


class TanhMap(nn.Module):
    def __init__(self, d: int = 6, scale: float = 0.4):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.inj = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.lin.weight.mul_(scale)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + self.inj(x))


def _unrolled(model, x, beta, steps):
    """Autograd through each sample's own number of reversible steps, from y_0 = z_0 = 0."""
    out = []
    for i, n in enumerate(steps.tolist()):
        xi = x[i : i + 1]
        y = z = torch.zeros_like(xi)
        for _ in range(n):
            y = (1 - beta) * y + beta * model(z, xi)
            z = (1 - beta) * z + beta * model(y, xi)
        out.append(z)
    return torch.cat(out)


@pytest.mark.parametrize("beta", [0.5, 0.8, 1.3])
def test_gradient_equals_autograd_through_the_unrolled_iteration_float64(beta):
    torch.manual_seed(0)
    model = TanhMap().double()
    # samples of different scale stop at different steps: each is reversed by its own count
    x = (
        torch.randn(4, 6, dtype=torch.float64) * torch.tensor([[0.1], [1.0], [2.0], [0.5]], dtype=torch.float64)
    ).requires_grad_()
    w = torch.randn(4, 6, dtype=torch.float64)
    layer = DEQ(model, ReversibleSolver(beta=beta, mode="abs_norm", abstol_termination=1e-5, max_steps=60))
    z, sol = layer(x)
    (z * w).sum().backward()
    steps = sol.solver_result.reversible.steps
    assert sol.status.value == "converged" and len(set(steps.tolist())) > 1
    got = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad()
    z_ref = _unrolled(model, x, beta, steps)
    assert torch.allclose(z_ref, z, atol=1e-14)
    (z_ref * w).sum().backward()
    ref = [x.grad] + [p.grad for p in model.parameters()]
    for g, r in zip(got, ref):
        assert (g - r).abs().max() <= 1e-8 * max(1.0, float(r.abs().max()))
    assert sol.backward_nfe == 2 * int(steps.max())
    assert sol.backward_residual.shape == (4,) and bool((sol.backward_residual < 1e-6).all())


def test_the_gradient_approaches_the_implicit_one():
    class Half(nn.Module):
        def forward(self, z, x):
            return 0.5 * z + x

    x = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    z, sol = DEQ(Half(), ReversibleSolver(mode="abs_norm", abstol_termination=1e-6))(x)
    z.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 2.0), atol=1e-5)


class _SavedCounter:
    """Counts tensors packed for backward and the most alive at once (saved_tensors_hooks)."""

    def __init__(self):
        self.packed = 0
        self.alive = 0
        self.peak = 0

    def _release(self):
        self.alive -= 1

    def pack(self, t):
        self.packed += 1
        self.alive += 1
        self.peak = max(self.peak, self.alive)
        box = [t]
        holder = _Box(box)
        weakref.finalize(holder, self._release)
        return holder

    @staticmethod
    def unpack(holder):
        return holder.value[0]


class _Box:
    def __init__(self, value):
        self.value = value


def _memory_profile(max_steps):
    torch.manual_seed(0)
    model = TanhMap(d=8, scale=0.3).double()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    layer = DEQ(
        model, ReversibleSolver(mode="abs_norm", abstol_termination=0.0, max_steps=max_steps), on_unconverged="ignore"
    )
    counter = _SavedCounter()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        z, sol = layer(x)
        forward_saved = counter.packed
        counter.peak = counter.alive
        z.sum().backward()
    assert sol.solver_result.steps == max_steps
    return forward_saved, counter.peak, counter.packed


def test_memory_does_not_grow_with_the_number_of_steps():
    fwd5, peak5, total5 = _memory_profile(5)
    fwd40, peak40, total40 = _memory_profile(40)
    # the forward graph holds no per-iteration tensor, and the backward holds one evaluation's graph at a time
    assert fwd5 == fwd40
    assert peak5 == peak40
    assert total40 > total5  # ... although it did build (and free) one graph per reversed evaluation


def test_pairing_errors_say_what_to_use():
    model = TanhMap()
    with pytest.raises(ValueError, match="ReversibleBackward"):
        DEQ(model, ReversibleSolver(), backward=ImplicitBackward())
    with pytest.raises(ValueError, match="ReversibleSolver"):
        DEQ(model, DiscreteDEQSolver(), backward=ReversibleBackward())
    assert isinstance(DEQ(model, ReversibleSolver()).backward, ReversibleBackward)
    layer = DEQ(model, ReversibleSolver())
    layer.backward = JacobianFreeBackward()  # reassigned after construction: caught at the forward
    with pytest.raises(ValueError, match="ReversibleBackward"):
        layer(torch.randn(2, 6))


def test_float32_reconstruction_error_is_measured_and_reported():
    torch.manual_seed(0)
    model = TanhMap(d=16)
    x = torch.randn(4, 16)
    z, sol = DEQ(
        model, ReversibleSolver(mode="abs_norm", abstol_termination=0.0, max_steps=8), on_unconverged="ignore"
    )(x)
    z.sum().backward()
    err32 = sol.backward_residual
    assert err32.dtype == torch.float32 and err32.shape == (4,) and bool(torch.isfinite(err32).all())
    assert float(err32.max()) > 1e-9  # rounding is visible in float32 ...
    model64 = TanhMap(d=16).double()
    model64.load_state_dict(model.state_dict())
    z, sol64 = DEQ(
        model64, ReversibleSolver(mode="abs_norm", abstol_termination=0.0, max_steps=8), on_unconverged="ignore"
    )(x.double())
    z.sum().backward()
    assert float(sol64.backward_residual.max()) < 1e-3 * float(err32.max())  # ... and far smaller in float64
    # a reconstruction tolerance turns a large error into backward_converged=False and a warning
    layer = DEQ(
        model,
        ReversibleSolver(mode="abs_norm", abstol_termination=0.0, max_steps=8),
        backward=ReversibleBackward(reconstruction_tol=0.0, warn_unconverged=True),
        on_unconverged="ignore",
    )
    z, sol = layer(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z.sum().backward()
    assert sol.backward_converged is False
    assert any(issubclass(w.category, ConvergenceWarning) for w in caught)
    with pytest.raises(ValueError, match="reconstruction_tol"):
        ReversibleBackward(reconstruction_tol=-1.0)


def test_a_training_step_reduces_the_loss():
    torch.manual_seed(0)
    model = TanhMap(d=8)
    head = nn.Linear(8, 1)
    layer = DEQ(model, ReversibleSolver(beta=0.8, mode="rel_norm", reltol_termination=1e-3, max_steps=20))
    opt = torch.optim.SGD([*layer.parameters(), *head.parameters()], lr=0.1)
    x, target = torch.randn(16, 8), torch.randn(16, 1)
    losses = []
    for _ in range(5):
        z, _ = layer(x)
        loss = ((head(z) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
