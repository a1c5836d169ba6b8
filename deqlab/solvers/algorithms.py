"""Discrete fixed-point algorithms as small strategy objects.

Each algorithm sees flat ``(B, N)`` iterates and a counted map ``F``. The driver
([`deqlab.solvers.discrete.DiscreteDEQSolver`][deqlab.solvers.DiscreteDEQSolver]) owns the loop, the termination test and the result;
an algorithm only proposes the next iterate and returns it together with ``F`` at that iterate (so a line
search never costs an extra evaluation). Every sample is its own system: all linear algebra is batched
per sample and no algorithm synchronises with the host.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Tuple, Union

import torch
from torch import Tensor

from deqlab.solvers._checks import check_int as _check_int
from deqlab.solvers._checks import check_number as _check_number
from deqlab.solvers.krylov import gmres
from deqlab.state import batch_dot, batch_norm

FlatMap = Callable[[Tensor], Tensor]


class FixedPointAlgorithm:
    """Base class: ``init`` builds per-solve state, ``step`` returns ``(z_next, F(z_next), state)``.

    Subclass it to write your own algorithm: the driver ([`DiscreteDEQSolver`][deqlab.solvers.DiscreteDEQSolver])
    owns the loop, the termination test, the step cap and the result, so an algorithm only proposes the
    next iterate on flat ``(B, N)`` tensors. Return ``F(z_next)`` with it, so the driver never evaluates
    twice. Do not modify ``z``/``fz`` in place: the termination tracker keeps references to them.

    Attributes:
        name: short name used in the driver's error messages (e.g. ``"anderson"``).

    Example:
        >>> import torch
        >>> from deqlab.solvers import DiscreteDEQSolver, FixedPointAlgorithm
        >>> class HalfStep(FixedPointAlgorithm):   # z <- z + (f(z) - z) / 2
        ...     name = "half_step"
        ...     def step(self, state, z, fz, g, F):
        ...         z_new = z + 0.5 * g
        ...         return z_new, F(z_new), state
        >>> res = DiscreteDEQSolver(HalfStep(), mode="abs_norm", abstol_termination=1e-8, max_steps=100)(
        ...     lambda z: 0.5 * z + 1, torch.zeros(2, 3, dtype=torch.float64))
        >>> res.status, res.z.round(decimals=6)[0], res.nfe == res.steps + 1
        (<SolverStatus.CONVERGED: 'converged'>, tensor([2., 2., 2.], dtype=torch.float64), True)
    """

    name = "base"

    def init(self, z: Tensor, fz: Tensor, max_steps: int) -> Any:
        """Build the per-solve state (buffers, counters) before the first step; the base has none.

        Args:
            z: the flat ``(B, N)`` initial iterate.
            fz: ``F(z)``, already evaluated by the driver.
            max_steps: the solve's step cap, for algorithms that size buffers by it (full Broyden).

        Returns:
            Any object; the driver hands it to every `step` unchanged.
        """
        return None

    def step(self, state: Any, z: Tensor, fz: Tensor, g: Tensor, F: FlatMap) -> Tuple[Tensor, Tensor, Any]:
        """Propose the next iterate.

        Args:
            state: what `init` (or the previous step) returned.
            z: the current flat ``(B, N)`` iterate.
            fz: ``F(z)``.
            g: the residual ``fz - z``.
            F: the counted flat map: every call is one evaluation of ``f`` (the solver's NFE).

        Returns:
            ``(z_new, F(z_new), state)``.

        Raises:
            NotImplementedError: in the base class; subclasses implement it.
        """
        raise NotImplementedError

    #: Whether `select` is implemented, i.e. the algorithm can follow a shrinking working batch
    #: (``DiscreteDEQSolver(per_sample_exit=True)``). Subclasses that keep per-sample state set it with
    #: their own ``select``.
    supports_select = False

    def select(self, state: Any, keep: Tensor) -> Any:
        """The per-solve state of the samples ``keep`` (positions in the current working batch).

        Per-sample early exit drops the samples that have stopped from the working batch; an algorithm
        whose state holds one entry per sample (histories, low-rank Jacobians) must index it the same way,
        so every kept sample goes on exactly as in the full batch. Stateless algorithms return ``state``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement select(state, keep), which per_sample_exit=True needs"
        )

    @property
    def supports_compile(self) -> bool:
        """Whether ``DiscreteDEQSolver(compile=True)`` can compile this algorithm's step: it implements
        `pure_init` and either the split pair `pure_propose` / `pure_absorb` (the built-in algorithms) or
        the fused `pure_step`. Otherwise the solver runs eager, with one warning."""
        return self.supports_split or type(self).pure_step is not FixedPointAlgorithm.pure_step

    @property
    def supports_split(self) -> bool:
        """Whether the step is written as `pure_propose` + `pure_absorb`, which lets the solver compile the
        algorithm's algebra while ``f`` runs eager (``compile_map=False``: a map that cannot be traced,
        such as the autograd VJPs of an adjoint solve)."""
        return type(self).pure_propose is not FixedPointAlgorithm.pure_propose

    def pure_init(self, z: Tensor, fz: Tensor, max_steps: int) -> dict:
        """The per-solve state of the compiled step: a dict of tensors only (no Python counters), so a
        compiled step neither guards on nor recompiles for the step number.

        Args:
            z: the flat ``(B, N)`` initial iterate.
            fz: ``F(z)``.
            max_steps: the solve's step cap.

        Returns:
            A dict of tensors, handed to every `pure_propose` / `pure_absorb` (or `pure_step`).

        Raises:
            NotImplementedError: when `supports_compile` is False.
        """
        raise NotImplementedError(f"{type(self).__name__} has no pure step to compile")

    def pure_propose(self, state: dict, z: Tensor, fz: Tensor, g: Tensor, count: Optional[int]) -> Tensor:
        """The first half of a compiled step: the next iterate from the state, without calling ``f``.

        A pure function of tensors: no host synchronisation, no Python branch on a tensor's value, buffers
        of a fixed shape (the compiled step is one graph for every step).

        Args:
            state: what `pure_init` (or the previous `pure_absorb`) returned.
            z: the current flat ``(B, N)`` iterate.
            fz: ``F(z)``.
            g: ``fz - z``.
            count: the steps taken before this one (0 for the first), a host integer the loop knows anyway,
                or ``None`` when the step must not depend on it (a CUDA graph replayed for every block):
                then use fixed shapes only. An algorithm may shape
                its work by an integer ``count`` (Broyden multiplies by the ``min(count, memory)`` pairs
                written so far); the compiled step then specialises on it for ``count`` 0 and 1 and is one
                graph with a symbolic ``count`` after that, so use it only where the saving is worth those
                few graphs.

        Returns:
            ``z_next`` in the dtype of ``z``.

        Raises:
            NotImplementedError: when the algorithm has no split step.
        """
        raise NotImplementedError(f"{type(self).__name__} has no split pure step")

    def pure_absorb(
        self, state: dict, z: Tensor, fz: Tensor, g: Tensor, z_new: Tensor, fz_new: Tensor, count: Optional[int]
    ) -> dict:
        """The second half of a compiled step: the state after ``z_new`` and ``F(z_new)``.

        It may write the state's buffers in place (ring-buffer slots: a functional copy would copy the
        whole history every step) and return the same tensors in a new dict; the solver never reads a state
        it has handed on. Together with `pure_propose` it proposes the iterates of `step` up to rounding
        (the equality tests check it).

        Args:
            state: the state `pure_propose` saw.
            z: the iterate `pure_propose` saw.
            fz: ``F(z)``.
            g: ``fz - z``.
            z_new: what `pure_propose` returned.
            fz_new: ``F(z_new)``.
            count: as in `pure_propose`.

        Returns:
            The new state.

        Raises:
            NotImplementedError: when the algorithm has no split step.
        """
        raise NotImplementedError(f"{type(self).__name__} has no split pure step")

    def pure_step(self, state: dict, z: Tensor, fz: Tensor, g: Tensor, F: FlatMap) -> Tuple[Tensor, Tensor, dict]:
        """A fused compiled step, for an algorithm whose proposal needs ``F`` itself (a user's algorithm
        that evaluates ``F`` in the middle of its update); the built-in algorithms implement
        `pure_propose` / `pure_absorb` instead. Same purity rules, and exactly one call of ``F`` (the solver
        counts NFE on the host).

        Args:
            state: what `pure_init` (or the previous `pure_step`) returned.
            z: the current flat ``(B, N)`` iterate.
            fz: ``F(z)``.
            g: ``fz - z``.
            F: the flat map (uncounted).

        Returns:
            ``(z_new, F(z_new), new state)``.

        Raises:
            NotImplementedError: when the algorithm has no fused pure step.
        """
        raise NotImplementedError(f"{type(self).__name__} has no pure step to compile")

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class FixedPointIteration(FixedPointAlgorithm):
    """Damped Picard iteration ``z <- (1 - damping) z + damping f(z)``: one evaluation per step.

    The right choice when ``f`` is a strong contraction; also the cheapest backward solver. It keeps no
    memory and does no linear algebra, so each step costs one evaluation and nothing else; it converges
    linearly at the contraction rate of ``f`` (and not at all when ``f`` is not a contraction).

    Args:
        damping: step fraction ``d`` in ``(0, 1]``. Default 1.0: the plain Picard step ``z <- f(z)``,
            the fastest when ``f`` contracts; a smaller value (e.g. 0.5) tames a map whose iterates
            oscillate (Jacobian eigenvalues near -1), at the price of slower convergence elsewhere.

    Raises:
        ValueError: ``damping`` is not a finite number in ``(0, 1]``.

    Example:
        >>> import torch
        >>> from deqlab.solvers import DiscreteDEQSolver, FixedPointIteration
        >>> solver = DiscreteDEQSolver(FixedPointIteration(), mode="abs_norm", abstol_termination=1e-10,
        ...                            max_steps=100)
        >>> res = solver(torch.cos, torch.zeros(2, 3, dtype=torch.float64))   # z* = cos(z*) = 0.739085...
        >>> res.status, res.steps, res.z.round(decimals=6)[0]
        (<SolverStatus.CONVERGED: 'converged'>, 59, tensor([0.7391, 0.7391, 0.7391], dtype=torch.float64))
    """

    name = "fixed_point"

    def __init__(self, damping: float = 1.0):
        self.damping = _check_number("FixedPointIteration", "damping", damping, low=0.0, high=1.0, low_open=True)

    def step(self, state, z, fz, g, F):
        z_new = fz if self.damping == 1.0 else torch.add(z, g, alpha=self.damping)
        return z_new, F(z_new), state

    supports_select = True

    def select(self, state, keep):
        return state

    def pure_init(self, z, fz, max_steps):
        return {}

    def pure_propose(self, state, z, fz, g, count):
        return fz if self.damping == 1.0 else torch.add(z, g, alpha=self.damping)

    def pure_absorb(self, state, z, fz, g, z_new, fz_new, count):
        return state


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of an algorithm's internal linear algebra: float32 for half-precision states (CPU has no
    half-precision LU or triangular solves, and 8 mantissa bits cannot hold a Gram matrix), else the
    state's own dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class Anderson(FixedPointAlgorithm):
    """Anderson acceleration (type II) with ``memory`` past iterates.

    Mixing weights minimise the norm of the combined residual subject to summing to one, found from the
    small Gram matrix of the stored residuals. ``regularization`` is relative to the Gram matrix's scale so
    it neither dominates once residuals are tiny nor vanishes for large ones; it is never taken below
    ``10 eps`` of the working precision, where it would be lost to rounding (collinear residuals, e.g.
    on an affine map, make the Gram matrix singular to working precision).

    The stored iterates, residuals and the Gram matrix are kept in float32 for float16/bfloat16 states,
    so the small solve is as accurate as for a float32 state; the next iterate is cast back.

    Args:
        memory: past iterates kept, ``m >= 1``. Default 5: on contractive maps a few past residuals
            already give most of the acceleration, while each one more costs two ``(B, N)`` buffers and
            makes the small Gram matrix worse conditioned.
        mixing: ``beta`` in ``(0, 1]``: the next iterate mixes the combined ``f`` values with weight
            ``beta`` and the combined iterates with ``1 - beta``. Default 1.0: the undamped type-II
            update, which also skips storing the past iterates; lower it for maps that oscillate.
        regularization: Tikhonov shift of the Gram matrix, relative to its mean diagonal, ``>= 0``.
            Default ``1e-8``: too small to bias the mixing weights, large enough (with the ``10 eps``
            floor) to keep the solve finite when the stored residuals are collinear.

    Raises:
        ValueError: ``memory`` is not an int >= 1, ``mixing`` is not in ``(0, 1]``, or
            ``regularization`` is not a finite number >= 0.

    Example:
        >>> import torch
        >>> from deqlab.solvers import Anderson, DiscreteDEQSolver
        >>> solver = DiscreteDEQSolver(Anderson(memory=5), mode="abs_norm", abstol_termination=1e-10)
        >>> res = solver(torch.cos, torch.zeros(2, 3, dtype=torch.float64))   # Picard needs 59 steps
        >>> res.status, res.steps, res.z.round(decimals=6)[0]
        (<SolverStatus.CONVERGED: 'converged'>, 13, tensor([0.7391, 0.7391, 0.7391], dtype=torch.float64))
    """

    name = "anderson"

    def __init__(self, memory: int = 5, mixing: float = 1.0, regularization: float = 1e-8):
        self.memory = _check_int("Anderson", "memory", memory, low=1)
        self.mixing = _check_number("Anderson", "mixing", mixing, low=0.0, high=1.0, low_open=True)
        self.regularization = _check_number("Anderson", "regularization", regularization, low=0.0)

    def init(self, z, fz, max_steps):
        B, N = z.shape
        m = self.memory
        wd = _work_dtype(z.dtype)
        g = fz - z
        state = {
            "F": z.new_empty(B, m, N, dtype=wd),
            "G": z.new_empty(B, m, N, dtype=wd),
            # X is only read when mixing < 1 (then z_new also mixes the previous iterates).
            "X": z.new_empty(B, m, N, dtype=wd) if self.mixing != 1.0 else None,
            "H": z.new_zeros(B, m, m, dtype=wd),  # Gram matrix of the stored residuals, kept up to date row by row
            "eye": torch.eye(m, dtype=wd, device=z.device),
            "ones": z.new_ones(B, m, 1, dtype=wd),
            "shift": self.regularization + 10 * torch.finfo(wd).eps,
            "tiny": torch.finfo(wd).tiny ** 0.5,
            "k": 0,
        }
        self._store(state, z, fz, g)
        return state

    def _store(self, state, z, fz, g) -> None:
        slot = state["k"] % self.memory
        n = min(state["k"] + 1, self.memory)
        state["F"][:, slot] = fz
        state["G"][:, slot] = g
        if state["X"] is not None:
            state["X"][:, slot] = z
        g_w = state["G"][:, slot]  # g in the working dtype
        row = torch.bmm(g_w.unsqueeze(1), state["G"][:, :n].transpose(1, 2)).squeeze(1)  # (B, n)
        state["H"][:, slot, :n] = row
        state["H"][:, :n, slot] = row
        state["k"] += 1

    def step(self, state, z, fz, g, F):
        n = min(state["k"], self.memory)
        H = state["H"][:, :n, :n]
        scale = H.diagonal(dim1=1, dim2=2).mean(dim=1)
        shift = state["shift"] * scale + state["tiny"]
        H = H + shift.view(-1, 1, 1) * state["eye"][:n, :n]
        y = torch.linalg.solve_ex(H, state["ones"][:, :n])[0]
        alpha_t = (y / y.sum(dim=1, keepdim=True)).transpose(1, 2)  # (B, 1, n), weights sum to one
        z_new = torch.bmm(alpha_t, state["F"][:, :n]).squeeze(1)
        if self.mixing != 1.0:
            z_new = self.mixing * z_new + (1 - self.mixing) * torch.bmm(alpha_t, state["X"][:, :n]).squeeze(1)
        z_new = z_new.to(z.dtype)
        fz_new = F(z_new)
        self._store(state, z_new, fz_new, fz_new - z_new)
        return z_new, fz_new, state

    supports_select = True

    # The pure step keeps all ``memory`` slots from the start (zero-filled) and masks the ones not yet
    # written, instead of slicing the first ``n``: a slice whose length grows with the step would be a new
    # shape -- a recompilation -- for each of the first ``memory`` steps. The masked Gram matrix is
    # block-diagonal, ``[[H_n, 0], [0, I]]`` with a zero right-hand side in the unused block, so its solution
    # is ``H_n``'s padded with zeros: the same mixing weights up to rounding. Slots are written in place.

    def pure_init(self, z, fz, max_steps):
        B, N = z.shape
        m = self.memory
        wd = _work_dtype(z.dtype)
        state = {
            "F": z.new_zeros(B, m, N, dtype=wd),
            "G": z.new_zeros(B, m, N, dtype=wd),
            "H": z.new_zeros(B, m, m, dtype=wd),
            "k": torch.zeros((), dtype=torch.long, device=z.device),
        }
        if self.mixing != 1.0:
            state["X"] = z.new_zeros(B, m, N, dtype=wd)
        return self._pure_store(state, z, fz, fz - z)

    def _pure_store(self, state: dict, z: Tensor, fz: Tensor, g: Tensor) -> dict:
        G = state["G"]
        wd = G.dtype
        slot = (state["k"] % self.memory).view(1)
        state["F"].index_copy_(1, slot, fz.to(wd).unsqueeze(1))
        G.index_copy_(1, slot, g.to(wd).unsqueeze(1))
        if "X" in state:
            state["X"].index_copy_(1, slot, z.to(wd).unsqueeze(1))
        row = torch.bmm(g.to(wd).unsqueeze(1), G.transpose(1, 2))  # (B, 1, m): zero at unwritten slots
        H = state["H"]
        H.index_copy_(1, slot, row)
        H.index_copy_(2, slot, row.transpose(1, 2))
        return {**state, "k": state["k"] + 1}

    def pure_propose(self, state, z, fz, g, count):
        H = state["H"]
        m, wd = self.memory, H.dtype
        n = state["k"].clamp(max=m)
        valid = torch.arange(m, device=z.device) < n  # (m,): slots written so far
        both = valid.unsqueeze(0) & valid.unsqueeze(1)
        eye = torch.eye(m, dtype=wd, device=z.device)
        scale = (H.diagonal(dim1=1, dim2=2) * valid).sum(dim=1) / n.to(wd)
        shift = (self.regularization + 10 * torch.finfo(wd).eps) * scale + torch.finfo(wd).tiny ** 0.5
        H = torch.where(both, H + shift.view(-1, 1, 1) * eye, eye)
        rhs = valid.to(wd).view(1, m, 1).expand(H.shape[0], m, 1)
        y = torch.linalg.solve_ex(H, rhs)[0]
        alpha_t = (y / y.sum(dim=1, keepdim=True)).transpose(1, 2)  # (B, 1, m), zero at unwritten slots
        z_new = torch.bmm(alpha_t, state["F"]).squeeze(1)
        if self.mixing != 1.0:
            z_new = self.mixing * z_new + (1 - self.mixing) * torch.bmm(alpha_t, state["X"]).squeeze(1)
        return z_new.to(z.dtype)

    def pure_absorb(self, state, z, fz, g, z_new, fz_new, count):
        return self._pure_store(state, z_new, fz_new, fz_new - z_new)

    def select(self, state, keep):
        for key in ("F", "G", "X", "H", "ones"):
            if state[key] is not None:
                state[key] = state[key].index_select(0, keep)
        return state


def _line_search(
    z: Tensor, dz: Tensor, g_norm: Tensor, F: FlatMap, max_trials: int, c: float = 1e-4
) -> Tuple[Tensor, Tensor]:
    """Per-sample backtracking on ``||f(z) - z||``: halve the step of each sample that did not reduce
    its residual enough. Every trial is one batched evaluation; samples that never succeed take the
    smallest step tried."""
    alpha = torch.ones_like(g_norm)
    z_new = z + dz
    fz_new = F(z_new)
    for _ in range(max_trials):
        new_norm = batch_norm(fz_new - z_new)  # float32 for half-precision states
        bad = ~(new_norm <= (1 - c * alpha) * g_norm)
        if not bool(bad.any()):
            break
        alpha = torch.where(bad, alpha * 0.5, alpha)
        z_try = z + (alpha.unsqueeze(1) * dz).to(z.dtype)
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

    Quasi-Newton steps do not need ``f`` to be a contraction: Broyden also finds repelling fixed points
    (``z = 2 z + 1``) that plain iteration cannot reach.

    Args:
        memory: rank-one pairs kept, ``>= 1``, or ``None``. Default ``None``: one pair per step, i.e. full
            Broyden within ``max_steps`` (the best convergence, memory ``O(max_steps * N)`` per sample);
            an int bounds the memory, as [`LimitedMemoryBroyden`][deqlab.solvers.LimitedMemoryBroyden] does.
        line_search: per-sample backtracking on ``||f(z) - z||``. Default ``False``: each trial costs one
            more evaluation and the full step is usually accepted near the fixed point; enable it when
            Broyden steps overshoot and the residual grows.
        max_line_search: halvings per step at most, ``>= 0``. Default 5: the smallest step tried is
            1/32 of the Broyden step; a direction that needs less is unlikely to be worth more trials.

    Raises:
        ValueError: ``memory`` is neither ``None`` nor an int >= 1, or ``max_line_search`` is not an
            int >= 0.

    Example:
        >>> import torch
        >>> from deqlab.solvers import Broyden, DiscreteDEQSolver
        >>> solver = DiscreteDEQSolver(Broyden(), mode="abs_norm", abstol_termination=1e-10)
        >>> res = solver(torch.cos, torch.zeros(2, 3, dtype=torch.float64))
        >>> res.status, res.steps, res.z.round(decimals=6)[0]
        (<SolverStatus.CONVERGED: 'converged'>, 6, tensor([0.7391, 0.7391, 0.7391], dtype=torch.float64))
        >>> solver(lambda z: 2 * z + 1, torch.zeros(1, 2, dtype=torch.float64)).z   # repelling, still found
        tensor([[-1., -1.]], dtype=torch.float64)
    """

    name = "broyden"

    def __init__(self, memory: Optional[int] = None, line_search: bool = False, max_line_search: int = 5):
        owner = type(self).__name__
        self.memory = None if memory is None else _check_int(owner, "memory", memory, low=1)
        self.line_search = bool(line_search)
        self.max_line_search = _check_int(owner, "max_line_search", max_line_search, low=0)

    def init(self, z, fz, max_steps):
        B, N = z.shape
        m = max(1, max_steps if self.memory is None else min(self.memory, max_steps))
        # Only slots already written are ever read, so the buffers need no zero fill.
        # float32 for half-precision states (the low-rank inverse Jacobian accumulates many updates).
        wd = _work_dtype(z.dtype)
        return {
            "U": z.new_empty(B, m, N, dtype=wd),
            "V": z.new_empty(B, m, N, dtype=wd),
            "n": 0,
            "k": 0,
            "Jg": -(fz - z).to(wd),
        }

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
        wd = U.dtype  # the working dtype (.to is free when it is the state's own)
        dz = (-state["Jg"]).to(z.dtype)  # J^{-1} g is carried over from the previous update: no product needed
        if self.line_search:
            z_new, fz_new = _line_search(z, dz, batch_norm(g), F, self.max_line_search)
        else:
            z_new = z + dz
            fz_new = F(z_new)
        g_new = (fz_new - z_new).to(wd)
        g = g.to(wd)
        s = z_new.to(wd) - z.to(wd)
        # Two low-rank products per step: J^{-1} g_new (which also gives J^{-1} y = J^{-1} g_new - J^{-1} g)
        # and s^T J^{-1}.
        Jg_new = self._matvec(U, V, g_new) if n else -g_new
        vT = self._rmatvec(U, V, s) if n else -s
        Jy = Jg_new - state["Jg"]
        den = batch_dot(vT, g_new - g)
        eps = torch.finfo(wd).eps
        ok = (
            den.abs()
            > eps * torch.linalg.vector_norm(vT, dim=1) * torch.linalg.vector_norm(g_new - g, dim=1)
            + torch.finfo(wd).tiny
        )
        u = (s - Jy) * (ok / torch.where(ok, den, torch.ones_like(den))).unsqueeze(1)
        m = state["U"].shape[1]
        slot = state["k"] % m
        if n == m:  # the oldest pair is overwritten: take its term out of J^{-1} g_new
            Jg_new = Jg_new - state["U"][:, slot] * batch_dot(state["V"][:, slot], g_new).unsqueeze(1)
        state["U"][:, slot] = u
        state["V"][:, slot] = vT
        state["Jg"] = Jg_new + u * batch_dot(vT, g_new).unsqueeze(1)
        state["k"] += 1
        state["n"] = min(n + 1, m)
        return z_new, fz_new, state

    supports_select = True

    @property
    def supports_split(self) -> bool:
        return not self.line_search  # the line search asks the host whether any sample must backtrack

    # The pure step multiplies by the ``min(count, m)`` pairs written so far, as the eager step does: the
    # host's step count shapes the products (one graph for ``count`` 0, one for 1, one symbolic graph for
    # the rest, and one once the memory wraps around), where zero-padded products over all ``m`` pairs
    # would cost ``m / n`` times the work (50 pairs for full Broyden's first steps). With ``count=None``
    # (a CUDA graph replayed for every block) it multiplies by all ``m`` zero-filled pairs instead: an unwritten
    # pair adds an exact zero. Pairs are written in place.

    def pure_init(self, z, fz, max_steps):
        B, N = z.shape
        m = max(1, max_steps if self.memory is None else min(self.memory, max_steps))
        wd = _work_dtype(z.dtype)
        return {
            "U": z.new_zeros(B, m, N, dtype=wd),
            "V": z.new_zeros(B, m, N, dtype=wd),
            # the slot as a tensor: an index computed from the symbolic ``count`` would guard on its value
            "k": torch.zeros((), dtype=torch.long, device=z.device),
            "Jg": -(fz - z).to(wd),
        }

    def pure_propose(self, state, z, fz, g, count):
        return z + (-state["Jg"]).to(z.dtype)

    def pure_absorb(self, state, z, fz, g, z_new, fz_new, count):
        U, V = state["U"], state["V"]
        wd, m = U.dtype, U.shape[1]
        n = m if count is None else min(count, m)  # pairs read: those written before this step, or all
        g_new = (fz_new - z_new).to(wd)
        g = g.to(wd)
        s = z_new.to(wd) - z.to(wd)
        if n > 0:
            Jg_new = self._matvec(U[:, :n], V[:, :n], g_new)
            vT = self._rmatvec(U[:, :n], V[:, :n], s)
        else:
            Jg_new, vT = -g_new, -s
        Jy = Jg_new - state["Jg"]
        den = batch_dot(vT, g_new - g)
        eps = torch.finfo(wd).eps
        ok = (
            den.abs()
            > eps * torch.linalg.vector_norm(vT, dim=1) * torch.linalg.vector_norm(g_new - g, dim=1)
            + torch.finfo(wd).tiny
        )
        u = (s - Jy) * (ok / torch.where(ok, den, torch.ones_like(den))).unsqueeze(1)
        k = state["k"]
        slot = (k % m).view(1)
        if count is None or count >= m:  # the oldest pair is overwritten: take its term out of J^{-1} g_new
            u_old = U.index_select(1, slot).squeeze(1)
            removed = Jg_new - u_old * batch_dot(V.index_select(1, slot).squeeze(1), g_new).unsqueeze(1)
            Jg_new = removed if count is not None else torch.where(k >= m, removed, Jg_new)
        U.index_copy_(1, slot, u.unsqueeze(1))
        V.index_copy_(1, slot, vT.unsqueeze(1))
        return {"U": U, "V": V, "k": k + 1, "Jg": Jg_new + u * batch_dot(vT, g_new).unsqueeze(1)}

    def select(self, state, keep):
        for key in ("U", "V", "Jg"):
            state[key] = state[key].index_select(0, keep)
        return state


class LimitedMemoryBroyden(Broyden):
    """Broyden with a bounded memory of ``memory`` rank-one updates (MDEQ's and the paper's default);
    memory grows as ``O(memory * N)`` per sample whatever ``max_steps`` is.

    Within ``max_steps <= memory`` it takes exactly the steps of [`Broyden`][deqlab.solvers.Broyden]; past that, the oldest
    pair is overwritten. The default algorithm of [`DiscreteDEQSolver`][deqlab.solvers.DiscreteDEQSolver].

    Args:
        memory: rank-one pairs kept, ``>= 1``. Default 27: MDEQ's setting, which the paper follows; it
            covers most solves of a trained DEQ in full while bounding the memory of a long one.
        line_search: per-sample backtracking, as in [`Broyden`][deqlab.solvers.Broyden]. Default ``False`` (each trial
            costs one evaluation).
        max_line_search: halvings per step at most, ``>= 0``. Default 5, as in [`Broyden`][deqlab.solvers.Broyden].

    Raises:
        ValueError: ``memory`` is not an int >= 1, or ``max_line_search`` is not an int >= 0.

    Example:
        >>> import torch
        >>> from deqlab.solvers import DiscreteDEQSolver, LimitedMemoryBroyden
        >>> solver = DiscreteDEQSolver(LimitedMemoryBroyden(memory=3), mode="abs_norm", abstol_termination=1e-10)
        >>> res = solver(torch.cos, torch.zeros(2, 3, dtype=torch.float64))   # full Broyden: 6 steps
        >>> res.status, res.steps, res.z.round(decimals=6)[0]
        (<SolverStatus.CONVERGED: 'converged'>, 11, tensor([0.7391, 0.7391, 0.7391], dtype=torch.float64))
    """

    name = "lbroyden"

    def __init__(self, memory: int = 27, line_search: bool = False, max_line_search: int = 5):
        super().__init__(memory=memory, line_search=line_search, max_line_search=max_line_search)


class NewtonKrylov(FixedPointAlgorithm):
    """Jacobian-free Newton–Krylov: solve ``(J_f - I) p = -(f(z) - z)`` with GMRES on Jacobian-vector
    products, then ``z <- z + p``.

    Quadratic convergence near the fixed point for maps that are hard for Broyden; each GMRES iteration
    costs one JVP, counted as one evaluation. ``jvp="fd"`` (default) uses a forward finite difference —
    exactly one evaluation of ``f`` and available for every map; ``"forward"`` uses forward-mode AD
    (``torch.func.jvp``), exact but several times the cost of an evaluation.

    ``inner_tol="adaptive"`` picks GMRES's relative tolerance per Newton step with the Eisenstat–Walker
    rule (loose far from the solution, tight close to it), so early steps do not over-solve. The rule runs
    per sample, on that sample's own residuals, and GMRES stops each sample at its own tolerance, so a
    sample's iterates are those it would have alone (up to rounding): a far-off or NaN-producing sample in
    the batch changes nothing for the others.

    Args:
        krylov_dim: GMRES basis size per cycle, ``>= 1``. Default 20: enough for the inner system of
            most DEQ maps to reach the (adaptive) tolerance in one cycle; each vector costs ``(B, N)``.
        max_restarts: GMRES cycles per Newton step, ``>= 1``. Default 1: an inexact Newton step is
            enough (the outer loop corrects it), so one cycle caps a step at ``krylov_dim`` JVPs.
        inner_tol: GMRES's relative tolerance: ``"adaptive"`` (default, Eisenstat–Walker) or a number in
            ``(0, 1)``. A fixed tolerance over-solves early steps or under-solves late ones.
        jvp: ``"fd"`` (default) or ``"forward"``. Finite differences cost exactly one evaluation of ``f``
            and work for every map; forward-mode AD is exact but several evaluations' cost, and needs
            ``f`` to support ``torch.func.jvp``.
        line_search: per-sample backtracking on the Newton step. Default ``False``: each trial costs one
            evaluation, and near the fixed point the full step is accepted anyway.
        max_line_search: halvings per step at most, ``>= 0``. Default 5 (smallest step 1/32).
        eta_max: upper bound of the adaptive tolerance, in ``(0, 1)``. Default 0.1: the first steps are
            solved to 10 %, the usual Eisenstat–Walker safeguard; ignored with a fixed ``inner_tol``.

    Raises:
        ValueError: ``jvp`` is neither ``"forward"`` nor ``"fd"``; ``inner_tol`` is neither
            ``"adaptive"`` nor a number in ``(0, 1)``; ``krylov_dim`` or ``max_restarts`` is not an
            int >= 1; ``max_line_search`` is not an int >= 0; or ``eta_max`` is not in ``(0, 1)``.

    Example:
        >>> import torch
        >>> from deqlab.solvers import DiscreteDEQSolver, NewtonKrylov
        >>> solver = DiscreteDEQSolver(NewtonKrylov(), mode="abs_norm", abstol_termination=1e-10)
        >>> res = solver(torch.cos, torch.zeros(2, 3, dtype=torch.float64))
        >>> res.status, res.steps, res.nfe, res.z.round(decimals=6)[0]   # few steps; nfe counts the JVPs
        (<SolverStatus.CONVERGED: 'converged'>, 5, 11, tensor([0.7391, 0.7391, 0.7391], dtype=torch.float64))
    """

    name = "newton_krylov"

    def __init__(
        self,
        krylov_dim: int = 20,
        max_restarts: int = 1,
        inner_tol: Union[float, str] = "adaptive",
        jvp: Literal["forward", "fd"] = "fd",
        line_search: bool = False,
        max_line_search: int = 5,
        eta_max: float = 0.1,
    ):
        if jvp not in ("forward", "fd"):
            raise ValueError(f"NewtonKrylov: jvp must be 'forward' or 'fd', got {jvp!r}")
        if inner_tol != "adaptive":
            if isinstance(inner_tol, str):
                raise ValueError(f"NewtonKrylov: inner_tol must be 'adaptive' or a number in (0, 1), got {inner_tol!r}")
            inner_tol = _check_number(
                "NewtonKrylov", "inner_tol", inner_tol, low=0.0, high=1.0, low_open=True, high_open=True
            )
        self.krylov_dim = _check_int("NewtonKrylov", "krylov_dim", krylov_dim, low=1)
        self.max_restarts = _check_int("NewtonKrylov", "max_restarts", max_restarts, low=1)
        self.inner_tol = inner_tol
        self.jvp = jvp
        self.line_search = bool(line_search)
        self.max_line_search = _check_int("NewtonKrylov", "max_line_search", max_line_search, low=0)
        self.eta_max = _check_number(
            "NewtonKrylov", "eta_max", eta_max, low=0.0, high=1.0, low_open=True, high_open=True
        )

    def init(self, z, fz, max_steps):
        return {"eta": None, "g_norm": None}

    def _forcing(self, state, g: Tensor) -> Tensor:
        """Per-sample GMRES tolerances ``(B,)``: Eisenstat–Walker (choice 2, gamma = 0.9) with the usual
        safeguard, from each sample's own residual history, so a sample's Newton steps do not depend on the
        rest of the batch. A non-finite ratio (a NaN sample) falls back to ``eta_max``."""
        wd = _work_dtype(g.dtype)
        if self.inner_tol != "adaptive":
            return g.new_full((g.shape[0],), float(self.inner_tol), dtype=wd)
        g_norm = torch.linalg.vector_norm(g.to(wd), dim=1)
        prev, eta_prev = state["g_norm"], state["eta"]
        state["g_norm"] = g_norm
        if prev is None:
            eta = torch.full_like(g_norm, self.eta_max)
        else:
            ratio = g_norm / prev.clamp_min(torch.finfo(wd).tiny)
            eta = 0.9 * ratio.square()
            safeguard = 0.9 * eta_prev.square()
            eta = torch.where(safeguard > 0.1, torch.maximum(eta, safeguard), eta)
            eta = eta.clamp(min=10 * torch.finfo(g.dtype).eps, max=self.eta_max)
            eta = torch.where(torch.isfinite(eta), eta, torch.full_like(eta, self.eta_max))
        state["eta"] = eta
        return eta

    def step(self, state, z, fz, g, F):
        if self.jvp == "forward":

            def Jg(v: Tensor) -> Tensor:
                return torch.func.jvp(F, (z,), (v,))[1] - v
        else:
            eps = torch.finfo(z.dtype).eps ** 0.5
            z_scale = 1 + torch.linalg.vector_norm(z, dim=1, keepdim=True)

            def Jg(v: Tensor) -> Tensor:
                h = eps * z_scale / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(eps)
                return (F(z + h * v) - fz) / h - v

        # A sample whose residual is not finite (it has stopped as nonfinite) gets a zero right-hand side: GMRES
        # is done with it at once, so it neither keeps the inner loop running nor changes the others.
        finite = torch.isfinite(g).all(dim=1, keepdim=True)
        rhs = torch.where(finite, -g, torch.zeros_like(g))
        p, _ = gmres(Jg, rhs, tol=self._forcing(state, g), restart=self.krylov_dim, max_restarts=self.max_restarts)
        if self.line_search:
            z_new, fz_new = _line_search(z, p, batch_norm(g), F, self.max_line_search)
        else:
            z_new = z + p
            fz_new = F(z_new)
        return z_new, fz_new, state

    supports_select = True

    def select(self, state, keep):
        # The forcing terms are per sample: the kept samples keep theirs, so they iterate exactly as in the
        # full batch.
        for key in ("g_norm", "eta"):
            if state[key] is not None:
                state[key] = state[key].index_select(0, keep)
        return state


ALGORITHMS = {
    "fixed_point": FixedPointIteration,
    "anderson": Anderson,
    "broyden": Broyden,
    "lbroyden": LimitedMemoryBroyden,
    "newton_krylov": NewtonKrylov,
}
