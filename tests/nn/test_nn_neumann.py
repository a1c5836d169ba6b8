"""NeumannPhantomGradient: the truncated Neumann series of the adjoint, against dense linear algebra."""

import pytest
import torch

from deqlab_nn_helpers import DenseMap, make_solver

from deqlab.nn import DEQ, EquilibriumProblem, ImplicitBackward, NeumannPhantomGradient, ZeroGuess


def _linear_problem(W, U, x, z_star):
    return EquilibriumProblem(
        f=lambda z, xx: z @ W.T + xx @ U.T,
        is_list=False,
        z_star=[z_star],
        x=x,
        params=[],
        grad_state=[],
        needs=[True],
        forward_tol=1e-12,
        stateful=[],
        snapshots=[],
        grad_slots=[],
    )


@pytest.mark.parametrize("steps,damping", [(1, 1.0), (2, 1.0), (5, 1.0), (7, 0.6)])
def test_gradient_is_the_truncated_series(steps, damping):
    gen = torch.Generator().manual_seed(0)
    n, m, b = 6, 3, 4
    W = torch.randn(n, n, dtype=torch.float64, generator=gen) / 3
    U = torch.randn(n, m, dtype=torch.float64, generator=gen)
    x = torch.randn(b, m, dtype=torch.float64, generator=gen)
    v = torch.randn(b, n, dtype=torch.float64, generator=gen)
    z_star = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - W, (x @ U.T).T).T
    result = NeumannPhantomGradient(steps, damping).gradients(_linear_problem(W, U, x, z_star), v)
    A = (1 - damping) * torch.eye(n, dtype=torch.float64) + damping * W  # J = W for row states z Wᵀ
    series = damping * sum(torch.linalg.matrix_power(A, i) for i in range(steps))
    want = v @ series @ U  # row form of Uᵀ (Σ (Aᵀ)ⁱ) v
    assert (result.grads[0] - want).abs().max() <= 1e-10
    assert result.nfe == steps and result.converged is None


def test_tends_to_the_implicit_gradient_for_a_contraction():
    torch.manual_seed(0)
    model = DenseMap(5, 3).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    solver = make_solver("anderson", tol=1e-13, max_steps=500)

    def grads(backward):
        z, _ = DEQ(model, solver, backward=backward, init=ZeroGuess(shape=(5,)))(x)
        return torch.autograd.grad((z**2).sum(), [x, *model.parameters()])

    exact = grads(ImplicitBackward(tol=1e-13, max_steps=50))
    errors = []
    for k in (1, 2, 4, 8, 40):
        approx = grads(NeumannPhantomGradient(k))
        errors.append(max(float((a - e).abs().max()) for a, e in zip(approx, exact)))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-10


def test_layer_records_cost_and_rejects_bad_arguments():
    torch.manual_seed(0)
    deq = DEQ(DenseMap(4), make_solver("anderson"), backward=NeumannPhantomGradient(steps=3))
    z, sol = deq(torch.randn(2, 4, requires_grad=True))
    z.sum().backward()
    assert sol.backward_nfe == 3 and sol.backward_converged is None
    for bad in (dict(steps=0), dict(damping=0.0), dict(damping=1.5)):
        with pytest.raises(ValueError):
            NeumannPhantomGradient(**bad)
