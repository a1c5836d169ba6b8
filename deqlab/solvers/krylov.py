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
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from deqlab.solvers.compiled import CompileOption


@dataclass
class GMRESInfo:
    """What a GMRES call did: matrix-vector products, iterations, and per-sample relative residuals.

    Attributes:
        matvecs: matrix-vector products spent, including the true-residual products between restarts.
        iterations: Arnoldi steps over all cycles (one product each).
        residual: per-sample relative residual ``||b - A x|| / ||b||``, shape ``(B,)``.
        converged: per-sample bool mask: the residual met ``max(tol * ||b||, atol)``.

    Example:
        >>> import torch
        >>> from deqlab.solvers import gmres
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> _, info = gmres(lambda v: v @ A.T, torch.tensor([[1.0, 2.0]], dtype=torch.float64))
        >>> info.matvecs, info.iterations, info.converged.tolist(), bool(info.residual.max() < 1e-12)
        (2, 2, [True], True)
    """

    matvecs: int
    iterations: int
    residual: Tensor
    converged: Tensor


def gmres(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    x0: Optional[Tensor] = None,
    tol: Union[float, Tensor] = 1e-6,
    atol: float = 0.0,
    restart: int = 20,
    max_restarts: int = 5,
    compile: CompileOption = False,
) -> Tuple[Tensor, GMRESInfo]:
    """Solve ``A x = b`` per sample for ``b`` of shape ``(B, N)``.

    Each sample is its own system ``A_i x_i = b_i`` (``matvec`` applies every sample's operator at once);
    the loop runs until every sample meets its tolerance or the budget is spent. A sample that meets its
    tolerance stops there: its iterate is frozen while the others go on, so its solution does not depend
    on the rest of the batch (up to rounding), provided ``matvec`` treats samples independently. ``A``
    need not be symmetric or definite. float16/bfloat16 systems are solved in float32 and ``x`` is cast
    back.

    Args:
        matvec: maps a ``(B, N)`` batch of vectors to ``A`` applied to each of them.
        b: right-hand sides, ``(B, N)``.
        x0: initial guess; ``None`` (default) starts from zeros, which saves the product that the
            initial residual ``b - A x0`` would cost.
        tol: relative tolerance on ``||b - A x|| / ||b||`` per sample: a number, or a ``(B,)`` tensor of
            one tolerance per sample (Newton–Krylov's per-sample forcing terms). Default ``1e-6``: far
            below the forward solve's usual tolerance (``1e-3``), so the solution's error is not what
            limits a gradient or a Newton step, at a few products more than a loose one.
        atol: absolute tolerance; a sample stops when its residual is below ``max(tol * ||b||, atol)``.
            Default ``0.0``: purely relative (a zero right-hand side needs no iteration either way); a
            positive value spares near-zero right-hand sides from being solved to rounding level.
        restart: Krylov subspace size per cycle. Default 20: a basis of 21 vectors of size ``N`` per
            sample, which most DEQ systems do not fill before converging; larger bases converge in
            fewer products but cost memory and orthogonalisation work that grow with the size.
        max_restarts: cycles at most; each cycle costs up to ``restart`` products, plus one for the true
            residual before each restart (one more with ``x0``); the last cycle reports its least-squares
            residual, which equals the true one in exact arithmetic. Default 5: a hard cap of about 100
            products with the default ``restart``.
        compile: run each Arnoldi step's algebra (the Gram–Schmidt passes, the Givens rotation, the
            residual estimate and the stop test) as one graph compiled by ``torch.compile(fullgraph=True)``;
            the products ``matvec`` stay eager (a VJP through a retained autograd graph cannot be traced).
            ``False`` (default) eager; ``True`` inductor; a string or callable another backend. The basis is
            then allocated at its full size (``restart + 1`` vectors) instead of growing on demand. Results
            and product counts equal the eager ones up to rounding; a backend that fails warns once
            (`CompileFallbackWarning`) and the solve runs eager.

    Returns:
        A tuple ``(x, info)``: the ``(B, N)`` solution in ``b``'s dtype, and a [`GMRESInfo`][deqlab.solvers.GMRESInfo] with the
        products spent and the per-sample relative residuals and convergence mask. A sample that did not
        converge still returns its best least-squares iterate.

    Raises:
        ValueError: ``b`` is not 2-dimensional, ``restart`` or ``max_restarts`` is not an int >= 1, or
            ``tol`` (a number) or ``atol`` is not a finite number >= 0, or a tensor ``tol`` is not of shape ``(B,)``.

    Example:
        >>> import torch
        >>> from deqlab.solvers import gmres
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)   # x = (0.2, 0.6) for b = (1, 2)
        >>> b = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)   # two samples, one trivial
        >>> x, info = gmres(lambda v: v @ A.T, b, tol=1e-10)
        >>> x
        tensor([[0.2000, 0.6000],
                [0.0000, 0.0000]], dtype=torch.float64)
        >>> info.matvecs, info.converged.tolist()
        (2, [True, True])
    """
    if b.dim() != 2:
        raise ValueError(f"gmres expects b of shape (B, N), got {tuple(b.shape)}")
    for name, value in (("restart", restart), ("max_restarts", max_restarts)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"gmres: {name} must be an int >= 1, got {value!r}")
    if isinstance(tol, Tensor):  # per-sample tolerances (values are the caller's: no host sync to check them)
        if tol.shape not in ((), (b.shape[0],)):
            raise ValueError(
                f"gmres: a tensor tol must have one entry per sample, shape ({b.shape[0]},), got {tuple(tol.shape)}"
            )
        tol = tol.to(torch.float32 if b.dtype in (torch.float16, torch.bfloat16) else b.dtype)
    for name, given in (("tol", tol), ("atol", atol)):
        if isinstance(given, Tensor):
            continue
        if not isinstance(given, (int, float)) or isinstance(given, bool) or not math.isfinite(given) or given < 0:
            raise ValueError(f"gmres: {name} must be a finite number >= 0, got {given!r}")
    if b.dtype in (torch.float16, torch.bfloat16):
        # Half precision: the Arnoldi basis, the Givens QR and the triangular solve run in float32 (CPU
        # has no half-precision triangular solve, and 8 mantissa bits cannot keep a basis orthogonal);
        # matvec still sees vectors of b's dtype, and x comes back in it.
        half = b.dtype

        def matvec32(v: Tensor) -> Tensor:
            return matvec(v.to(half)).float()

        x32, info = gmres(
            matvec32,
            b.float(),
            x0=None if x0 is None else x0.float(),
            tol=tol,
            atol=atol,
            restart=restart,
            max_restarts=max_restarts,
            compile=compile,
        )
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
    # Every sample is its own system and stops on its own: once its residual meets its target, its
    # iterate is frozen (its later Arnoldi columns are zero and never used), so its solution does not
    # depend on how long the other samples of the batch iterate. finished: met the target in a cycle.
    finished = torch.zeros(B, dtype=torch.bool, device=b.device)
    final = beta.clone()  # the residual each finished sample stopped at
    step = _compiled_arnoldi(compile) if compile is not False else None
    for cycle in range(max_restarts):
        done = finished | (beta <= target)
        if bool(done.all()):
            break
        # The basis grows on demand (most solves stop long before ``restart`` columns); only written
        # columns are ever read, so no zero fill is needed.
        cap = m if step is not None else min(m, 8)  # compiled: the full basis, written in place
        V = b.new_empty(B, cap + 1, N)  # only written columns are ever read
        V[:, 0] = torch.where(done.unsqueeze(1), torch.zeros_like(r), r / beta.clamp_min(tiny).unsqueeze(1))
        # Incremental QR of the Hessenberg matrix: Qt accumulates the Givens rotations, R is its upper
        # triangle and g = Qt (beta e1). |g[j+1]| is the residual after step j, so no least-squares solve is
        # needed until the cycle ends.
        Qt = torch.eye(m + 1, dtype=b.dtype, device=b.device).repeat(B, 1, 1)
        R = b.new_zeros(B, m, m)
        g = b.new_zeros(B, m + 1)
        g[:, 0] = beta
        used = torch.zeros(B, dtype=torch.long, device=b.device)  # Arnoldi columns each sample uses
        stopped_at = beta.clone()  # the residual estimate at which a sample stopped in this cycle
        k = 0
        if step is not None:
            ran = _arnoldi_compiled(step, compile, matvec, V, Qt, R, g, done, used, stopped_at, target, m)
            if isinstance(ran, int):  # the backend failed (warned once): its product counted, then eager
                step = None
                matvecs += ran
            else:
                V, Qt, R, g, done, used, stopped_at, k = ran
                matvecs += k
                iterations += k
        for j in range(m if step is None and k == 0 else 0):
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
            # Classical Gram-Schmidt, repeated only for the samples where it cancelled much of w (the DGKS
            # criterion), where one pass loses orthogonality; most steps then read the basis twice instead of
            # four times. Per sample, so a sample's basis does not depend on the others.
            again = w_norm < 0.7 * w_in
            if bool(again.any()):
                h2 = torch.bmm(w.unsqueeze(1), basis.transpose(1, 2)).squeeze(1)
                w2 = w - torch.bmm(h2.unsqueeze(1), basis).squeeze(1)
                w = torch.where(again.unsqueeze(1), w2, w)
                h = torch.where(again.unsqueeze(1), h + h2, h)
                w_norm = torch.linalg.vector_norm(w, dim=1)
            # A breakdown means the sample is solved exactly; a tiny subdiagonal keeps R invertible.
            w_norm = w_norm.clamp_min(tiny)
            col = torch.bmm(Qt[:, : j + 1, : j + 1], h.unsqueeze(2)).squeeze(2)  # earlier rotations
            a, c_ = col[:, j], w_norm
            rho = torch.hypot(a, c_)
            cs, sn = a / rho, c_ / rho
            R[:, :j, j] = col[:, :j]
            R[:, j, j] = rho
            q_j, q_n = Qt[:, j, : j + 2].clone(), Qt[:, j + 1, : j + 2].clone()
            Qt[:, j, : j + 2] = cs.unsqueeze(1) * q_j + sn.unsqueeze(1) * q_n
            Qt[:, j + 1, : j + 2] = cs.unsqueeze(1) * q_n - sn.unsqueeze(1) * q_j
            g_j = g[:, j].clone()
            g[:, j] = cs * g_j
            g[:, j + 1] = -sn * g_j
            k = j + 1
            res_est = g[:, j + 1].abs()
            running = ~done
            used = torch.where(running, torch.full_like(used, k), used)
            stopped_at = torch.where(running, res_est, stopped_at)
            done = done | (running & (res_est <= target))
            V[:, j + 1] = torch.where(done.unsqueeze(1), torch.zeros_like(w), w / w_norm.unsqueeze(1))
            if bool(done.all()):
                break
        # The least-squares solution of each sample from its own columns: a sample that stopped after
        # `used` columns solves that leading block (the rest of R is replaced by the identity, of g by 0).
        cols = torch.arange(k, device=b.device)
        keep = cols.unsqueeze(0) < used.unsqueeze(1)  # (B, k)
        Rk = torch.where(
            keep.unsqueeze(1) & keep.unsqueeze(2),
            R[:, :k, :k],
            torch.eye(k, dtype=b.dtype, device=b.device).expand(B, k, k),
        )
        gk = torch.where(keep, g[:, :k], torch.zeros_like(g[:, :k]))
        y = torch.linalg.solve_triangular(Rk, gk.unsqueeze(2), upper=True).squeeze(2)
        x = x + torch.bmm(y.unsqueeze(1), V[:, :k]).squeeze(1)
        newly = done & ~finished & (used > 0)
        final = torch.where(newly, stopped_at, final)
        finished = finished | newly
        if bool(done.all()) or cycle == max_restarts - 1:
            # The rotated residual is GMRES's residual in exact arithmetic; recomputing the true one
            # would cost a matvec that only a restart needs.
            beta = torch.where(finished, final, stopped_at)
            break
        r = b - matvec(x)
        matvecs += 1
        beta = torch.where(finished, final, torch.linalg.vector_norm(r, dim=1))
    converged = beta <= target * (1 + 1e-6) + tiny
    rel = beta / b_norm.clamp_min(tiny)
    return x, GMRESInfo(matvecs=matvecs, iterations=iterations, residual=rel, converged=converged)


_FAILED_BACKENDS: set = set()


def _compiled_arnoldi(backend: CompileOption) -> Optional[Callable[..., tuple]]:
    """The compiled Arnoldi step for ``backend``, or ``None`` when it failed before (then eager)."""
    from deqlab.solvers.compiled import cached_compile, check_compile_option, compile_available, unsupported

    check_compile_option("gmres", backend)
    key = "inductor" if backend is True else backend
    if key in _FAILED_BACKENDS:
        return None
    if not compile_available():
        _FAILED_BACKENDS.add(key)
        unsupported("gmres", "", stacklevel=4)
        return None
    return cached_compile("gmres.arnoldi", _arnoldi_step, backend)


def _arnoldi_step(w, V, Qt, R, g, done, used, stopped_at, target, j, j_t):
    """One Arnoldi step of `gmres`, as the eager loop's body without a host sync: ``w = A v_j``
    orthogonalised against the ``j + 1`` basis vectors written so far, the new Givens rotation, the residual
    estimate and each sample's stop.

    ``j`` is the host's step index, read through slices only (``V[:, : j + 1]``): the graph is specialised
    for ``j`` 0 and 1, then one graph with a symbolic ``j`` serves the rest, and the products cost what the
    eager loop's do (not the full basis). The writes go in place through ``index_copy_`` at the tensor
    ``j_t`` (= ``j``; an index computed from a symbolic ``j`` would guard on its value), so no buffer is
    copied. The second Gram–Schmidt pass is computed for every sample and kept where the eager loop would
    run it (the DGKS test), so each sample's basis is the eager one's. Returns the state, ``V``, ``Qt``,
    ``R`` and ``g`` being the buffers passed in.
    """
    tiny = torch.finfo(V.dtype).tiny ** 0.5
    basis = V[:, : j + 1]
    w_in = torch.linalg.vector_norm(w, dim=1)
    h = torch.bmm(w.unsqueeze(1), basis.transpose(1, 2)).squeeze(1)  # (B, j + 1)
    w = w - torch.bmm(h.unsqueeze(1), basis).squeeze(1)
    w_norm = torch.linalg.vector_norm(w, dim=1)
    again = w_norm < 0.7 * w_in
    h2 = torch.bmm(w.unsqueeze(1), basis.transpose(1, 2)).squeeze(1)
    w2 = w - torch.bmm(h2.unsqueeze(1), basis).squeeze(1)
    w = torch.where(again.unsqueeze(1), w2, w)
    h = torch.where(again.unsqueeze(1), h + h2, h)
    w_norm = torch.linalg.vector_norm(w, dim=1).clamp_min(tiny)
    col = torch.bmm(Qt[:, : j + 1, : j + 1], h.unsqueeze(2)).squeeze(2)  # the earlier rotations applied to h
    a = col[:, j : j + 1].squeeze(1)
    rho = torch.hypot(a, w_norm)
    cs, sn = a / rho, w_norm / rho
    m = R.shape[1]
    # R's column j: the rotated h above the diagonal, rho on it, zeros below
    rcol = torch.nn.functional.pad(torch.cat([col[:, :j], rho.unsqueeze(1)], dim=1), (0, m - j - 1))
    R.index_copy_(2, j_t.view(1), rcol.unsqueeze(2))
    # Qt's rows j and j + 1: only their first j + 2 entries are not those of the identity's rows (zeros)
    q_j, q_n = Qt[:, j : j + 1, : j + 2].squeeze(1), Qt[:, j + 1 : j + 2, : j + 2].squeeze(1)
    rows = torch.stack(
        [cs.unsqueeze(1) * q_j + sn.unsqueeze(1) * q_n, cs.unsqueeze(1) * q_n - sn.unsqueeze(1) * q_j], 1
    )
    pair = torch.stack([j_t, j_t + 1])
    Qt.index_copy_(1, pair, torch.nn.functional.pad(rows, (0, Qt.shape[2] - j - 2)))
    g_j = g[:, j : j + 1].squeeze(1)
    res_est = (-sn * g_j).abs()
    g.index_copy_(1, pair, torch.stack([cs * g_j, -sn * g_j], 1))
    running = ~done
    used = torch.where(running, (j_t + 1).expand_as(used), used)
    stopped_at = torch.where(running, res_est, stopped_at)
    done = done | (running & (res_est <= target))
    v_next = torch.where(done.unsqueeze(1), torch.zeros_like(w), w / w_norm.unsqueeze(1))
    V.index_copy_(1, (j_t + 1).view(1), v_next.unsqueeze(1))
    return V, Qt, R, g, done, used, stopped_at


def _arnoldi_compiled(step, backend, matvec, V, Qt, R, g, done, used, stopped_at, target, m):
    """The Arnoldi loop of one `gmres` cycle with the compiled step: ``(V, Qt, R, g, done, used, stopped_at,
    k)`` after ``k`` steps (one product each), or the number of products spent (1) when the step could not
    be compiled (warned once per backend)."""
    from deqlab.solvers.compiled import fallback_warning

    j_t = torch.zeros((), dtype=torch.long, device=V.device)
    k = 0
    for j in range(m):
        w = matvec(V[:, j])
        try:
            V, Qt, R, g, done, used, stopped_at = step(w, V, Qt, R, g, done, used, stopped_at, target, j, j_t)
        except Exception as error:  # the backend failed (no C++ compiler, ...)
            if j > 0:  # pragma: no cover - a graph that compiled once does not fail later
                raise
            _FAILED_BACKENDS.add("inductor" if backend is True else backend)
            fallback_warning("gmres", error)
            return 1
        j_t = j_t + 1
        k = j + 1
        if bool(done.all()):
            break
    return V, Qt, R, g, done, used, stopped_at, k
