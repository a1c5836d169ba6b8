"""Shared tiny models and solver factories for tests/nn (imported by the test modules)."""

from __future__ import annotations

import torch
from torch import nn

from deqlab.solvers import ContinuousDEQSolver, DiscreteDEQSolver

DISCRETE = ["fixed_point", "anderson", "broyden", "lbroyden", "newton_krylov"]
CONTINUOUS = ["tsit5", "dopri5"]
ALL_SOLVERS = DISCRETE + CONTINUOUS


def make_solver(name: str, tol: float = 1e-6, max_steps: int = 200):
    """A solver that stops on the absolute residual norm (so tests can compare residuals with ``tol``)."""
    if name in CONTINUOUS:
        return ContinuousDEQSolver(
            name,
            mode="abs_norm",
            ode_abstol=tol,
            ode_reltol=tol,
            abstol_termination=tol,
            reltol_termination=tol,
            max_steps=max_steps,
        )
    return DiscreteDEQSolver(name, mode="abs_norm", abstol_termination=tol, reltol_termination=tol, max_steps=max_steps)


class DenseMap(nn.Module):
    """``f(z, x) = tanh(W z + U x + b)`` with ``||W|| < 1`` (a contraction)."""

    def __init__(self, dz: int, dx: int | None = None, scale: float = 0.4):
        super().__init__()
        self.wz = nn.Linear(dz, dz)
        self.wx = nn.Linear(dx or dz, dz, bias=False)
        with torch.no_grad():
            self.wz.weight.copy_(scale * torch.linalg.qr(torch.randn(dz, dz))[0])

    def forward(self, z, x):
        return torch.tanh(self.wz(z) + self.wx(x))


class ConvMap(nn.Module):
    """``f(z, x) = tanh(conv(z) + conv(x))`` on ``(B, C, H, W)`` with a small ``z`` kernel."""

    def __init__(self, channels: int = 2, cx: int | None = None):
        super().__init__()
        self.cz = nn.Conv2d(channels, channels, 3, padding=1)
        self.cx = nn.Conv2d(cx or channels, channels, 3, padding=1, bias=False)
        with torch.no_grad():
            self.cz.weight.mul_(0.3)

    def forward(self, z, x):
        return torch.tanh(self.cz(z) + self.cx(x))


def grads_of(module: nn.Module):
    return {n: p.grad for n, p in module.named_parameters()}
