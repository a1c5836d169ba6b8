"""deqlab.nn.spectral_radius against dense eigenvalues, and the layer's opt-in solution.spectral_radius."""

import pytest
import torch

from deqlab_nn_helpers import DenseMap, make_solver

from deqlab.nn import DEQ, spectral_radius


def _batched_linear(A):
    return lambda z: torch.einsum("bij,bj->bi", A, z)


def test_arnoldi_matches_eigvals_of_per_sample_matrices():
    torch.manual_seed(0)
    A = torch.randn(5, 6, 6, dtype=torch.float64) / 2  # a different matrix per sample
    want = torch.linalg.eigvals(A).abs().amax(dim=1)
    got = spectral_radius(_batched_linear(A), torch.zeros(5, 6, dtype=torch.float64), n_iters=6)
    assert got.shape == (5,)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_complex_and_negative_dominant_eigenvalues():
    # sample 0: dominant pair 0.9 e^{±iπ/3} (complex); sample 1: dominant eigenvalue -0.95 (negative)
    c, s = 0.9 * torch.cos(torch.tensor(torch.pi / 3)), 0.9 * torch.sin(torch.tensor(torch.pi / 3))
    rot = torch.zeros(4, 4, dtype=torch.float64)
    rot[:2, :2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    rot[2, 2], rot[3, 3] = 0.5, -0.3
    neg = torch.diag(torch.tensor([-0.95, 0.6, 0.2, -0.1], dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    A = torch.stack([q @ rot @ q.T, q @ neg @ q.T])
    want = torch.linalg.eigvals(A).abs().amax(dim=1)
    torch.testing.assert_close(want, torch.tensor([0.9, 0.95], dtype=torch.float64))
    fn, z = _batched_linear(A), torch.zeros(2, 4, dtype=torch.float64)
    # Arnoldi: the modulus of the dominant (complex or negative) eigenvalue, exactly
    torch.testing.assert_close(spectral_radius(fn, z, n_iters=4), want, rtol=1e-9, atol=1e-12)
    # power method: |λ| as a growth rate; converges for the complex pair too, only slower
    power = spectral_radius(fn, z, n_iters=400, method="power")
    torch.testing.assert_close(power, want, rtol=2e-2, atol=0)


def test_nonlinear_map_matches_dense_jacobian_and_list_states():
    torch.manual_seed(0)
    f = DenseMap(5, 3).double()
    x = torch.randn(3, 3, dtype=torch.float64)
    z = torch.randn(3, 5, dtype=torch.float64)
    jac = torch.stack(
        [torch.autograd.functional.jacobian(lambda zz, i=i: f(zz[None], x[i : i + 1])[0], z[i]) for i in range(3)]
    )
    want = torch.linalg.eigvals(jac).abs().amax(dim=1)
    torch.testing.assert_close(spectral_radius(lambda zz: f(zz, x), z, n_iters=5), want)
    # a list state: two halves of the same vector
    got = spectral_radius(lambda p: list(f(torch.cat(p, 1), x).split([2, 3], 1)), list(z.split([2, 3], 1)), n_iters=5)
    torch.testing.assert_close(got, want)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_iters"):
        spectral_radius(lambda z: z, torch.zeros(1, 2), n_iters=0)
    with pytest.raises(ValueError, match="method"):
        spectral_radius(lambda z: z, torch.zeros(1, 2), method="qr")
    with pytest.raises(ValueError, match="spectral_radius"):
        DEQ(DenseMap(2), make_solver("anderson"), spectral_radius="sometimes")


def test_layer_fills_solution_spectral_radius_by_mode():
    torch.manual_seed(0)
    model = DenseMap(5).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    off = DEQ(model, make_solver("anderson", tol=1e-10))
    assert off(x)[1].spectral_radius is None
    deq = DEQ(model, make_solver("anderson", tol=1e-10), spectral_radius=True, spectral_radius_iters=5)
    assert deq.spectral_radius_mode == "eval"
    assert deq.train()(x)[1].spectral_radius is None  # "eval": not while training
    z, sol = deq.eval()(x)
    want = spectral_radius(lambda zz: model(zz, x), z.detach(), n_iters=5)
    assert sol.spectral_radius.shape == (4,) and not sol.spectral_radius.requires_grad
    torch.testing.assert_close(sol.spectral_radius, want)
    assert bool((sol.spectral_radius < 1).all())  # DenseMap is a contraction
    always = DEQ(model, make_solver("anderson", tol=1e-10), spectral_radius="always", spectral_radius_iters=5)
    assert always.train()(x)[1].spectral_radius.shape == (4,)
    with always.fixed_depth_mode(3):
        assert always(x)[1].spectral_radius.shape == (4,)
