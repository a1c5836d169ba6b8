"""The spectral radius of ``∂f/∂z`` at a state, per sample: how contractive a DEQ map is at its fixed point.

``ρ(J) < 1`` at ``z*`` is what makes fixed-point iteration converge locally and the adjoint system
``(I − Jᵀ) g = v`` well posed; a training run whose ``ρ`` creeps towards 1 is about to stop converging.

Two estimators, both matrix-free (one graph of ``f`` at ``z``, then one VJP per iteration; the spectrum of
``Jᵀ`` is that of ``J``) and both per sample (the batch's Jacobian is block diagonal, so one batched VJP
advances every sample's iteration):

* ``"arnoldi"`` (default): ``n_iters`` steps of Arnoldi (a per-sample Krylov basis, modified Gram–Schmidt),
  then the largest modulus of the eigenvalues of the small Hessenberg matrix (the Ritz values). It finds
  complex and negative dominant eigenvalues as well as positive ones, and is exact once ``n_iters`` reaches
  the state size. Memory: ``n_iters + 1`` state-sized vectors per sample.
* ``"power"``: the power method (torchdeq's ``power_method``). Returns the growth rate
  ``(‖Jᵐ u‖ / ‖Jᵏ u‖)^(1/(m−k))`` over the second half of the iterations, which tends to ``|λ_max|`` for a
  real dominant eigenvalue of either sign *and* for a complex pair (where ``‖Jᵏu‖`` oscillates, so the
  last ratio ``‖Jᵏ⁺¹u‖/‖Jᵏu‖`` would not converge), but only like ``O(1/n_iters)`` in that case. Memory:
  two state-sized vectors.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from deqlab.state import State, as_parts, flatten, from_parts, unflatten

__all__ = ["spectral_radius"]

SpectralMethod = Literal["arnoldi", "power"]


def spectral_radius(fn: Callable[[State], State], z: State, n_iters: int = 20, *,
                    method: SpectralMethod = "arnoldi", generator: "torch.Generator | None" = None) -> Tensor:
    """Estimate the spectral radius ``ρ(∂fn/∂z)`` at ``z``, one value per sample.

    Args:
        fn: a map from a batch of states to a batch of states shaped like them (a tensor ``(B, ...)`` or a
            list of such tensors), whose samples are independent (as a DEQ map's ``z -> f(z, x)`` with
            ``x`` fixed; a train-mode BatchNorm couples them). Required.
        z: the state to linearize at, usually the fixed point ``z*`` (detached internally). Required.
        n_iters: VJPs (iterations) to spend. Default 20: enough for the Ritz values to settle on the
            dominant eigenvalue of a typical DEQ map, at the cost of 20 VJPs (a short adjoint solve).
        method: ``"arnoldi"`` (default; Ritz values of a Krylov basis, which handles complex and negative
            dominant eigenvalues and is exact when ``n_iters`` reaches the state size) or ``"power"``
            (the power method's growth rate, two vectors of memory; see the module docstring for its
            convergence on complex pairs).
        generator: the random generator of the start vector. Default ``None``: torch's global one.

    Returns:
        A detached tensor of shape ``(B,)`` (float32 or the state's dtype when wider): the estimate of
        ``max |λ|`` over the eigenvalues of each sample's Jacobian. Both methods return a *modulus*:
        a dominant eigenvalue ``−0.9`` or ``0.9i`` reads ``0.9``.

    Raises:
        ValueError: ``n_iters < 1`` or ``method`` is unknown.

    Example:
        Two samples of a linear map ``z -> A_b z`` with different matrices; the second's dominant
        eigenvalues are the complex pair ``±0.8i``:

        >>> import torch
        >>> from deqlab.nn import spectral_radius
        >>> A = torch.tensor([[[0.5, 0.0], [0.0, -0.25]], [[0.0, -0.8], [0.8, 0.0]]], dtype=torch.float64)
        >>> fn = lambda z: torch.einsum("bij,bj->bi", A, z)
        >>> spectral_radius(fn, torch.zeros(2, 2, dtype=torch.float64), n_iters=2).round(decimals=12).tolist()
        [0.5, 0.8]
    """
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1:
        raise ValueError(f"spectral_radius: n_iters must be an int >= 1, got {n_iters!r}")
    if method not in ("arnoldi", "power"):
        raise ValueError(f"spectral_radius: method must be 'arnoldi' or 'power', got {method!r}")
    is_list = not isinstance(z, Tensor)
    parts = [t.detach().requires_grad_() for t in as_parts(z)]
    with torch.enable_grad():
        out = fn(from_parts(parts, is_list))
    fz = as_parts(out)
    if any(o.shape != p.shape for o, p in zip(fz, parts)) or len(fz) != len(parts):
        raise ValueError("spectral_radius: fn must return states shaped like z")

    def vjp(v: Tensor) -> Tensor:
        grads = torch.autograd.grad(fz, parts, unflatten(v.to(parts[0].dtype), fz), retain_graph=True,
                                    allow_unused=True)
        return flatten([torch.zeros_like(p) if g is None else g for g, p in zip(grads, parts)]).to(v.dtype)

    ref = flatten([p.detach() for p in parts])
    dtype = torch.promote_types(ref.dtype, torch.float32)
    start = torch.randn(ref.shape, generator=generator, dtype=dtype, device="cpu" if generator is None
                        else generator.device).to(ref.device)
    with torch.no_grad():
        if method == "power":
            return _power(vjp, start, n_iters)
        return _arnoldi(vjp, start, n_iters)


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


def _power(vjp: Callable[[Tensor], Tensor], v: Tensor, n_iters: int) -> Tensor:
    """Growth rate of ``‖(Jᵀ)ᵏ u‖`` over the second half of ``n_iters`` power iterations."""
    v = _unit(v)
    half = n_iters // 2
    log_growth = v.new_zeros(v.shape[0])
    for i in range(n_iters):
        w = vjp(v)
        norm = w.norm(dim=1)
        if i >= half:
            log_growth = log_growth + torch.log(norm.clamp_min(torch.finfo(v.dtype).tiny))
        v = w / norm.clamp_min(torch.finfo(v.dtype).tiny).unsqueeze(1)
    rho = torch.exp(log_growth / (n_iters - half))
    return rho.masked_fill(rho <= torch.finfo(v.dtype).tiny * 10, 0.0)


def _arnoldi(vjp: Callable[[Tensor], Tensor], v: Tensor, n_iters: int) -> Tensor:
    """Largest Ritz value modulus of an ``m``-step per-sample Arnoldi process (``m = min(n_iters, N)``)."""
    batch, n = v.shape
    m = min(n_iters, n)
    eps = torch.finfo(v.dtype).eps
    basis = v.new_zeros(batch, m + 1, n)
    hess = v.new_zeros(batch, m + 1, m)
    basis[:, 0] = _unit(v)
    for j in range(m):
        w = vjp(basis[:, j])
        scale = w.norm(dim=1)
        for _ in range(2):  # Gram–Schmidt twice ("twice is enough") keeps the basis orthogonal
            coef = torch.einsum("bkn,bn->bk", basis[:, :j + 1], w)
            w = w - torch.einsum("bk,bkn->bn", coef, basis[:, :j + 1])
            hess[:, :j + 1, j] += coef
        h = w.norm(dim=1)
        hess[:, j + 1, j] = h
        # an invariant subspace was found for a sample: its Ritz values are exact; continue with zeros
        alive = h > eps * scale.clamp_min(eps) * 10
        basis[:, j + 1] = torch.where(alive.unsqueeze(1), w / h.clamp_min(torch.finfo(v.dtype).tiny).unsqueeze(1),
                                      torch.zeros_like(w))
        hess[:, j + 1, j] = torch.where(alive, h, torch.zeros_like(h))
    eig = torch.linalg.eigvals(hess[:, :m, :m])
    return eig.abs().amax(dim=1).to(v.dtype)
