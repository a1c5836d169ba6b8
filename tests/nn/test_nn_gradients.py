"""The implicit gradient against oracles: closed form from the dense Jacobian, long unrolled backprop,
and torch.autograd.gradcheck (float64)."""

import pytest
import torch
from torch import nn

from deqlab_nn_helpers import ALL_SOLVERS, DenseMap, make_solver

from deqlab.nn import DEQ, ImplicitBackward, JacobianFreeBackward, PhantomGradient, VariationalHiddenDropout, WeightNorm
from deqlab.solvers import ContinuousDEQSolver, DiscreteDEQSolver

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def closed_form_grads(model, z_star, x, dl_dz):
    """dL/dx and dL/dθ from the dense per-sample Jacobian: solve (I - J)^T λ = dL/dz*."""
    lams = []
    for b in range(z_star.shape[0]):
        J = torch.autograd.functional.jacobian(lambda zz, b=b: model(zz[None], x[b : b + 1])[0], z_star[b])
        n = J.shape[0]
        lams.append(torch.linalg.solve((torch.eye(n, dtype=J.dtype) - J).T, dl_dz[b]))
    lam = torch.stack(lams)
    xx = x.detach().requires_grad_()
    fz = model(z_star.detach(), xx)
    params = list(model.parameters())
    grads = torch.autograd.grad(fz, [xx, *params], lam)
    return grads[0], grads[1:]


@pytest.mark.parametrize("solver_name", ALL_SOLVERS)
def test_implicit_gradient_matches_closed_form(solver_name):
    torch.manual_seed(0)
    with torch.random.fork_rng():
        torch.set_default_dtype(torch.float64)
        try:
            model = DenseMap(4, 3)
            solver = make_solver(solver_name, tol=1e-13, max_steps=2000)
            deq = DEQ(model, solver, backward=ImplicitBackward(tol=1e-14, max_steps=100), z_shape=(4,))
            x = torch.randn(3, 3, requires_grad=True)
            z, sol = deq(x)
            assert float(sol.abs_residual.max()) < 1e-11
            target = torch.randn(3, 4)
            loss = ((z - target) ** 2).sum()
            loss.backward()
            gx, gps = closed_form_grads(model, z.detach(), x.detach(), 2 * (z.detach() - target))
            rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
            assert rel(x.grad, gx) <= 1e-8
            for p, g in zip(model.parameters(), gps):
                assert rel(p.grad, g) <= 1e-8
            assert sol.backward_nfe >= 2 and sol.backward_converged is True
        finally:
            torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("adjoint", ["gmres", "fixed_point", "anderson", "broyden"])
def test_adjoint_solvers_agree_with_long_unroll(adjoint):
    """Implicit gradient == backprop through 300 unrolled applications (fixed-depth mode)."""
    torch.manual_seed(1)
    model = DenseMap(5, 5).double()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    deq = DEQ(
        model,
        make_solver("anderson", tol=1e-13, max_steps=500),
        backward=ImplicitBackward(adjoint, tol=1e-13, max_steps=300),
    )
    z, _ = deq(x)
    (z.sin().sum()).backward()
    implicit = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad()
    with deq.fixed_depth_mode(300):
        z2, sol2 = deq(x)
    assert sol2.nfe == 300
    torch.testing.assert_close(z2, z, rtol=0, atol=1e-12)
    (z2.sin().sum()).backward()
    unrolled = [x.grad] + [p.grad for p in model.parameters()]
    for a, b in zip(implicit, unrolled):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "solver",
    [
        DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-13, max_steps=500),
        # the explicit stepper's error control keeps the residual near its abstol: terminate 100x above it
        ContinuousDEQSolver(
            "tsit5", mode="abs_norm", ode_abstol=1e-12, ode_reltol=1e-12, abstol_termination=1e-10, max_steps=3000
        ),
    ],
    ids=["anderson", "tsit5"],
)
def test_gradcheck(solver):
    torch.manual_seed(2)
    model = DenseMap(3, 2).double()
    deq = DEQ(model, solver, backward=ImplicitBackward(tol=1e-13, max_steps=100), z_shape=(3,))
    x = torch.randn(1, 2, dtype=torch.float64, requires_grad=True)
    bias = model.wz.bias  # a parameter of the map, perturbed in place by gradcheck
    assert torch.autograd.gradcheck(lambda x_, b_: deq(x_)[0], (x, bias), eps=1e-4, atol=1e-6, rtol=1e-4)


def test_output_equals_solver_iterate_exactly():
    torch.manual_seed(3)
    model = DenseMap(4)
    deq = DEQ(model, make_solver("broyden", tol=1e-5))
    x = torch.randn(2, 4)
    z, sol = deq(x)
    assert torch.equal(z, sol.solver_result.z)
    assert z.requires_grad


def test_jfb_and_phantom_gradients():
    torch.manual_seed(4)
    model = DenseMap(4).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    solver = make_solver("anderson", tol=1e-12, max_steps=500)
    results = {}
    for name, mode in [
        ("implicit", ImplicitBackward(tol=1e-12)),
        ("jfb", JacobianFreeBackward()),
        ("phantom", PhantomGradient(steps=60, damping=1.0)),
        ("phantom_damped", PhantomGradient(steps=5, damping=0.5)),
    ]:
        deq = DEQ(model, solver, backward=mode)
        x.grad = None
        z, sol = deq(x)
        z.pow(2).sum().backward()
        results[name] = x.grad.clone()
        if name == "jfb":
            assert sol.backward_nfe == 1
        if name == "phantom_damped":
            assert sol.backward_nfe == 5
    # JFB: one application of f at z*: dL/dx = (dL/dz)^T df/dx
    zs = z.detach()
    xx = x.detach().requires_grad_()
    (expected_jfb,) = torch.autograd.grad(model(zs, xx), xx, 2 * zs)
    torch.testing.assert_close(results["jfb"], expected_jfb)
    # many undamped phantom steps converge to the implicit gradient
    torch.testing.assert_close(results["phantom"], results["implicit"], rtol=1e-7, atol=1e-9)
    cos = torch.nn.functional.cosine_similarity(results["phantom_damped"].flatten(), results["implicit"].flatten(), 0)
    assert cos > 0.9


def test_backward_with_weight_norm_and_dropout_matches_unroll():
    """Stateful modules: the backward re-uses the forward's dropout mask and normalised weight."""

    class Map(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = WeightNorm(nn.Linear(6, 6))
            self.drop = VariationalHiddenDropout(0.3)
            self.inj = nn.Linear(6, 6)
            with torch.no_grad():
                self.lin.weight_g.mul_(0.3)

        def forward(self, z, x):
            return torch.tanh(self.drop(self.lin(z)) + self.inj(x))

    torch.manual_seed(5)
    model = Map().double().train()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    deq = DEQ(
        model, make_solver("anderson", tol=1e-13, max_steps=500), backward=ImplicitBackward(tol=1e-13, max_steps=200)
    )
    torch.manual_seed(10)
    z, sol = deq(x)
    assert sol.abs_residual.max() < 1e-11  # a fixed point exists only if the mask is fixed during the solve
    z.sum().backward()
    implicit = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad()
    torch.manual_seed(10)  # same RNG state -> same mask in the unrolled run
    with deq.fixed_depth_mode(200):
        z2, _ = deq(x)
    torch.testing.assert_close(z2, z, rtol=0, atol=1e-10)
    z2.sum().backward()
    unrolled = [x.grad] + [p.grad for p in model.parameters()]
    for a, b in zip(implicit, unrolled):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_backward_after_another_forward_uses_its_own_state():
    """Two forwards, then both backwards: each backward re-installs its own dropout mask."""
    torch.manual_seed(6)

    class Map(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = DenseMap(4)
            self.drop = VariationalHiddenDropout(0.5, spatial=False)

        def forward(self, z, x):
            return self.drop(self.inner(z, x))

    model = Map().double().train()
    deq = DEQ(model, make_solver("anderson", tol=1e-13, max_steps=300), backward=ImplicitBackward(tol=1e-13))
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(11)
    z1, _ = deq(x)
    z1.sum().backward()
    g_alone = x.grad.clone()
    x.grad = None
    torch.manual_seed(11)
    z1b, _ = deq(x)  # same mask as z1
    z2, _ = deq(x)  # a different mask
    assert not torch.equal(z1b, z2)
    z1b.sum().backward()
    torch.testing.assert_close(x.grad, g_alone, rtol=1e-10, atol=1e-12)


def test_no_grad_forward_builds_nothing():
    model = DenseMap(4)
    deq = DEQ(model, make_solver("anderson", tol=1e-5))
    with torch.no_grad():
        z, sol = deq(torch.randn(2, 4))
    assert not z.requires_grad and sol.jacobian_loss.item() == 0.0


def test_foreign_parameter_warns():
    torch.manual_seed(7)
    outside = nn.Parameter(torch.randn(4))

    class Map(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = DenseMap(4)

        def forward(self, z, x):
            return self.inner(z, x) + 0.1 * outside

    deq = DEQ(Map(), make_solver("anderson", tol=1e-6))
    z, _ = deq(torch.randn(2, 4))
    with pytest.warns(RuntimeWarning, match="not parameters"):
        z.sum().backward()
