"""VCAB3: the variable-coefficient Adams–Bashforth method of order 3 behind ``ContinuousDEQSolver("vcab3")``.

Why a multistep method for a DEQ: a Runge–Kutta step spends 6 evaluations of ``f`` (Tsit5) however easy
the flow, while Adams–Bashforth reuses the evaluations of the previous steps and spends exactly **one**
per step. In the DEQ regime (a loose termination, a few time units to the steady state) that is far
cheaper; at tight tolerances its small stability region makes it lose (see ``docs/solver_guide.md``).

The method is that of Hairer, Nørsett & Wanner, *Solving ODEs I*, §III.5 (formulae 5.9–5.10), as
OrdinaryDiffEq's ``VCAB3``, with every sample on its own grid (``x_{n+1} = x_n + h_n``):

* divided differences ``φ_1(n) = f_n``, ``φ_{j+1}(n) = φ_j(n) − φ*_j(n−1)``, scaled to the new step by
  ``φ*_j(n) = β_j(n) φ_j(n)``, ``β_2 = h_n / h_{n−1}``, ``β_3 = β_2 (h_n + h_{n−1}) / (h_{n−1} + h_{n−2})``;
* ``u_{n+1} = u_n + g_1 φ*_1 + g_2 φ*_2 + g_3 φ*_3`` with ``g_1 = h``, ``g_2 = h/2``,
  ``g_3 = h (1/2 − h_n / (6 (h_n + h_{n−1})))`` (``5h/12`` at a constant step);
* local error estimate ``g_3 φ*_3(n)``: the difference between the order-3 and order-2 predictions, known
  *before* ``f`` is evaluated at the new point, so a rejected step costs nothing.

The first two steps of each sample are Bogacki–Shampine 3(2) steps (3 new evaluations each, first same as
last, embedded error estimate), which start the history. Only accepted steps enter the history, so a
rejected start-up step does not leave a duplicated grid point behind (OrdinaryDiffEq's counter does).

Everything here is pure tensor math on flat ``(B, N)`` states with per-sample ``(B,)`` step sizes; the
loop, the controller and the guards live in [`ContinuousDEQSolver`][deqlab.solvers.ContinuousDEQSolver].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Tuple

import torch
from torch import Tensor

__all__ = [
    "ORDER",
    "AB3_STABLE",
    "AdamsHistory",
    "work_dtype",
    "bs3_points",
    "bs3_error",
    "pi_factor",
    "fixed_step_solve",
]

#: Order of both the Adams–Bashforth core and the Bogacki–Shampine start-up.
ORDER = 3
#: The PI step-size controller of OrdinaryDiffEq for an order-3 method: ``beta1 = 7 / (10 * 3)``,
#: ``beta2 = 2 / (5 * 3)``, and the initial "previous error" ``qold = 1e-4``.
PI_BETA1 = 7.0 / 30.0
PI_BETA2 = 2.0 / 15.0
PI_QOLD_INIT = 1e-4
#: AB3's stability interval on the negative real axis is ``h λ ∈ [−6/11, 0]``; the step is kept at this
#: fraction of ``1 / |λ|`` (``λ`` estimated along the path). Not at the edge: at ``h λ = −0.5`` a parasitic
#: root of AB3 has modulus 0.92, so that mode decays by 8 % per step; near ``−0.35``–``−0.4`` every root is
#: below 0.76 (the fastest decay per evaluation), and an underestimated ``|λ|`` still has 35 % margin.
#: Measured on contractive maps: 0.4 needs 18 % fewer evaluations than 0.5 at a tight termination.
AB3_STABLE = 0.4

# Bogacki–Shampine 3(2): c = (0, 1/2, 3/4, 1), a21 = 1/2, a32 = 3/4, b = (2/9, 1/3, 4/9, 0),
# error weights b - b_hat = (-5/72, 1/12, 1/9, -1/8).
_BS3_B = (2.0 / 9.0, 1.0 / 3.0, 4.0 / 9.0)
_BS3_E = (-5.0 / 72.0, 1.0 / 12.0, 1.0 / 9.0, -1.0 / 8.0)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the history and the coefficients: float32 for half-precision states (a divided
    difference of two bfloat16 residuals near the steady state is all rounding), else the state's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _col(v: Tensor) -> Tensor:
    return v.unsqueeze(1)


@dataclass
class AdamsHistory:
    """Each sample's Adams history after ``n`` accepted steps: what the next step needs of the past.

    Why per sample: the divided differences depend on each sample's own past step sizes, so a batch whose
    samples take different steps keeps one history per sample (rows of these tensors).

    Attributes:
        phi1: ``φ*_1(n−1) = f_{n−1}`` (the vector field at the previous point), ``(B, N)``.
        phi2: ``φ*_2(n−1)``, ``(B, N)``.
        h1: ``h_{n−1}``, the previous accepted step, ``(B,)`` (0 before the first).
        h2: ``h_{n−2}``, ``(B,)``.
        n: accepted steps so far, ``(B,)`` long; ``n < 2`` means the next step is a start-up step.
    """

    phi1: Tensor
    phi2: Tensor
    h1: Tensor
    h2: Tensor
    n: Tensor

    @classmethod
    def empty(cls, u: Tensor) -> "AdamsHistory":
        """A history with no step yet, for the flat ``(B, N)`` state ``u``."""
        wd = work_dtype(u.dtype)
        B = u.shape[0]
        zeros = u.new_zeros(u.shape, dtype=wd)
        return cls(
            zeros,
            zeros.clone(),
            u.new_zeros(B, dtype=wd),
            u.new_zeros(B, dtype=wd),
            torch.zeros(B, dtype=torch.long, device=u.device),
        )

    @property
    def startup(self) -> Tensor:
        """``(B,)`` bool: the sample's next step is a Bogacki–Shampine start-up step."""
        return self.n < 2

    def propose(self, u: Tensor, du: Tensor, h: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """The AB3 step of size ``h`` from ``u`` (with ``du = f(u) − u``), without evaluating anything.

        Args:
            u: the flat ``(B, N)`` state.
            du: the vector field at ``u``.
            h: ``(B,)`` step sizes.

        Returns:
            ``(u_new, err, phi2_star)``: the predicted point (state dtype), the local error estimate
            ``g_3 φ*_3`` (work dtype) and ``φ*_2(n)``, which `commit` stores when the step is accepted.
            Rows in the start-up phase get meaningless values (their step is a Bogacki–Shampine one).
        """
        wd = self.phi1.dtype
        hw = h.to(wd)
        h1, h2 = self.h1, self.h2
        one = torch.ones_like(hw)
        safe_h1 = torch.where(h1 > 0, h1, one)
        beta2 = torch.where(h1 > 0, hw / safe_h1, torch.zeros_like(hw))
        den3 = h1 + h2
        beta3 = torch.where(den3 > 0, beta2 * (hw + h1) / torch.where(den3 > 0, den3, one), torch.zeros_like(hw))
        c3 = 0.5 - hw / (6.0 * torch.where(hw + h1 > 0, hw + h1, one))
        f = du.to(wd)
        phi2 = f - self.phi1
        phi2_star = _col(beta2) * phi2
        phi3_star = _col(beta3) * (phi2 - self.phi2)
        err = _col(hw * c3) * phi3_star
        incr = _col(hw) * (f + 0.5 * phi2_star) + err
        u_new = (u.to(wd) + incr).to(u.dtype)
        return u_new, err, phi2_star

    def commit(self, accept: Tensor, du: Tensor, phi2_star: Tensor, h: Tensor) -> None:
        """Advance the history of the samples in ``accept`` past the step ``h`` taken from the point where
        the vector field was ``du``; ``phi2_star`` is `propose`'s."""
        a2 = _col(accept)
        self.phi2 = torch.where(a2 & _col(self.n >= 1), phi2_star, self.phi2)
        self.phi1 = torch.where(a2, du.to(self.phi1.dtype), self.phi1)
        self.h2 = torch.where(accept, self.h1, self.h2)
        self.h1 = torch.where(accept, h.to(self.h1.dtype), self.h1)
        self.n = self.n + accept.long()


def bs3_points(u: Tensor, k1: Tensor, h: Tensor, stage: int, ks: Tuple[Tensor, ...] = ()) -> Tensor:
    """The point of Bogacki–Shampine stage ``stage`` (2, 3, or 4 = the new point) from ``u``.

    Args:
        u: the flat ``(B, N)`` state.
        k1: ``f(u) − u``.
        h: ``(B,)`` step sizes.
        stage: 2, 3 or 4.
        ks: the stage values so far: ``(k2,)`` for stage 3, ``(k2, k3)`` for stage 4.

    Returns:
        The ``(B, N)`` point at which the stage evaluates the vector field (the new point for stage 4).
    """
    hc = _col(h.to(u.dtype))
    if stage == 2:
        return u + hc * (0.5 * k1)
    if stage == 3:
        return u + hc * (0.75 * ks[0])
    b1, b2, b3 = _BS3_B
    return u + hc * (b1 * k1 + b2 * ks[0] + b3 * ks[1])


def bs3_error(k1: Tensor, k2: Tensor, k3: Tensor, k4: Tensor, h: Tensor) -> Tensor:
    """Bogacki–Shampine's embedded error estimate (order 3 minus order 2) of a step of size ``h``."""
    e1, e2, e3, e4 = _BS3_E
    return _col(h.to(k1.dtype)) * (e1 * k1 + e2 * k2 + e3 * k3 + e4 * k4)


def pi_factor(
    ratio: Tensor, qold: Tensor, accept: Tensor, *, safety: float, min_factor: float, max_factor: float
) -> Tensor:
    """The step-size factor of OrdinaryDiffEq's PI controller (order 3), per sample.

    Accepted: ``safety / (ratio^beta1 / qold^beta2)`` clipped to ``[min_factor, max_factor]`` (``max_factor``
    when ``ratio == 0``); rejected: ``max(min_factor, safety / ratio^beta1)``. The integral term
    (``qold``, the last accepted error ratio) damps the step-size oscillation a pure I-controller shows
    when the step is limited by stability rather than accuracy.
    """
    q11 = ratio.clamp_min(0).pow(PI_BETA1)
    acc = safety * qold.pow(PI_BETA2) / q11.clamp_min(1e-30)
    acc = torch.where(ratio == 0, torch.full_like(acc, max_factor), acc.clamp(min_factor, max_factor))
    rej = (safety / q11.clamp_min(1e-30)).clamp(min_factor, 1.0)
    out = torch.where(accept, acc, rej)
    return torch.where(torch.isfinite(ratio), out, torch.full_like(out, min_factor))


def fixed_step_solve(vf: Callable[[Tensor], Tensor], u0: Tensor, h: float, steps: int) -> Tensor:
    """Integrate ``du/dt = vf(u)`` with VCAB3 at the constant step ``h`` for ``steps`` steps (no control).

    The core without the adaptive loop (two Bogacki–Shampine start-up steps, then Adams–Bashforth), so its
    order can be checked on its own: halving ``h`` divides the global error by about 8.

    Args:
        vf: the vector field on flat ``(B, N)`` states.
        u0: the initial ``(B, N)`` state.
        h: the step size, > 0.
        steps: number of steps, >= 0.

    Returns:
        The state at ``t = steps * h``.

    Example:
        >>> import math, torch
        >>> from deqlab.solvers.adams import fixed_step_solve
        >>> errors = [abs(float(fixed_step_solve(lambda u: -u, torch.ones(1, 1, dtype=torch.float64), 1 / n, n))
        ...               - math.exp(-1.0)) for n in (10, 20)]
        >>> round(errors[0] / errors[1])   # third order: halving the step divides the error by ~8
        8
    """
    B = u0.shape[0]
    hs = u0.new_full((B,), h, dtype=work_dtype(u0.dtype))
    hist = AdamsHistory.empty(u0)
    u, du = u0, vf(u0)
    accept = torch.ones(B, dtype=torch.bool, device=u0.device)
    for _ in range(steps):
        _, _, phi2_star = hist.propose(u, du, hs)
        if bool(hist.startup.any()):
            k2 = vf(bs3_points(u, du, hs, 2))
            k3 = vf(bs3_points(u, du, hs, 3, (k2,)))
            u_new = bs3_points(u, du, hs, 4, (k2, k3))
        else:
            u_new = hist.propose(u, du, hs)[0]
        du_new = vf(u_new)
        hist.commit(accept, du, phi2_star, hs)
        u, du = u_new, du_new
    return u
