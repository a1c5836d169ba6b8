"""Batched, matrix-free GMRES: each sample of the batch is its own linear system.

Used by Newton–Krylov (``J_g p = -g`` with Jacobian-vector products) and by the implicit backward
(``(I - J^T) g = v`` with vector-Jacobian products). Arnoldi with classical Gram–Schmidt (batched
matmuls instead of a Python loop), repeated when it cancels most of the new vector; an incremental
Givens QR of the Hessenberg matrix that gives the residual after every step for a few small tensor
operations (one triangular solve per cycle); restarts.
"""
from __future__ import annotations

import math
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
    for name, value in (("restart", restart), ("max_restarts", max_restarts)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"gmres: {name} must be an int >= 1, got {value!r}")
    for name, value in (("tol", tol), ("atol", atol)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(f"gmres: {name} must be a finite number >= 0, got {value!r}")
    if b.dtype in (torch.float16, torch.bfloat16):
        # Half precision: the Arnoldi basis, the Givens QR and the triangular solve run in float32 (CPU
        # has no half-precision triangular solve, and 8 mantissa bits cannot keep a basis orthogonal);
        # matvec still sees vectors of b's dtype, and x comes back in it.
        half = b.dtype

        def matvec32(v: Tensor) -> Tensor:
            return matvec(v.to(half)).float()

        x32, info = gmres(matvec32, b.float(), x0=None if x0 is None else x0.float(), tol=tol, atol=atol,
                          restart=restart, max_restarts=max_restarts)
        return x32.to(half), info
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
        V[:, 0] = r / beta.clamp_min(tiny).unsqueeze(1)
        # Incremental QR of the Hessenberg matrix: Qt accumulates the Givens rotations, R is its upper
        # triangle and g = Qt (beta e1). |g[j+1]| is the residual after step j, so no least-squares solve is
        # needed until the cycle ends.
        Qt = torch.eye(m + 1, dtype=b.dtype, device=b.device).repeat(B, 1, 1)
        R = b.new_zeros(B, m, m)
        g = b.new_zeros(B, m + 1)
        g[:, 0] = beta
        k = 0
        estimate_converged = False
        for j in range(m):
            if j + 1 > cap:
                cap = min(m, 2 * cap)
                V = torch.cat([V, b.new_empty(B, cap + 1 - V.shape[1], N)], dim=1)
            w = matvec(V[:, j])
            matvecs += 1
            iterations += 1
            basis = V[:, : j + 1]
            w_in = torch.linalg.vector_norm(w, dim=1)
            h = torch.bmm(w.unsqueeze(1), basis.transpose(1, 2)).squeeze(1)  # (B,1,N)x(B,N,k): the fast bmm path
            w = w - torch.bmm(h.unsqueeze(1), basis).squeeze(1)
            w_norm = torch.linalg.vector_norm(w, dim=1)
            # Classical Gram-Schmidt, repeated only when it cancelled much of w (the DGKS criterion), where
            # one pass loses orthogonality; most steps then read the basis twice instead of four times.
            if bool((w_norm < 0.7 * w_in).any()):
                h2 = torch.bmm(w.unsqueeze(1), basis.transpose(1, 2)).squeeze(1)
                w = w - torch.bmm(h2.unsqueeze(1), basis).squeeze(1)
                h = h + h2
                w_norm = torch.linalg.vector_norm(w, dim=1)
            # A breakdown means the sample is solved exactly; a tiny subdiagonal keeps R invertible.
            w_norm = w_norm.clamp_min(tiny)
            V[:, j + 1] = w / w_norm.unsqueeze(1)
            col = torch.bmm(Qt[:, : j + 1, : j + 1], h.unsqueeze(2)).squeeze(2)  # earlier rotations
            a, c_ = col[:, j], w_norm
            rho = torch.hypot(a, c_)
            cs, sn = a / rho, c_ / rho
            R[:, : j, j] = col[:, :j]
            R[:, j, j] = rho
            q_j, q_n = Qt[:, j, : j + 2].clone(), Qt[:, j + 1, : j + 2].clone()
            Qt[:, j, : j + 2] = cs.unsqueeze(1) * q_j + sn.unsqueeze(1) * q_n
            Qt[:, j + 1, : j + 2] = cs.unsqueeze(1) * q_n - sn.unsqueeze(1) * q_j
            g_j = g[:, j].clone()
            g[:, j] = cs * g_j
            g[:, j + 1] = -sn * g_j
            k = j + 1
            res_est = g[:, j + 1].abs()
            if bool((res_est <= target).all()):
                estimate_converged = True
                break
        y = torch.linalg.solve_triangular(R[:, :k, :k], g[:, :k].unsqueeze(2), upper=True).squeeze(2)
        x = x + torch.bmm(y.unsqueeze(1), V[:, :k]).squeeze(1)
        if estimate_converged or cycle == max_restarts - 1:
            # The rotated residual is GMRES's residual in exact arithmetic; recomputing the true one
            # would cost a matvec that only a restart needs.
            beta = res_est
            break
        r = b - matvec(x)
        matvecs += 1
        beta = torch.linalg.vector_norm(r, dim=1)
    converged = beta <= target * (1 + 1e-6) + tiny
    rel = beta / b_norm.clamp_min(tiny)
    return x, GMRESInfo(matvecs=matvecs, iterations=iterations, residual=rel, converged=converged)
