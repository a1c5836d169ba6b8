"""Discrete fixed-point algorithms as small strategy objects.

Each algorithm sees flat ``(B, N)`` iterates and a counted map ``F``. The driver
(:class:`deqlab.solvers.discrete.DiscreteDEQSolver`) owns the loop, the termination test and the result;
an algorithm only proposes the next iterate and returns it together with ``F`` at that iterate (so a line
search never costs an extra evaluation). Every sample is its own system: all linear algebra is batched
per sample and no algorithm synchronises with the host.
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Tuple

import torch
from torch import Tensor

from deqlab.solvers._state import batch_dot
from deqlab.solvers.krylov import gmres

FlatMap = Callable[[Tensor], Tensor]


class FixedPointAlgorithm:
    """Base class: ``init`` builds per-solve state, ``step`` returns ``(z_next, F(z_next), state)``."""

    name = "base"

    def init(self, z: Tensor, fz: Tensor, max_steps: int) -> Any:
        return None

    def step(self, state: Any, z: Tensor, fz: Tensor, g: Tensor, F: FlatMap) -> Tuple[Tensor, Tensor, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class FixedPointIteration(FixedPointAlgorithm):
    """Damped Picard iteration ``z <- (1 - damping) z + damping f(z)``: one evaluation per step.

    The right choice when ``f`` is a strong contraction; also the cheapest backward solver.
    """

    name = "fixed_point"

    def __init__(self, damping: float = 1.0):
        if not 0.0 < damping <= 1.0:
            raise ValueError(f"damping must be in (0, 1], got {damping}")
        self.damping = float(damping)

    def step(self, state, z, fz, g, F):
        z_new = fz if self.damping == 1.0 else torch.add(z, g, alpha=self.damping)
        return z_new, F(z_new), state


class Anderson(FixedPointAlgorithm):
    """Anderson acceleration (type II) with ``memory`` past iterates.

    Mixing weights minimise the norm of the combined residual subject to summing to one, found from the
    small Gram matrix of the stored residuals. ``regularization`` is relative to the Gram matrix's scale so
    it neither dominates once residuals are tiny nor vanishes for large ones.
    """

    name = "anderson"

    def __init__(self, memory: int = 5, mixing: float = 1.0, regularization: float = 1e-8):
        if memory < 1:
            raise ValueError(f"memory must be >= 1, got {memory}")
        if not 0.0 < mixing <= 1.0:
            raise ValueError(f"mixing must be in (0, 1], got {mixing}")
        self.memory = int(memory)
        self.mixing = float(mixing)
        self.regularization = float(regularization)

    def init(self, z, fz, max_steps):
        B, N = z.shape
        m = self.memory
        X = z.new_zeros(B, m, N)
        Fx = z.new_zeros(B, m, N)
        G = z.new_zeros(B, m, N)
        X[:, 0] = z
        Fx[:, 0] = fz
        G[:, 0] = fz - z
        return {"X": X, "F": Fx, "G": G, "k": 1}

    def step(self, state, z, fz, g, F):
        X, Fx, G, k = state["X"], state["F"], state["G"], state["k"]
        n = min(k, self.memory)
        Gn = G[:, :n]
        H = torch.bmm(Gn, Gn.transpose(1, 2))
        scale = H.diagonal(dim1=1, dim2=2).mean(dim=1, keepdim=True)
        shift = self.regularization * scale + torch.finfo(z.dtype).tiny ** 0.5
        H = H + shift.unsqueeze(2) * torch.eye(n, dtype=z.dtype, device=z.device)
        ones = z.new_ones(z.shape[0], n, 1)
        y = torch.linalg.solve_ex(H, ones)[0]
        alpha = y / y.sum(dim=1, keepdim=True)  # (B, n, 1)
        alpha_t = alpha.transpose(1, 2)
        z_new = torch.bmm(alpha_t, Fx[:, :n]).squeeze(1)
        if self.mixing != 1.0:
            z_new = self.mixing * z_new + (1 - self.mixing) * torch.bmm(alpha_t, X[:, :n]).squeeze(1)
        fz_new = F(z_new)
        slot = k % self.memory
        X[:, slot] = z_new
        Fx[:, slot] = fz_new
        torch.sub(fz_new, z_new, out=G[:, slot])
        state["k"] = k + 1
        return z_new, fz_new, state


def _line_search(z: Tensor, dz: Tensor, g_norm: Tensor, F: FlatMap, max_trials: int,
                 c: float = 1e-4) -> Tuple[Tensor, Tensor]:
    """Per-sample backtracking on ``||f(z) - z||``: halve the step of each sample that did not reduce
    its residual enough. Every trial is one batched evaluation; samples that never succeed take the
    smallest step tried."""
    alpha = torch.ones_like(g_norm)
    z_new = z + dz
    fz_new = F(z_new)
    for _ in range(max_trials):
        new_norm = torch.linalg.vector_norm(fz_new - z_new, dim=1)
        bad = ~(new_norm <= (1 - c * alpha) * g_norm)
        if not bool(bad.any()):
            break
        alpha = torch.where(bad, alpha * 0.5, alpha)
        z_try = z + alpha.unsqueeze(1) * dz
        f_try = F(z_try)
        b2 = bad.unsqueeze(1)
        z_new = torch.where(b2, z_try, z_new)
        fz_new = torch.where(b2, f_try, fz_new)
    return z_new, fz_new


class Broyden(FixedPointAlgorithm):
    """Good Broyden's method on ``g(z) = f(z) - z`` with a low-rank inverse Jacobian.

    ``J^{-1} ~ -I + sum_i u_i v_i^T`` is stored as at most ``memory`` pairs (``None``: one pair per
    step, i.e. full Broyden within ``max_steps``); when the memory is full the oldest pair is overwritten.
    The first step is a plain fixed-point step. ``line_search`` adds per-sample backtracking.
    """

    name = "broyden"

    def __init__(self, memory: Optional[int] = None, line_search: bool = False, max_line_search: int = 5):
        if memory is not None and memory < 1:
            raise ValueError(f"memory must be >= 1 or None, got {memory}")
        self.memory = memory
        self.line_search = bool(line_search)
        self.max_line_search = int(max_line_search)

    def init(self, z, fz, max_steps):
        B, N = z.shape
        m = max(1, max_steps if self.memory is None else min(self.memory, max_steps))
        return {"U": z.new_zeros(B, m, N), "V": z.new_zeros(B, m, N), "n": 0, "k": 0}

    @staticmethod
    def _matvec(U: Tensor, V: Tensor, x: Tensor) -> Tensor:
        """``J^{-1} x`` with the low-rank representation."""
        return torch.baddbmm(-x.unsqueeze(1), torch.bmm(x.unsqueeze(1), V.transpose(1, 2)), U).squeeze(1)

    @staticmethod
    def _rmatvec(U: Tensor, V: Tensor, x: Tensor) -> Tensor:
        """``x^T J^{-1}``."""
        return torch.baddbmm(-x.unsqueeze(1), torch.bmm(x.unsqueeze(1), U.transpose(1, 2)), V).squeeze(1)

    def step(self, state, z, fz, g, F):
        n = state["n"]
        U, V = state["U"][:, :n], state["V"][:, :n]
        dz = -self._matvec(U, V, g) if n else g
        if self.line_search:
            z_new, fz_new = _line_search(z, dz, torch.linalg.vector_norm(g, dim=1), F, self.max_line_search)
        else:
            z_new = z + dz
            fz_new = F(z_new)
        s = z_new - z
        y = (fz_new - z_new) - g
        vT = self._rmatvec(U, V, s) if n else -s
        Jy = self._matvec(U, V, y) if n else -y
        den = batch_dot(vT, y)
        tiny = torch.finfo(z.dtype).eps
        ok = den.abs() > tiny * torch.linalg.vector_norm(vT, dim=1) * torch.linalg.vector_norm(y, dim=1) + torch.finfo(z.dtype).tiny
        u = torch.where(ok.unsqueeze(1), (s - Jy) / torch.where(ok, den, torch.ones_like(den)).unsqueeze(1), torch.zeros_like(s))
        m = state["U"].shape[1]
        slot = state["k"] % m
        state["U"][:, slot] = u
        state["V"][:, slot] = vT
        state["k"] += 1
        state["n"] = min(n + 1, m)
        return z_new, fz_new, state


class LimitedMemoryBroyden(Broyden):
    """Broyden with a bounded memory of ``memory`` rank-one updates (MDEQ's and the paper's default);
    memory grows as ``O(memory * N)`` per sample whatever ``max_steps`` is."""

    name = "lbroyden"

    def __init__(self, memory: int = 27, line_search: bool = False, max_line_search: int = 5):
        super().__init__(memory=memory, line_search=line_search, max_line_search=max_line_search)


class NewtonKrylov(FixedPointAlgorithm):
    """Jacobian-free Newton–Krylov: solve ``(J_f - I) p = -(f(z) - z)`` with GMRES on Jacobian-vector
    products, then ``z <- z + p``.

    Quadratic convergence near the fixed point for maps that are hard for Broyden; each GMRES iteration
    costs one JVP, counted as one evaluation. ``jvp="forward"`` uses forward-mode AD
    (``torch.func.jvp``); ``"fd"`` uses a finite difference for maps without forward-mode support.
    """

    name = "newton_krylov"

    def __init__(self, krylov_dim: int = 20, max_restarts: int = 1, inner_tol: float = 1e-3,
                 jvp: Literal["forward", "fd"] = "forward", line_search: bool = False, max_line_search: int = 5):
        if jvp not in ("forward", "fd"):
            raise ValueError(f"jvp must be 'forward' or 'fd', got {jvp!r}")
        self.krylov_dim = int(krylov_dim)
        self.max_restarts = int(max_restarts)
        self.inner_tol = float(inner_tol)
        self.jvp = jvp
        self.line_search = bool(line_search)
        self.max_line_search = int(max_line_search)

    def step(self, state, z, fz, g, F):
        if self.jvp == "forward":
            def Jg(v: Tensor) -> Tensor:
                return torch.func.jvp(F, (z,), (v,))[1] - v
        else:
            eps = torch.finfo(z.dtype).eps ** 0.5

            def Jg(v: Tensor) -> Tensor:
                h = eps * (1 + torch.linalg.vector_norm(z, dim=1, keepdim=True)) / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(eps)
                return (F(z + h * v) - fz) / h - v

        p, _ = gmres(Jg, -g, tol=self.inner_tol, restart=self.krylov_dim, max_restarts=self.max_restarts)
        if self.line_search:
            z_new, fz_new = _line_search(z, p, torch.linalg.vector_norm(g, dim=1), F, self.max_line_search)
        else:
            z_new = z + p
            fz_new = F(z_new)
        return z_new, fz_new, state


ALGORITHMS = {
    "fixed_point": FixedPointIteration,
    "anderson": Anderson,
    "broyden": Broyden,
    "lbroyden": LimitedMemoryBroyden,
    "newton_krylov": NewtonKrylov,
}
