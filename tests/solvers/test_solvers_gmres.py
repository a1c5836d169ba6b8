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
        xi, _ = gmres(lambda v, i=i: v @ A[i].T, b[i : i + 1], tol=1e-12, restart=6, max_restarts=2)
        torch.testing.assert_close(x[i : i + 1], xi, rtol=1e-9, atol=1e-11)


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


def test_a_sample_stops_at_its_tolerance_whatever_the_rest_of_the_batch():
    # Sample 0 is easy (spread 0.1), the others hard (spread 1.8) or NaN: sample 0's solution is the one it
    # gets alone, to rounding. Old: GMRES iterated every sample until the last met its tolerance, so sample
    # 0 came back solved to 1e-12 instead of 1e-4 next to a hard sample (and never stopped next to a NaN one).
    A, b, _, _ = _system(3, 16, seed=4, spread=1.8)
    A0, b0, _, _ = _system(1, 16, seed=5, spread=0.1)
    A[0], b[0] = A0[0], b0[0]
    mv = lambda M: lambda v: torch.bmm(M, v.unsqueeze(2)).squeeze(2)  # noqa: E731
    alone, info_alone = gmres(mv(A[:1]), b[:1], tol=1e-4, restart=16, max_restarts=1)
    Anan, bnan = A.clone(), b.clone()
    bnan[2] = float("nan")
    for M, rhs in ((A, b), (Anan, bnan)):
        x, info = gmres(mv(M), rhs, tol=1e-4, restart=16, max_restarts=1)
        torch.testing.assert_close(x[:1], alone, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(info.residual[:1], info_alone.residual, rtol=1e-12, atol=0)
        assert info.matvecs > info_alone.matvecs  # the others went on
    assert float(info_alone.residual[0]) > 1e-8  # stopped near its tolerance, not solved to rounding


def test_per_sample_tolerances():
    A, b, matvec, _ = _system(3, 10, seed=6)
    tol = torch.tensor([1e-2, 1e-6, 1e-10], dtype=F64)
    x, info = gmres(matvec, b, tol=tol, restart=10, max_restarts=1)
    assert info.converged.all()
    true = _true_rel_residual(A, b, x)
    assert (true <= tol * 1.01).all() and float(true[0]) > 1e-6  # each sample stopped at its own tolerance
    for i in range(3):  # ... as it would alone
        xi, _ = gmres(lambda v, i=i: v @ A[i].T, b[i : i + 1], tol=float(tol[i]), restart=10, max_restarts=1)
        torch.testing.assert_close(x[i : i + 1], xi, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="one entry per sample"):
        gmres(matvec, b, tol=torch.ones(2, dtype=F64))
