"""Batched, matrix-free GMRES: each sample of the batch is its own linear system.

Used by Newton–Krylov (``J_g p = -g`` with Jacobian-vector products) and by the implicit backward
(``(I - J^T) g = v`` with vector-Jacobian products). Arnoldi with classical Gram–Schmidt applied twice
(two batched matmuls per step instead of a Python loop), the small least-squares problem solved with
``torch.linalg.lstsq`` at every step to read off the residual estimate, and restarts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor


@dataclass
class GMRESInfo:
    """What a GMRES call did: matrix-vector products, iterations, and per-sample relative residuals."""

    matvecs: int
    iterations: int
    residual: Tensor
    converged: Tensor


def _lstsq(H: Tensor, rhs: Tensor) -> Tensor:
    # CPU's default driver handles rank deficiency; CUDA only has 'gels' (H is kept full rank below).
    return torch.linalg.lstsq(H, rhs.unsqueeze(-1)).solution.squeeze(-1)


def gmres(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    x0: Optional[Tensor] = None,
    tol: float = 1e-6,
    atol: float = 0.0,
    restart: int = 20,
    max_restarts: int = 5,
) -> Tuple[Tensor, GMRESInfo]:
    """Solve ``A x = b`` per sample for ``b`` of shape ``(B, N)``.

    Args:
        matvec: maps a ``(B, N)`` batch of vectors to ``A`` applied to each of them.
        b: right-hand sides.
        x0: initial guess (zeros by default).
        tol: relative tolerance on ``||b - A x|| / ||b||`` per sample.
        atol: absolute tolerance, so a zero right-hand side needs no iteration.
        restart: Krylov subspace size per cycle.
        max_restarts: cycles at most; each cycle costs up to ``restart`` products, plus one for the true
            residual before each restart (one more with ``x0``); the last cycle reports its least-squares
            residual, which equals the true one in exact arithmetic.
    """
    if b.dim() != 2:
        raise ValueError(f"gmres expects b of shape (B, N), got {tuple(b.shape)}")
    if restart < 1 or max_restarts < 1:
        raise ValueError("restart and max_restarts must be >= 1")
    B, N = b.shape
    m = min(restart, N)
    tiny = torch.finfo(b.dtype).tiny ** 0.5
    b_norm = torch.linalg.vector_norm(b, dim=1)
    target = torch.maximum(tol * b_norm, torch.full_like(b_norm, atol))
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    matvecs = 0
    iterations = 0
    r = b - matvec(x) if x0 is not None else b.clone()
    matvecs += int(x0 is not None)
    beta = torch.linalg.vector_norm(r, dim=1)
    for cycle in range(max_restarts):
        if bool((beta <= target).all()):
            break
        # The basis grows on demand (most solves stop long before ``restart`` columns); only written
        # columns are ever read, so no zero fill is needed.
        cap = min(m, 8)
        V = b.new_empty(B, cap + 1, N)
        H = b.new_zeros(B, m + 1, m)
        V[:, 0] = r / beta.clamp_min(tiny).unsqueeze(1)
        e1 = b.new_zeros(B, m + 1)
        e1[:, 0] = beta
        y = None
        estimate_converged = False
        for j in range(m):
            if j + 1 > cap:
                cap = min(m, 2 * cap)
                V = torch.cat([V, b.new_empty(B, cap + 1 - V.shape[1], N)], dim=1)
            w = matvec(V[:, j])
            matvecs += 1
            iterations += 1
            basis = V[:, : j + 1]
            h = torch.bmm(basis, w.unsqueeze(2)).squeeze(2)
            w = w - torch.bmm(h.unsqueeze(1), basis).squeeze(1)
            h2 = torch.bmm(basis, w.unsqueeze(2)).squeeze(2)  # re-orthogonalise (CGS2)
            w = w - torch.bmm(h2.unsqueeze(1), basis).squeeze(1)
            h = h + h2
            w_norm = torch.linalg.vector_norm(w, dim=1)
            H[:, : j + 1, j] = h
            # A breakdown means the sample is solved exactly; a tiny subdiagonal keeps H full rank.
            H[:, j + 1, j] = w_norm.clamp_min(tiny)
            V[:, j + 1] = w / w_norm.clamp_min(tiny).unsqueeze(1)
            Hj = H[:, : j + 2, : j + 1]
            y = _lstsq(Hj, e1[:, : j + 2])
            res_est = torch.linalg.vector_norm(e1[:, : j + 2] - torch.bmm(Hj, y.unsqueeze(2)).squeeze(2), dim=1)
            if bool((res_est <= target).all()):
                estimate_converged = True
                break
        k = y.shape[1]
        x = x + torch.bmm(y.unsqueeze(1), V[:, :k]).squeeze(1)
        if estimate_converged or cycle == max_restarts - 1:
            # The least-squares residual is GMRES's residual in exact arithmetic; recomputing the true
            # one would cost a matvec that only a restart needs.
            beta = res_est
            break
        r = b - matvec(x)
        matvecs += 1
        beta = torch.linalg.vector_norm(r, dim=1)
    converged = beta <= target * (1 + 1e-6) + tiny
    rel = beta / b_norm.clamp_min(tiny)
    return x, GMRESInfo(matvecs=matvecs, iterations=iterations, residual=rel, converged=converged)
