"""The exact, O(1)-memory backward of the reversible DEQ iteration (McCallum et al., arXiv 2509.12917).

[`ReversibleSolver`][deqlab.solvers.ReversibleSolver] runs ``y_{n+1} = (1 - β) y_n + β f(z_n)``,
``z_{n+1} = (1 - β) z_n + β f(y_{n+1})``. [`ReversibleBackward`][deqlab.nn.ReversibleBackward] walks that
iteration backwards from the final pair, rebuilding each earlier pair by algebra::

    z_n = (z_{n+1} - β f(y_{n+1})) / (1 - β)
    y_n = (y_{n+1} - β f(z_n)) / (1 - β)

and accumulating the vector-Jacobian products of each step on the way, so it returns the gradient of the
finite iteration (what backprop through the unrolled loop would give) while holding one step's graph at a
time.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

from deqlab import instrument
from deqlab.nn.implicit import BackwardMode, BackwardResult, EquilibriumProblem
from deqlab.solvers.reversible import ReversibleSolver, ReversibleState
from deqlab.state import flatten, unflatten

__all__ = ["ReversibleBackward", "check_reversible_pairing"]

_PAIRING = (
    "ReversibleBackward runs the reversible iteration backwards, so it needs the forward solver "
    "ReversibleSolver (deqlab.solvers.ReversibleSolver(beta=...)); "
)


def check_reversible_pairing(owner: str, solver: Any, backward: Any) -> None:
    """Raise ``ValueError`` unless the reversible solver and the reversible backward come together.

    Why both directions: the backward can only invert the coupled iteration it is given the final pair
    of, and the reversible iteration's exactness is lost behind any other backward (which would also
    differentiate a different object: the fixed point, not the finite iteration).
    """
    rev_solver = isinstance(solver, ReversibleSolver)
    rev_backward = isinstance(backward, ReversibleBackward)
    if rev_backward and not rev_solver:
        raise ValueError(
            f"{owner}: {_PAIRING}got solver={solver!r}. Use solver=ReversibleSolver(...), or pick "
            f"another backward (ImplicitBackward(), JacobianFreeBackward(), PhantomGradient()) for "
            f"this solver."
        )
    if rev_solver and not rev_backward:
        raise ValueError(
            f"{owner}: ReversibleSolver is paired with the exact reversible backward; got "
            f"backward={backward!r}. Pass backward=ReversibleBackward() (or leave backward unset, "
            f"which picks it), or use another solver (e.g. DiscreteDEQSolver) with this backward."
        )


class ReversibleBackward(BackwardMode):
    """Exact gradient of the reversible iteration, in memory independent of its number of steps.

    Pair it with [`ReversibleSolver`][deqlab.solvers.ReversibleSolver] (a DEQ layer with that solver picks
    it by default; any other pairing raises ``ValueError``). From the final pair ``(y_N, z_N)`` it undoes
    each sample's own steps, one at a time: rebuilding ``z_n`` costs one evaluation of ``f`` at
    ``y_{n+1}``, rebuilding ``y_n`` one at ``z_n``, and the VJP of each evaluation (w.r.t. the state,
    ``x``, the parameters) is taken through the graph that evaluation built, which is then freed. So the
    backward costs ``2 N`` evaluations, each with its VJP (``backward_nfe`` counts ``2 N``), and holds one evaluation's graph at a time
    (no stored iterates, no adjoint linear solve), and its gradient is the one backprop through the
    unrolled ``N`` steps would give (the start ``z_0`` is treated as a constant, as the layer detaches it).

    Honest about rounding: the inverse of a contracting step expands, so rounding errors in the rebuilt
    pairs grow by about the inverse of the forward's convergence rate per reversed step (``1 / (1 - β)``
    and more). The backward measures where it lands: the rebuilt ``(ŷ_0, ẑ_0)`` is compared with the
    stored start ``z_0``, and the per-sample relative reconstruction error
    ``max(||ŷ_0 − z_0||, ||ẑ_0 − z_0||) / max(||z_0||, ||z_N||)`` is written to
    ``solution.backward_residual``. It grows quickly with the number of steps (tanh map, β = 0.8: float64
    1e-12 / 1e-8 / 4 after 5 / 10 / 20 steps, float32 6e-4 / 7 / 1e8). The *gradient* degrades far less,
    because the cotangent decays backwards at the rate the reconstruction error grows (the same map
    measured against autograd through the unrolled loop: relative error 1e-15 to 1e-11 in float64, 2e-7
    to 5e-5 in float32 up to 40 steps); see docs/backward_modes.md. A non-finite gradient sets
    ``backward_converged = False``.

    Per-sample early stopping: each sample is reversed by its own number of steps
    (``solver_result.reversible.steps``); a sample that stopped earlier stays frozen (identity) during
    the later steps, exactly as in the forward. The map is evaluated on the whole batch each step, as in
    the forward, so maps that couple samples (batch statistics) are differentiated exactly too.

    Args:
        reconstruction_tol: when given, the backward reports ``backward_converged = False`` (and the
            layer's ``on_unconverged`` policy warns) if a sample's reconstruction error exceeds it.
            Default ``None``: no tolerance, ``backward_converged`` is ``None`` unless the gradient is
            non-finite (then ``False``).
        warn_unconverged: ``None`` (default) follows the layer's policy; ``True``/``False``: always / never
            warn for this backward.

    Raises:
        ValueError: ``reconstruction_tol`` is negative; at backward time, the forward was not a
            ``ReversibleSolver`` solve (see above).

    Example:
        For ``f = z/2 + x`` the fixed point is ``2x``; the gradient of the finite iteration approaches 2:

        >>> import torch
        >>> from torch import nn
        >>> from deqlab.nn import DEQ, ReversibleBackward
        >>> from deqlab.solvers import ReversibleSolver
        >>> class Half(nn.Module):
        ...     def forward(self, z, x):
        ...         return 0.5 * z + x
        >>> solver = ReversibleSolver(beta=0.8, mode="abs_norm", abstol_termination=1e-4, max_steps=100)
        >>> x = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
        >>> z_star, solution = DEQ(Half(), solver, backward=ReversibleBackward())(x)
        >>> z_star.sum().backward()
        >>> round(float(x.grad[0, 0]), 3), solution.solver_result.steps, solution.backward_nfe
        (2.0, 14, 28)
        >>> bool(solution.backward_residual.max() < 1e-2)     # reconstruction error of (y_0, z_0)
        True
    """

    def __init__(self, reconstruction_tol: Optional[float] = None, *, warn_unconverged: Optional[bool] = None):
        if reconstruction_tol is not None and (
            not isinstance(reconstruction_tol, (int, float)) or not reconstruction_tol >= 0
        ):
            raise ValueError(
                f"ReversibleBackward: reconstruction_tol must be a number >= 0 or None, got {reconstruction_tol!r}"
            )
        self.reconstruction_tol = None if reconstruction_tol is None else float(reconstruction_tol)
        self.warn_unconverged = warn_unconverged

    def gradients(self, problem: EquilibriumProblem, v: Tensor) -> BackwardResult:
        result = getattr(problem, "solver_result", None)
        rev: Optional[ReversibleState] = getattr(result, "reversible", None)
        if rev is None:
            raise ValueError(
                "ReversibleBackward: " + _PAIRING + "this forward was solved by another solver "
                "(its SolverResult has no reversible state), or in fixed-depth mode."
            )
        with instrument.region("adjoint.reversible"):
            return self._reverse(problem, rev, v)

    def _reverse(self, problem: EquilibriumProblem, rev: ReversibleState, v: Tensor) -> BackwardResult:
        like = problem.z_star
        beta, keep = rev.beta, 1.0 - rev.beta
        needs = problem.needs
        x_ = problem.x.detach().requires_grad_(bool(needs[0]))
        state = [t.detach().requires_grad_() for t in problem.grad_state]
        candidates = [x_, *problem.params, *state]
        wanted = [i for i, n in enumerate(needs) if n and candidates[i].requires_grad]
        acc: List[Optional[Tensor]] = [None] * len(candidates)
        dtype = v.dtype
        y = rev.y.detach().to(dtype)
        z = flatten([t.detach() for t in like])
        ybar = torch.zeros_like(z)
        zbar = v.detach().clone()
        steps = rev.steps
        n_steps = int(steps.max()) if steps.numel() else 0
        nfe = 0

        def evaluate_vjp(u: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
            """``f(u)`` (detached) after adding ``wᵀ ∂f/∂(x, θ, state)`` to ``acc``; returns (f(u), wᵀ ∂f/∂u)."""
            nonlocal nfe
            nfe += 1
            uv = u.detach().requires_grad_()
            with torch.enable_grad():
                fu = flatten(problem.evaluate(unflatten(uv, like), x_, state))
            inputs = [uv] + [candidates[i] for i in wanted]
            grads = torch.autograd.grad(fu, inputs, w, allow_unused=True)
            for i, g in zip(wanted, grads[1:]):
                if g is not None:
                    before = acc[i]
                    acc[i] = g if before is None else before + g
            gu = grads[0] if grads[0] is not None else torch.zeros_like(u)
            return fu.detach(), gu

        with torch.no_grad():
            for n in range(n_steps - 1, -1, -1):  # undo step n -> n + 1 for the samples that took it
                m = (steps > n).unsqueeze(1)
                # z_{n+1} = (1 - β) z_n + β f(y_{n+1})
                fy, gy = evaluate_vjp(y, torch.where(m, beta * zbar, torch.zeros_like(zbar)))
                ybar = ybar + gy
                z = torch.where(m, (z - beta * fy) / keep, z)
                zbar = torch.where(m, keep * zbar, zbar)
                # y_{n+1} = (1 - β) y_n + β f(z_n)
                fz, gz = evaluate_vjp(z, torch.where(m, beta * ybar, torch.zeros_like(ybar)))
                zbar = zbar + gz
                y = torch.where(m, (y - beta * fz) / keep, y)
                ybar = torch.where(m, keep * ybar, ybar)
            z0 = rev.z0.to(dtype)
            err = torch.maximum((y - z0).norm(dim=1), (z - z0).norm(dim=1))
            scale = torch.maximum(z0.norm(dim=1), flatten([t.detach() for t in like]).norm(dim=1))
            residual = (err / torch.where(scale > 0, scale, torch.ones_like(scale))).float()
        grads: List[Optional[Tensor]] = list(acc)
        for i in range(1, 1 + len(problem.params)):  # DDP expects a gradient for every parameter
            if needs[i] and grads[i] is None:
                grads[i] = torch.zeros_like(candidates[i])
        finite = all(g is None or bool(torch.isfinite(g).all()) for g in grads)
        if not finite:
            converged: Optional[bool] = False
        elif self.reconstruction_tol is not None:
            converged = bool((residual <= self.reconstruction_tol).all())
        else:
            converged = None
        return BackwardResult(grads=grads, nfe=nfe, residual=residual, converged=converged)
