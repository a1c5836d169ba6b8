"""Jacobian regularization (Bai, Koltun & Kolter, ICML 2021).

``‖∂f/∂z‖_F²`` at ``z*`` via Hutchinson's estimator of the *Frobenius norm*: for ``v ~ N(0, I)``,
``E‖vᵀ J‖² = ‖J‖_F²``. One VJP per probe, differentiable w.r.t. the parameters (``create_graph=True``).
Unlike a trace estimate ``vᵀ J v`` (which DeepEquilibriumNetworks.jl v2 computes), it is never negative.

Normalisation (``normalize``):

* ``"element"`` (default, as Bai et al. and the paper-era FastDEQ code): divide by ``z.numel()`` (batch
  included). With a batch of independent samples this estimates ``mean_b ‖J_b‖_F² / N`` where ``N`` is the
  per-sample state size, so the weight λ_jac does not depend on batch size or width.
* ``"sample"``: divide by the batch size: estimates ``mean_b ‖J_b‖_F²``.
* ``"none"``: the raw estimate of ``Σ_b ‖J_b‖_F²``.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional, Sequence, Union

import torch
from torch import Tensor

from deqlab.state import as_parts

__all__ = ["jacobian_frobenius_estimate"]

Normalize = Literal["element", "sample", "none"]


def jacobian_frobenius_estimate(
    fz: Union[Tensor, Sequence[Tensor]],
    z: Union[Tensor, Sequence[Tensor]],
    *,
    n_probes: int = 1,
    normalize: Normalize = "element",
    create_graph: bool = True,
    retain_graph: Optional[bool] = None,
    generator: Optional[torch.Generator] = None,
    probe: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """Hutchinson estimate of ``‖∂fz/∂z‖_F²``.

    Args:
        fz: ``f(z)`` (tensor or list of tensors), computed from ``z`` with grad enabled.
        z: the point (requires grad), same structure as ``fz``; ``x`` may have any other shape.
        n_probes: number of Gaussian probes averaged (each one VJP). Default 1: a single probe is already
            unbiased, and during training its noise averages out over steps, while each extra probe costs
            another VJP.
        normalize: ``"element"`` (default: divide by ``z.numel()``, as Bai et al., so the loss weight does
            not depend on batch size or width), ``"sample"`` or ``"none"`` (see module docstring).
        create_graph: keep the graph so the estimate can be backpropagated into parameters. Default
            ``True``: it is meant as a training loss; pass ``False`` to only monitor it (less memory).
        retain_graph: keep the graph of ``fz`` after the last probe. Default ``None``: only when
            ``create_graph`` is true (the estimate is then backpropagated through it); pass ``True`` to
            backpropagate through ``fz`` yourself after monitoring the estimate.
        generator: RNG for the probes. Default ``None``: torch's global RNG (reproducible under
            ``torch.manual_seed``).
        probe: draws one probe shaped like the tensor it is given (one call per part of ``fz`` and per
            probe), instead of the default Gaussian of its dtype and device from ``generator``. Why: to
            reproduce another library's seeded draws (torchdeq draws float32 on the CPU, then casts).

    Returns:
        A scalar tensor (differentiable when ``create_graph`` is true and ``f`` is nonlinear in ``z``).

    Raises:
        ValueError: ``n_probes < 1``, or ``normalize`` is not ``"element"``, ``"sample"`` or ``"none"``.

    Example:
        For ``f(z) = z / 2``, ``J = I/2`` and ``‖J‖_F² / N = 0.25`` per element; 1000 probes get close:

        >>> import torch
        >>> from deqlab.nn import jacobian_frobenius_estimate
        >>> z = torch.randn(2, 3, requires_grad=True)
        >>> estimate = jacobian_frobenius_estimate(0.5 * z, z, n_probes=1000)
        >>> estimate.shape, abs(float(estimate) - 0.25) < 0.05
        (torch.Size([]), True)
        >>> per_sample = jacobian_frobenius_estimate(0.5 * z, z, n_probes=1000, normalize="sample")
        >>> abs(float(per_sample) - 0.75) < 0.15                # ‖J_b‖_F² = 3 · 0.25
        True
    """
    if n_probes < 1:
        raise ValueError(f"jacobian_frobenius_estimate: n_probes must be >= 1, got {n_probes}")
    if normalize not in ("element", "sample", "none"):
        raise ValueError(
            f"jacobian_frobenius_estimate: normalize must be 'element', 'sample' or 'none', got {normalize!r}"
        )
    fz_parts, z_parts = as_parts(fz), as_parts(z)
    total = fz_parts[0].new_zeros(())
    for k in range(n_probes):
        if probe is None:
            vs = [torch.randn(f.shape, device=f.device, dtype=f.dtype, generator=generator) for f in fz_parts]
        else:
            vs = [probe(f) for f in fz_parts]
        vjps = torch.autograd.grad(
            fz_parts,
            z_parts,
            vs,
            create_graph=create_graph,
            retain_graph=(create_graph if retain_graph is None else retain_graph) or k < n_probes - 1,
            allow_unused=True,
        )
        for g in vjps:
            if g is not None:
                total = total + g.pow(2).sum()
    total = total / n_probes
    if normalize == "element":
        total = total / sum(z_.numel() for z_ in z_parts)
    elif normalize == "sample":
        total = total / z_parts[0].shape[0]
    return total
