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
* ``"power"``: the power method ([`power_iteration`][deqlab.nn.power_iteration], which
  ``deqlab.compat.torchdeq.power_method`` wraps too). Returns the growth rate
  ``(‖Jᵐ u‖ / ‖Jᵏ u‖)^(1/(m−k))`` over the second half of the iterations, which tends to ``|λ_max|`` for a
  real dominant eigenvalue of either sign *and* for a complex pair (where ``‖Jᵏu‖`` oscillates, so the
  last ratio ``‖Jᵏ⁺¹u‖/‖Jᵏu‖`` would not converge), but only like ``O(1/n_iters)`` in that case. Memory:
  two state-sized vectors.
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple

import torch
from torch import Tensor

from deqlab.state import State, as_parts, flatten, from_parts, unflatten

__all__ = ["spectral_radius", "power_iteration", "PowerIteration"]

SpectralMethod = Literal["arnoldi", "power"]


def spectral_radius(
    fn: Callable[[State], State],
    z: State,
    n_iters: int = 20,
    *,
    method: SpectralMethod = "arnoldi",
    generator: "torch.Generator | None" = None,
) -> Tensor:
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
        grads = torch.autograd.grad(
            fz, parts, unflatten(v.to(parts[0].dtype), fz), retain_graph=True, allow_unused=True
        )
        return flatten([torch.zeros_like(p) if g is None else g for g, p in zip(grads, parts)]).to(v.dtype)

    ref = flatten([p.detach() for p in parts])
    dtype = torch.promote_types(ref.dtype, torch.float32)
    start = torch.randn(
        ref.shape, generator=generator, dtype=dtype, device="cpu" if generator is None else generator.device
    ).to(ref.device)
    with torch.no_grad():
        if method == "power":
            return power_iteration(vjp, start, n_iters).growth
        return _arnoldi(vjp, start, n_iters)


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


class PowerIteration(NamedTuple):
    """What [`power_iteration`][deqlab.nn.power_iteration] returns, per sample.

    Attributes:
        vector: ``(B, N)``: the last iterate, unit norm per sample (the dominant eigenvector's estimate).
        rayleigh: ``(B,)``: the Rayleigh quotient ``⟨Jᵀv, v⟩ / ⟨v, v⟩`` of the last step's input ``v``
            (torchdeq's eigenvalue estimate; signed, and it oscillates for a complex dominant pair).
        growth: ``(B,)``: the growth rate ``(‖(Jᵀ)ᵐ u‖ / ‖(Jᵀ)ᵏ u‖)^(1/(m−k))`` over the second half of the
            iterations (``|λ_max|`` for a real dominant eigenvalue of either sign and for a complex pair;
            what ``spectral_radius(method="power")`` returns).

    Example:
        >>> import torch
        >>> from deqlab.nn.spectral import power_iteration
        >>> out = power_iteration(lambda v: -0.5 * v, torch.ones(1, 3, dtype=torch.float64), 4)
        >>> out.rayleigh.round(decimals=12).tolist(), out.growth.round(decimals=12).tolist()
        ([-0.5], [0.5])
    """

    vector: Tensor
    rayleigh: Tensor
    growth: Tensor


def power_iteration(vjp: Callable[[Tensor], Tensor], v: Tensor, n_iters: int) -> PowerIteration:
    """The power method on a batch of per-sample linear maps given by their vector-Jacobian product.

    The one power iteration of deqlab: [`spectral_radius`][deqlab.nn.spectral_radius] (``method="power"``)
    and ``deqlab.compat.torchdeq.power_method`` both run it, each with its own ``vjp`` (the first builds the
    graph of ``fn`` at ``z``, the second uses the caller's graph ``f0(z0)``).

    Args:
        vjp: maps a flat batch ``(B, N)`` of vectors ``v`` to ``vᵀ J`` (same shape), each sample's own
            Jacobian; called ``n_iters`` times. Required.
        v: the start, ``(B, N)`` (any scale; normalised per sample first). Required.
        n_iters: iterations (VJPs), ``>= 1``. Required.

    Returns:
        A [`PowerIteration`][deqlab.nn.PowerIteration]: the last unit iterate, the last Rayleigh
        quotient and the growth rate over the second half (see there), computed without autograd.

    Raises:
        ValueError: ``n_iters < 1``.

    Example:
        ``J = diag(0.9, 0.3)`` for every sample:

        >>> import torch
        >>> from deqlab.nn.spectral import power_iteration
        >>> d = torch.tensor([0.9, 0.3], dtype=torch.float64)
        >>> out = power_iteration(lambda v: v * d, torch.ones(2, 2, dtype=torch.float64), 60)
        >>> out.growth.round(decimals=6).tolist(), out.vector.abs().round(decimals=6)[0].tolist()
        ([0.9, 0.9], [1.0, 0.0])
    """
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1:
        raise ValueError(f"power_iteration: n_iters must be an int >= 1, got {n_iters!r}")
    tiny = torch.finfo(v.dtype).tiny
    v = _unit(v)
    half = n_iters // 2
    log_growth = v.new_zeros(v.shape[0])
    rayleigh = v.new_zeros(v.shape[0])
    for i in range(n_iters):
        w = vjp(v)
        with torch.no_grad():
            rayleigh = (w * v).sum(1) / (v * v).sum(1)
            norm = w.norm(dim=1)
            if i >= half:
                log_growth = log_growth + torch.log(norm.clamp_min(tiny))
            v = w / norm.clamp_min(tiny).unsqueeze(1)
    growth = torch.exp(log_growth / (n_iters - half))
    return PowerIteration(v, rayleigh, growth.masked_fill(growth <= tiny * 10, 0.0))


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
            coef = torch.einsum("bkn,bn->bk", basis[:, : j + 1], w)
            w = w - torch.einsum("bk,bkn->bn", coef, basis[:, : j + 1])
            hess[:, : j + 1, j] += coef
        h = w.norm(dim=1)
        hess[:, j + 1, j] = h
        # an invariant subspace was found for a sample: its Ritz values are exact; continue with zeros
        alive = h > eps * scale.clamp_min(eps) * 10
        basis[:, j + 1] = torch.where(
            alive.unsqueeze(1), w / h.clamp_min(torch.finfo(v.dtype).tiny).unsqueeze(1), torch.zeros_like(w)
        )
        hess[:, j + 1, j] = torch.where(alive, h, torch.zeros_like(h))
    eig = torch.linalg.eigvals(hess[:, :m, :m])
    return eig.abs().amax(dim=1).to(v.dtype)
