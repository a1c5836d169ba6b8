"""Memory must not grow with the number of solver steps: the forward solve builds no graph.

Measured as the bytes of tensors autograd saves for the backward (``saved_tensors_hooks``) during
forward + backward, which is where a graph through the iterations would show up (it would save ~10x
more for 100 steps than for 10). On CUDA the peak allocated memory is compared as well.
"""

import pytest
import torch

from deqlab_nn_helpers import ConvMap

from deqlab.nn import DEQ, ImplicitBackward, SkipDEQ
from deqlab.solvers import ContinuousDEQSolver, DiscreteDEQSolver


def saved_bytes(layer, x):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z, sol = layer(x)
        (z.pow(2).sum() + sol.skip_loss).backward()
    return total[0]


def solver_with_steps(kind, steps):
    if kind == "continuous":
        return ContinuousDEQSolver(
            "euler",
            mode="abs_norm",
            ode_abstol=1e-3,
            abstol_termination=0.0,
            reltol_termination=0.0,
            max_steps=steps,
            dt=0.1,
        )
    return DiscreteDEQSolver(kind, mode="abs_norm", abstol_termination=0.0, reltol_termination=0.0, max_steps=steps)


@pytest.mark.parametrize("kind", ["fixed_point", "anderson", "continuous"])
@pytest.mark.parametrize("skip", [False, True])
def test_saved_memory_independent_of_steps(kind, skip):
    torch.manual_seed(0)
    model = ConvMap(4)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    sizes = {}
    for steps in (10, 100):
        solver = solver_with_steps(kind, steps)
        layer = SkipDEQ(model, solver) if skip else DEQ(model, solver, backward=ImplicitBackward(max_steps=20))
        _, sol = layer(x.detach())
        assert sol.nfe >= steps  # the solve really ran that long
        sizes[steps] = saved_bytes(layer, x)
    assert sizes[10] > 0
    assert sizes[100] <= 1.1 * sizes[10], sizes


@pytest.mark.parametrize("kind", ["anderson", "lbroyden"])
def test_saved_memory_independent_of_steps_with_the_compiled_solver_step(kind):
    # the compiled step (tracing backend) and the compiled adjoint build no graph through the iterations either
    torch.manual_seed(0)
    model = ConvMap(4)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    sizes = {}
    for steps in (10, 100):
        layer = DEQ(model, solver_with_steps(kind, steps), backward=ImplicitBackward(max_steps=20), compile="eager")
        _, sol = layer(x.detach())
        assert sol.nfe >= steps
        sizes[steps] = saved_bytes(layer, x)
    assert sizes[10] > 0
    assert sizes[100] <= 1.1 * sizes[10], sizes


def test_an_unrolled_forward_would_fail_this_check():
    """The measure can fail: fixed-depth mode (backprop through iterations) grows with depth."""
    model = ConvMap(4)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    layer = DEQ(model, solver_with_steps("fixed_point", 10))
    sizes = {}
    for d in (10, 100):
        layer.fixed_depth = d
        sizes[d] = saved_bytes(layer, x)
    assert sizes[100] > 5 * sizes[10]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_memory_independent_of_steps():
    torch.manual_seed(0)
    model = ConvMap(8).cuda()
    x = torch.randn(16, 8, 32, 32, device="cuda", requires_grad=True)
    peaks = {}
    for steps in (10, 100):
        layer = DEQ(model, solver_with_steps("anderson", steps), backward=ImplicitBackward(max_steps=20))
        layer(x)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        z, _ = layer(x)
        z.pow(2).sum().backward()
        torch.cuda.synchronize()
        peaks[steps] = torch.cuda.max_memory_allocated() - base
    assert peaks[100] <= 1.1 * peaks[10], peaks
