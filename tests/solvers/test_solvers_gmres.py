"""Batched matrix-free GMRES against ``torch.linalg.solve``."""
import pytest
import torch

from deqlab.solvers import GMRESInfo, gmres

F64 = torch.float64


def _system(B, N, seed=0, spread=0.8, dtype=F64):
    """Per-sample ``A = 2 I + R`` with ``||R|| = spread`` (positive definite symmetric part, so restarted
    GMRES converges) and a random right-hand side."""
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(B, N, N, dtype=F64, generator=g)
    R = R * (spread / torch.linalg.matrix_norm(R, ord=2)).view(B, 1, 1)
    A = (2 * torch.eye(N, dtype=F64) + R).to(dtype)
    b = torch.randn(B, N, dtype=F64, generator=g).to(dtype)
    calls = [0]

    def matvec(v):
        calls[0] += 1
        return torch.bmm(A, v.unsqueeze(2)).squeeze(2)

    return A, b, matvec, calls


def _true_rel_residual(A, b, x):
    r = b - torch.bmm(A, x.unsqueeze(2)).squeeze(2)
    return torch.linalg.vector_norm(r, dim=1) / torch.linalg.vector_norm(b, dim=1)


def test_batched_solve_matches_linear_solve():
    A, b, matvec, calls = _system(4, 12)
    x, info = gmres(matvec, b, tol=1e-12, restart=12, max_restarts=2)
    ref = torch.linalg.solve(A, b)
    torch.testing.assert_close(x, ref, rtol=1e-9, atol=1e-10)
    assert isinstance(info, GMRESInfo)
    assert info.converged.all()
    assert info.matvecs == calls[0]
    # The reported per-sample residual is the true relative residual.
    torch.testing.assert_close(info.residual, _true_rel_residual(A, b, x), rtol=1e-6, atol=1e-15)
    assert (info.residual <= 1e-12 * (1 + 1e-6)).all()


def test_each_sample_is_its_own_system():
    # Solving the batch together equals solving each sample alone.
    A, b, matvec, _ = _system(3, 6, seed=1)
    x, _ = gmres(matvec, b, tol=1e-12, restart=6, max_restarts=2)
    for i in range(3):
        xi, _ = gmres(lambda v: v @ A[i].T, b[i:i + 1], tol=1e-12, restart=6, max_restarts=2)
        torch.testing.assert_close(x[i:i + 1], xi, rtol=1e-9, atol=1e-11)


def test_zero_right_hand_side():
    A, b, matvec, calls = _system(3, 5, seed=2)
    x, info = gmres(matvec, torch.zeros_like(b))
    assert torch.equal(x, torch.zeros_like(b))
    assert info.matvecs == 0 == calls[0] and info.iterations == 0
    assert info.converged.all()
    # Mixed batch: the zero sample stays exactly zero, the others are solved.
    b2 = b.clone()
    b2[1] = 0
    x, info = gmres(matvec, b2, tol=1e-12, restart=5, max_restarts=3)
    assert torch.equal(x[1], torch.zeros(5, dtype=F64))
    torch.testing.assert_close(x, torch.linalg.solve(A, b2), rtol=1e-9, atol=1e-10)
    assert info.converged.all()


def test_restarts_reach_the_tolerance():
    # Krylov dimension 3 for a 30-dimensional system: only restarts can reach 1e-10.
    A, b, matvec, calls = _system(2, 30, seed=3)
    x1, info1 = gmres(matvec, b, tol=1e-10, restart=3, max_restarts=1)
    assert not info1.converged.any()
    assert info1.iterations == 3 and info1.matvecs == 3  # the last cycle reports its least-squares residual
    torch.testing.assert_close(info1.residual, _true_rel_residual(A, b, x1), rtol=1e-6, atol=0)
    x, info = gmres(matvec, b, tol=1e-10, restart=3, max_restarts=200)
    assert info.converged.all()
    assert info.iterations > 3
    assert info.matvecs <= (3 + 1) * 200
    assert (_true_rel_residual(A, b, x) <= 1e-10 * (1 + 1e-6)).all()
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-9)
    # More restarts only help: each cycle does not increase the residual (GMRES is monotone).
    infos = [gmres(matvec, b, tol=1e-14, restart=3, max_restarts=k)[1] for k in (1, 2, 4, 8)]
    res = [float(i.residual.max()) for i in infos]
    assert all(a >= b_ for a, b_ in zip(res, res[1:]))
    assert res[-1] < res[0]
    # Cost: 3 Arnoldi products per cycle + 1 true residual before each restart (not after the last cycle).
    assert not infos[2].converged.any()
    assert [i.matvecs for i in infos[:3]] == [3, 7, 15]
    assert [i.iterations for i in infos[:3]] == [3, 6, 12]
    x0 = torch.zeros_like(b)
    assert gmres(matvec, b, x0=x0, tol=1e-14, restart=3, max_restarts=2)[1].matvecs == 8


def test_initial_guess_and_absolute_tolerance():
    A, b, matvec, calls = _system(2, 8, seed=4)
    ref = torch.linalg.solve(A, b)
    x, info = gmres(matvec, b, x0=ref, tol=1e-10)
    assert info.matvecs == 1 and info.iterations == 0  # only the initial residual
    torch.testing.assert_close(x, ref)
    # atol: a loose absolute target stops immediately when ||b|| is below it.
    x, info = gmres(matvec, 1e-9 * b, atol=1e-6)
    assert info.matvecs == 0 and info.converged.all()


def test_float32_and_singular_breakdown():
    A, b, matvec, _ = _system(3, 10, seed=5, dtype=torch.float32)
    x, info = gmres(matvec, b, tol=1e-5, restart=10, max_restarts=3)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.double(), torch.linalg.solve(A.double(), b.double()), rtol=1e-4, atol=1e-4)
    # An operator of rank 1 whose range contains b: the Krylov space breaks down after one step and the
    # solution is found without NaNs.
    u = torch.tensor([[1.0, 2.0, -1.0]], dtype=F64)
    x, info = gmres(lambda v: (v @ u.T) * u, 3.0 * u, tol=1e-10, restart=3)
    assert torch.isfinite(x).all()
    torch.testing.assert_close((x @ u.T) * u, 3.0 * u, rtol=1e-9, atol=1e-9)


def test_bad_arguments():
    _, b, matvec, _ = _system(2, 4)
    with pytest.raises(ValueError, match="B, N"):
        gmres(matvec, b[0])
    with pytest.raises(ValueError):
        gmres(matvec, b, restart=0)
    with pytest.raises(ValueError):
        gmres(matvec, b, max_restarts=0)
