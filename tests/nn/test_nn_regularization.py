"""Hutchinson estimate of ||df/dz||_F^2."""

import torch

from deqlab_nn_helpers import ConvMap, DenseMap, make_solver

from deqlab.nn import DEQ, ZeroGuess, jacobian_frobenius_estimate


def dense_frobenius(model, z, x):
    total = 0.0
    for b in range(z.shape[0]):
        J = torch.autograd.functional.jacobian(lambda zz, b=b: model(zz[None], x[b : b + 1])[0], z[b])
        total += float(J.pow(2).sum())
    return total


def test_estimate_matches_dense_jacobian():
    torch.manual_seed(0)
    model = ConvMap(2, 1).double()
    z = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 1, 3, 3, dtype=torch.float64)  # x differs from z in shape
    exact = dense_frobenius(model, z.detach(), x)
    est = jacobian_frobenius_estimate(model(z, x), z, n_probes=4000, normalize="none", create_graph=False)
    assert abs(float(est) - exact) / exact < 0.05
    per_elem = jacobian_frobenius_estimate(model(z, x), z, n_probes=4000, normalize="element", create_graph=False)
    assert abs(float(per_elem) - exact / z.numel()) / (exact / z.numel()) < 0.05
    per_sample = jacobian_frobenius_estimate(model(z, x), z, n_probes=4000, normalize="sample", create_graph=False)
    assert abs(float(per_sample) - exact / 2) / (exact / 2) < 0.05


def test_layer_jacobian_loss_is_differentiable_and_correct():
    torch.manual_seed(1)
    model = DenseMap(5, 3).double()
    deq = DEQ(
        model,
        make_solver("anderson", tol=1e-10),
        jacobian_regularization=True,
        jacobian_probes=3000,
        init=ZeroGuess(shape=(5,)),
    )
    x = torch.randn(2, 3, dtype=torch.float64)
    z, sol = deq(x)
    exact = dense_frobenius(model, z.detach(), x) / z.numel()
    assert abs(sol.jacobian_loss.item() - exact) / exact < 0.05
    assert sol.jacobian_loss >= 0
    deq.jacobian_probes = 1
    z, sol = deq(x)
    model.zero_grad()
    sol.jacobian_loss.backward()
    assert model.wz.weight.grad.abs().sum() > 0


def test_jacobian_loss_off_is_zero_scalar():
    deq = DEQ(DenseMap(3), make_solver("anderson", tol=1e-5))
    _, sol = deq(torch.randn(2, 3))
    assert sol.jacobian_loss.shape == () and sol.jacobian_loss.item() == 0.0


def test_custom_probes_and_keeping_the_graph_for_a_later_backward():
    # probe= draws the probes (here the all-ones vector: the estimate is then exact for a diagonal J),
    # retain_graph=True keeps fz's graph after a monitoring-only estimate
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    fz = 0.5 * z**2
    est = jacobian_frobenius_estimate(fz, z, create_graph=False, retain_graph=True, probe=torch.ones_like)
    torch.testing.assert_close(est, z.detach().square().sum() / z.numel())  # (dfz/dz)_ii = z_i
    fz.sum().backward()  # the graph is still there
    torch.testing.assert_close(z.grad, z.detach())
    fz2 = 0.5 * z**2
    jacobian_frobenius_estimate(fz2, z, create_graph=False)
    try:
        fz2.sum().backward()
    except RuntimeError as e:
        assert "backward through the graph a second time" in str(e)
    else:
        raise AssertionError("the default frees the graph of a monitoring-only estimate")
