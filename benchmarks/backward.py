#!/usr/bin/env python
"""Backward pass: deqlab's implicit backward against torchdeq's IFT backward and unrolled backprop.

On the workloads of ``benchmarks/solvers.py`` (both take them from ``benchmarks/_workloads.py``: the dense map
``tanh(W z + U x + b)``, ‖W‖₂ = 0.9, D = 256, B = 64, and the 32-channel 14×14 conv map, B = 32) the map's
tensors become ``nn.Parameter``s of one module, and every contender computes ``dL/dθ`` (all parameters) for
the fixed linear loss ``L = ⟨c, z*⟩`` (``c`` a fixed random tensor, ‖c‖ = 1):

* **deqlab**: ``DeepEquilibriumNetwork(map, DiscreteDEQSolver("anderson", mode="rel_norm",
  reltol_termination=tol, max_steps=50), backward=ImplicitBackward(b, tol=b_tol, max_steps=50))`` with the
  adjoint solver ``b`` = GMRES, fixed-point iteration or Anderson;
* **torchdeq** 0.1.0: ``get_deq(core="sliced", ift=True, f_solver="anderson", f_tol=tol, f_stop_mode="rel",
  f_max_iter=50, b_solver=b, b_tol=b_tol, b_stop_mode="rel", b_max_iter=50)`` with ``b`` = Anderson or
  fixed-point iteration (torchdeq returns ``f(z*)`` with the graph of that one application attached);
* **unrolled**: plain autograd through ``K`` fixed-point iterations ``z ← f(z, x)`` from ``z0 = 0``, ``K`` =
  the number of evaluations deqlab's fixed-point iteration needs to reach the forward tolerance.

Measured for every contender: forward+backward wall time (median over rounds, contenders interleaved
round-robin, one intra-op thread by default), f evaluations and VJPs through f in the forward and the
backward (counted by the benchmark with a hook on every output of the map; deqlab's own
``solution.backward_nfe`` is shown next to it), the relative error of the concatenated parameter gradient
against a float64 oracle (deqlab with forward and adjoint tolerance 1e-12, checked against a dense
closed form on the dense workload and against a second adjoint solver), peak memory and the bytes the
autograd graph holds between forward and backward. A second table runs deqlab, torchdeq and the unrolled
baseline for 10 and 100 solver steps (tolerance 0, so every step runs) to show how memory scales with
solver steps.

Peak memory on CPU is read from ``torch.profiler`` with ``profile_memory=True``: every allocation and free of
torch's CPU allocator during one forward+backward is replayed in time order and the running maximum of the
bytes allocated since the call began is reported (parameters, ``x`` and ``c`` exist before and are not
counted; the gradients it returns are). On CUDA it is ``torch.cuda.max_memory_allocated()`` minus the
memory allocated before the call.

Usage::

    python benchmarks/backward.py                  # CPU, 1 thread, writes the 'backward' section of RESULTS.md
    python benchmarks/backward.py --quick          # smoke test (3 repeats, no RESULTS.md update)
    python benchmarks/backward.py --device cuda    # GPU run (section 'backward-cuda')
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:
    sys.path.insert(1, str(_HERE.parent))  # run from a checkout without `pip install -e .`

warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from _common import (  # noqa: E402
    Timing,
    fmt_time,
    machine_header,
    machine_info,
    markdown_table,
    peak_bytes,
    setup_threads,
    shown_argv,
    synchronize,
    update_results_section,
)
from _workloads import WORKLOADS, Workload, relative_residual  # noqa: E402

SECTION = "backward"
TARGET_TIME_RATIO = 0.5
# "Equal gradient error": a deqlab row is matched with a torchdeq row when its gradient error is at most
# this factor above torchdeq's. At one forward tolerance the two libraries' errors already differ by up to
# ~2.5x (torchdeq returns f(z*), one more map application, and its Anderson stops a step later), so a
# tighter match would mostly compare forward solves.
ERROR_MATCH_FACTOR = 2.0
# Memory "flat in solver steps": growth per extra solver step below this fraction of one state (B x N
# elements); "linear": at least this fraction of one state per step.
FLAT_FRACTION = 0.01
LINEAR_FRACTION = 0.5


# ------------------------------------------------------------------------------------------ the map


class WorkloadMap(nn.Module):
    """The map ``f(z, x)`` of a ``benchmarks/_workloads.py`` workload with its tensors as parameters.

    The workload builders return a closure over plain tensors (``W``, ``U``, ``b``); each floating-point
    tensor the closure captures is replaced, in the closure's own cell, by an ``nn.Parameter`` registered
    here under the captured name, so the closure computes exactly the same function and every library sees
    the parameters (deqlab routes gradients to the parameters of the map module).

    With ``counting`` on, every call is counted (``n_eval``) and a hook on the output counts every VJP
    through it (``n_vjp``): a backward through a retained graph fires it once per ``autograd.grad`` call.
    """

    def __init__(self, wl: Workload):
        super().__init__()
        f = wl.f
        for name, cell in zip(f.__code__.co_freevars, f.__closure__ or ()):
            value = cell.cell_contents
            if isinstance(value, Tensor) and value.is_floating_point():
                p = nn.Parameter(value.detach().clone())
                cell.cell_contents = p
                self.register_parameter(name, p)
        if not any(True for _ in self.parameters()):
            raise RuntimeError(
                f"workload {wl.name!r}: its map captures no tensors to turn into parameters; "
                "benchmarks/_workloads.py's builders changed shape (update WorkloadMap)"
            )
        self.fn = f
        self.counting = False
        self.n_eval = 0
        self.n_vjp = 0

    def reset_counts(self) -> None:
        self.n_eval = self.n_vjp = 0

    def _hook(self, grad: Tensor) -> None:
        self.n_vjp += 1

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        out = self.fn(z, x)
        if self.counting:
            self.n_eval += 1
            if out.requires_grad:
                out.register_hook(self._hook)
        return out


# ------------------------------------------------------------------------------------------ contenders


@dataclass
class Contender:
    library: str  # "deqlab" | "torchdeq" | "unrolled"
    label: str  # backward description
    forward: Callable[[], Tuple[Tensor, object]]  # -> (z, meta)
    b_tol: Optional[float] = None
    fwd_tol: Optional[float] = None
    reported_bwd: Callable[[object], Optional[int]] = lambda meta: None

    @property
    def name(self) -> str:
        return f"{self.library} {self.label}"

    @property
    def desc(self) -> str:
        """Label with the tolerances (for the comparison tables)."""
        tols = []
        if self.fwd_tol is not None:
            tols.append(f"fwd tol {self.fwd_tol:g}")
        if self.b_tol is not None:
            tols.append(f"b_tol {self.b_tol:g}")
        return self.label + (f" ({', '.join(tols)})" if tols else "")


@dataclass
class Measured:
    contender: Contender
    fwd_eval: int = 0
    fwd_vjp: int = 0
    bwd_eval: int = 0
    bwd_vjp: int = 0
    reported_bwd: Optional[int] = None
    grad_err: float = float("nan")
    fwd_rel_residual: float = float("nan")
    total: Timing = field(default_factory=Timing)
    fwd: Timing = field(default_factory=Timing)
    peak: Optional[int] = None
    saved: Optional[int] = None


def deqlab_contender(
    fmap: WorkloadMap,
    x: Tensor,
    z_shape,
    *,
    algorithm: str,
    tol: float,
    max_steps: int,
    b_solver: str,
    b_tol: float,
    b_max_steps: int,
    label: Optional[str] = None,
    compile: Any = False,
) -> Contender:
    from deqlab.nn import DeepEquilibriumNetwork, ImplicitBackward
    from deqlab.solvers import DiscreteDEQSolver

    solver = DiscreteDEQSolver(
        algorithm, mode="rel_norm", reltol_termination=tol, abstol_termination=tol, max_steps=max_steps
    )
    deq = DeepEquilibriumNetwork(
        fmap,
        solver,
        backward=ImplicitBackward(b_solver, tol=b_tol, max_steps=b_max_steps),
        z_shape=tuple(z_shape[1:]),
        compile=compile,  # the layer's one switch: forward steps and the adjoint's steps compiled
    )

    def forward():
        z, sol = deq(x)
        return z, sol

    return Contender(
        "deqlab",
        label or f"ImplicitBackward({b_solver})" + (", compiled" if compile is not False else ""),
        forward,
        b_tol,
        tol,
        reported_bwd=lambda sol: sol.backward_nfe,
    )


def torchdeq_contender(
    fmap: WorkloadMap,
    x: Tensor,
    z0: Callable[[], Tensor],
    *,
    tol: float,
    max_steps: int,
    b_solver: str,
    b_tol: float,
    b_max_steps: int,
) -> Contender:
    from torchdeq import get_deq

    deq = get_deq(
        core="sliced",
        ift=True,
        f_solver="anderson",
        f_max_iter=max_steps,
        f_tol=tol,
        f_stop_mode="rel",
        b_solver=b_solver,
        b_max_iter=b_max_steps,
        b_tol=b_tol,
        b_stop_mode="rel",
    )
    deq.train()

    def forward():
        z_out, info = deq(lambda z: fmap(z, x), z0())
        return z_out[-1], info

    return Contender("torchdeq", f"IFT, b_solver={b_solver}", forward, b_tol, tol)


def unrolled_contender(fmap: WorkloadMap, x: Tensor, z0: Callable[[], Tensor], steps: int) -> Contender:
    def forward():
        z = z0()
        for _ in range(steps):
            z = fmap(z, x)
        return z, None

    return Contender("unrolled", f"fixed-point × {steps}", forward)


# ---------------------------------------------------------------------------------------- measurement


def loss_and_grads(z: Tensor, c: Tensor, params: Sequence[Tensor]) -> List[Tensor]:
    loss = (c * z).sum()
    return list(torch.autograd.grad(loss, list(params)))


def flat(grads: Sequence[Tensor]) -> Tensor:
    return torch.cat([g.detach().reshape(-1).double().cpu() for g in grads])


def rel_err(g: Tensor, ref: Tensor) -> float:
    return float(torch.linalg.vector_norm(g - ref) / torch.linalg.vector_norm(ref))


def saved_bytes(
    forward: Callable[[], Tuple[Tensor, object]], c: Tensor, params: Sequence[Tensor], existing: Sequence[Tensor]
) -> int:
    """Bytes of the distinct storages the autograd graph saves during the forward (what the graph holds
    until backward), not counting storages that existed before (parameters, ``x``)."""
    skip = {t.untyped_storage().data_ptr() for t in existing}
    seen: Dict[int, int] = {}

    def pack(t: Tensor):
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # pragma: no cover - exotic tensors
            return t
        ptr = st.data_ptr()
        if ptr and ptr not in skip:
            seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z, _ = forward()
    loss_and_grads(z, c, params)
    return int(sum(seen.values()))


@contextlib.contextmanager
def _torchdeq_vjp_counter(counter: List[int]):
    """Count torchdeq's adjoint VJPs (its ``grad_f`` calls ``torchdeq.grad.autograd.grad``)."""
    import torchdeq.grad as tg

    real = tg.autograd

    def grad(*a, **k):
        counter[0] += 1
        return real.grad(*a, **k)

    tg.autograd = types.SimpleNamespace(grad=grad, Function=real.Function)
    try:
        yield
    finally:
        tg.autograd = real


def count_and_check(m: Measured, fmap: WorkloadMap, x: Tensor, c: Tensor, g_ref: Tensor, device: torch.device) -> None:
    """One untimed forward+backward with counting on: evaluations, VJPs, gradient error."""
    con = m.contender
    params = list(fmap.parameters())
    fmap.counting = True
    fmap.reset_counts()
    try:
        z, meta = con.forward()
        synchronize(device)
        m.fwd_eval, m.fwd_vjp = fmap.n_eval, fmap.n_vjp
        fmap.reset_counts()
        td = [0]
        ctx = _torchdeq_vjp_counter(td) if con.library == "torchdeq" else contextlib.nullcontext()
        with ctx:
            grads = loss_and_grads(z, c, params)
        synchronize(device)
        m.bwd_eval, m.bwd_vjp = fmap.n_eval, fmap.n_vjp
        m.reported_bwd = con.reported_bwd(meta) if con.library == "deqlab" else (td[0] + 1 if td[0] else None)
    finally:
        fmap.counting = False
    m.grad_err = rel_err(flat(grads), g_ref)
    with torch.no_grad():
        m.fwd_rel_residual = float(relative_residual(lambda u: fmap(u, x), z.detach()).max())


def time_round_robin(
    ms: List[Measured],
    fmap: WorkloadMap,
    c: Tensor,
    *,
    repeats: int,
    warmup: int,
    device: torch.device,
    extra: Dict[str, Callable[[], object]],
) -> Dict[str, Timing]:
    """Interleave one forward+backward of every contender per round (and the reference calls in
    ``extra``), so load drift on a shared machine hits all of them alike."""
    params = list(fmap.parameters())
    extra_t = {k: Timing() for k in extra}
    for r in range(warmup + repeats):
        timed = r >= warmup
        for m in ms:
            synchronize(device)
            t0 = time.perf_counter()
            z, _ = m.contender.forward()
            synchronize(device)
            t1 = time.perf_counter()
            loss_and_grads(z, c, params)
            synchronize(device)
            t2 = time.perf_counter()
            del z
            if timed:
                m.fwd.add(t1 - t0)
                m.total.add(t2 - t0)
        for k, fn in extra.items():
            for _ in range(3):
                synchronize(device)
                t0 = time.perf_counter()
                fn()
                synchronize(device)
                if timed:
                    extra_t[k].add(time.perf_counter() - t0)
    return extra_t


# ---------------------------------------------------------------------- where deqlab's backward goes

# Columns of the breakdown: what the backward's regions in `deqlab.instrument` add up to, each exclusive of
# the others (the adjoint solver's own work is `adjoint.solve` without the VJPs nested in it; a fixed-point
# adjoint solver runs a whole solve, whose regions stay inside `adjoint.solve`).
BWD_COLUMNS = ("f re-eval", "adjoint VJPs", "param VJP", "solver")


def _backward_regions(rec) -> Dict[str, float]:
    return {
        "f re-eval": rec.seconds("adjoint.linearize"),
        "adjoint VJPs": rec.seconds("adjoint.vjp"),
        "param VJP": rec.seconds("adjoint.vjp_inputs"),
        "solver": rec.seconds("adjoint.solve", excluding=["adjoint.vjp"]),
    }


def backward_breakdown(m: "Measured", fmap: WorkloadMap, c: Tensor, *, repeats: int, device: torch.device) -> dict:
    """Median time per region of deqlab's backward (``autograd.grad`` of the loss only)."""
    from deqlab import instrument

    params = list(fmap.parameters())
    per: Dict[str, List[float]] = {r: [] for r in BWD_COLUMNS + ("other",)}
    totals: List[float] = []
    sync = device if device.type != "cpu" else False
    for _ in range(repeats):
        z, _ = m.contender.forward()
        synchronize(device)
        with instrument.record(sync=sync) as rec:
            t0 = time.perf_counter()
            loss_and_grads(z, c, params)
            synchronize(device)
            total = time.perf_counter() - t0
        totals.append(total)
        regions = _backward_regions(rec)
        for r in BWD_COLUMNS:
            per[r].append(regions[r])
        per["other"].append(total - sum(regions.values()))
    return {
        "total": statistics.median(totals),
        "regions": {r: statistics.median(v) for r, v in per.items()},
        "vjps": m.bwd_vjp,
    }


def breakdown_table(res: dict) -> str:
    headers = [
        "deqlab backward",
        "b_tol",
        "VJPs",
        "backward",
        "f re-eval",
        "adjoint VJPs (per VJP)",
        "param VJP",
        "adjoint solver excl. VJPs (per step)",
        "other",
    ]
    rows = []
    for m, bd in res["breakdown"]:
        reg, tot = bd["regions"], bd["total"]

        def cell(r, per=None, reg=reg, tot=tot):
            v = reg[r]
            txt = f"{fmt_time(v)} ({100 * v / tot:.0f}%)"
            return txt + (f", {fmt_time(v / per)}" if per else "")

        n_adj = max(bd["vjps"] - 1, 1)
        rows.append(
            [
                m.contender.label,
                f"{m.contender.b_tol:g}",
                bd["vjps"],
                fmt_time(tot),
                cell("f re-eval"),
                cell("adjoint VJPs", n_adj),
                cell("param VJP"),
                cell("solver", n_adj),
                cell("other"),
            ]
        )
    return markdown_table(headers, rows, "llrrrrrrr")


# --------------------------------------------------------------------------------------------- oracle


def oracle(name: str, device: torch.device, seed: int, c64: Tensor, *, max_steps: int = 400) -> dict:
    """float64 reference gradient: deqlab, Anderson forward to 1e-12 and GMRES adjoint to 1e-12.

    Cross-checks: an Anderson adjoint at 1e-12 (a different solver) and, for the dense map, the
    closed form ``(I − Wᵀ diag(s_i)) g_i = c_i`` with ``s_i = 1 − z_i*²`` solved densely per sample."""
    from deqlab.nn import DeepEquilibriumNetwork, ImplicitBackward
    from deqlab.solvers import DiscreteDEQSolver

    wl = WORKLOADS[name](device, torch.float64, seed)
    fmap = WorkloadMap(wl)
    params = list(fmap.parameters())
    solver = DiscreteDEQSolver(
        "anderson", mode="rel_norm", reltol_termination=1e-12, abstol_termination=1e-12, max_steps=max_steps
    )
    out = {}
    grads = {}
    for b, kw in (("gmres", dict(restart=60)), ("anderson", {})):
        deq = DeepEquilibriumNetwork(
            fmap,
            solver,
            backward=ImplicitBackward(b, tol=1e-12, max_steps=max_steps, **kw),
            z_shape=tuple(wl.z_shape[1:]),
        )
        z, sol = deq(wl.x)
        grads[b] = flat(loss_and_grads(z, c64, params))
        out[f"bwd_{b}"] = sol.backward_nfe
        out[f"conv_{b}"] = sol.backward_converged
        if b == "gmres":
            out["fwd_nfe"] = sol.nfe
            with torch.no_grad():
                out["fwd_res"] = float(relative_residual(wl.closure(), z.detach()).max())
            z_star = z.detach()
    g = grads["gmres"]
    out["g"] = g
    out["check"] = {"Anderson adjoint (1e-12)": rel_err(grads["anderson"], g)}
    names = dict(fmap.named_parameters())
    if name == "dense" and {"Wt", "Ut", "b"} <= set(names):
        Wt = names["Wt"].detach()
        s = 1 - z_star**2  # tanh' at the fixed point
        D = Wt.shape[0]
        A = torch.eye(D, dtype=Wt.dtype, device=Wt.device) - Wt.unsqueeze(0) * s.unsqueeze(1)
        adj = torch.linalg.solve(A, c64.unsqueeze(2)).squeeze(2)  # (I - W^T diag(s)) g = c
        u = s * adj
        closed = {"Wt": z_star.T @ u, "Ut": wl.x.T @ u, "b": u.sum(0)}
        out["check"]["dense closed form"] = rel_err(flat([closed[n] for n, _ in fmap.named_parameters()]), g)
    return out


# --------------------------------------------------------------------------------------------- running


def build_contenders(fmap, wl, args, k_unrolled: int) -> List[Contender]:
    x, z0 = wl.x, wl.z0
    cons = []
    compiles = (False, args.compile_backend) if args.compile else (False,)  # each configuration eager, then compiled
    for b_tol in args.b_tols:
        for b in ("gmres", "fixed_point", "anderson"):
            for compile in compiles:
                cons.append(
                    deqlab_contender(
                        fmap,
                        x,
                        wl.z_shape,
                        algorithm="anderson",
                        tol=args.tol,
                        max_steps=args.max_steps,
                        b_solver=b,
                        b_tol=b_tol,
                        b_max_steps=args.b_max_steps,
                        compile=compile,
                    )
                )
        if not args.no_torchdeq:
            for b in ("anderson", "fixed_point_iter"):
                cons.append(
                    torchdeq_contender(
                        fmap,
                        x,
                        z0,
                        tol=args.tol,
                        max_steps=args.max_steps,
                        b_solver=b,
                        b_tol=b_tol,
                        b_max_steps=args.b_max_steps,
                    )
                )
    if args.tight_factor > 1:
        tight = args.tol / args.tight_factor
        for b in ("fixed_point", "anderson"):
            cons.append(
                deqlab_contender(
                    fmap,
                    x,
                    wl.z_shape,
                    algorithm="anderson",
                    tol=tight,
                    max_steps=args.max_steps,
                    b_solver=b,
                    b_tol=min(args.b_tols),
                    b_max_steps=args.b_max_steps,
                )
            )
    cons.append(unrolled_contender(fmap, x, z0, k_unrolled))
    return cons


def fixed_point_steps(wl: Workload, tol: float, max_steps: int) -> int:
    """Evaluations of f deqlab's fixed-point iteration needs to reach ``tol`` (the unrolled depth)."""
    from deqlab.solvers import DiscreteDEQSolver

    solver = DiscreteDEQSolver("fixed_point", mode="rel_norm", reltol_termination=tol, max_steps=max_steps)
    r = solver(wl.closure(), wl.z0())
    return int(r.nfe)


def run_workload(name: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    wl = WORKLOADS[name](device, dtype, args.seed)
    fmap = WorkloadMap(wl)
    params = list(fmap.parameters())
    gen = torch.Generator().manual_seed(args.seed + 1)
    c64 = torch.randn(wl.z_shape, generator=gen, dtype=torch.float64)
    c64 = (c64 / torch.linalg.vector_norm(c64)).to(device)
    c = c64.to(dtype)

    t0 = time.perf_counter()
    orc = oracle(name, device, args.seed, c64)
    t_oracle = time.perf_counter() - t0
    k = fixed_point_steps(wl, args.tol, args.max_steps)
    cons = build_contenders(fmap, wl, args, k)
    ms = [Measured(con) for con in cons]
    for m in ms:
        count_and_check(m, fmap, wl.x, c, orc["g"], device)

    # reference costs: one f evaluation and one VJP through f (w.r.t. z) at z*
    with torch.no_grad():
        z_star, _ = ms[0].contender.forward()
    z_req = z_star.detach().clone().requires_grad_()
    with torch.enable_grad():
        fz = fmap(z_req, wl.x)
    v = torch.randn(wl.z_shape, generator=gen, dtype=torch.float64).to(device, dtype)
    extra = {
        "f": lambda: _no_grad_call(fmap, z_star, wl.x),
        "vjp": lambda: torch.autograd.grad(fz, z_req, v, retain_graph=True),
    }
    ref = time_round_robin(ms, fmap, c, repeats=args.repeats, warmup=args.warmup, device=device, extra=extra)

    existing = [*params, wl.x, c]
    for m in ms:
        m.peak = peak_bytes(lambda m=m: loss_and_grads(m.contender.forward()[0], c, params), device)
        m.saved = saved_bytes(m.contender.forward, c, params, existing)
    out = {
        "workload": wl,
        "fmap": fmap,
        "rows": ms,
        "oracle": orc,
        "t_oracle": t_oracle,
        "k": k,
        "t_f": ref["f"],
        "t_vjp": ref["vjp"],
        "state_bytes": z_star.numel() * z_star.element_size(),
        "c": c,
        "breakdown": [],
    }
    if args.breakdown:
        for m in ms:
            # the breakdown's regions (deqlab.instrument) need the eager steps: compiled rows would time eager
            compiled = m.contender.label.endswith(", compiled")
            if m.contender.library == "deqlab" and m.contender.fwd_tol == args.tol and not compiled:
                out["breakdown"].append((m, backward_breakdown(m, fmap, c, repeats=args.repeats, device=device)))
    return out


def _no_grad_call(fmap, z, x):
    with torch.no_grad():
        return fmap(z, x)


def memory_scaling(name: str, args, device: torch.device, dtype: torch.dtype, wl_res: dict) -> List[dict]:
    """Peak and saved memory of forward+backward after ``s`` solver steps (tolerance 0: all steps run)."""
    wl, fmap, c = wl_res["workload"], wl_res["fmap"], wl_res["c"]
    params = list(fmap.parameters())
    existing = [*params, wl.x, c]
    b_tol = args.b_tols[0]
    rows = []
    for steps in args.mem_steps:
        cons = [
            deqlab_contender(
                fmap,
                wl.x,
                wl.z_shape,
                algorithm="anderson",
                tol=0.0,
                max_steps=steps - 1,
                b_solver="gmres",
                b_tol=b_tol,
                b_max_steps=args.b_max_steps,
                label="anderson fwd, ImplicitBackward(gmres)",
            ),
            deqlab_contender(
                fmap,
                wl.x,
                wl.z_shape,
                algorithm="anderson",
                tol=0.0,
                max_steps=steps - 1,
                b_solver="fixed_point",
                b_tol=b_tol,
                b_max_steps=args.b_max_steps,
                label="anderson fwd, ImplicitBackward(fixed_point)",
            ),
        ]
        if not args.no_torchdeq:
            cons.append(
                torchdeq_contender(
                    fmap,
                    wl.x,
                    wl.z0,
                    tol=0.0,
                    max_steps=steps,
                    b_solver="anderson",
                    b_tol=b_tol,
                    b_max_steps=args.b_max_steps,
                )
            )
        cons.append(unrolled_contender(fmap, wl.x, wl.z0, steps))
        for con in cons:
            fmap.counting = True
            fmap.reset_counts()
            z, _ = con.forward()
            nfe = fmap.n_eval
            fmap.counting = False
            del z
            loss_and_grads(con.forward()[0], c, params)  # warm-up
            peak = peak_bytes(lambda con=con: loss_and_grads(con.forward()[0], c, params), device)
            saved = saved_bytes(con.forward, c, params, existing)
            kind = "unrolled fixed-point × steps" if con.library == "unrolled" else con.name
            rows.append({"name": kind, "steps": steps, "nfe": nfe, "peak": peak, "saved": saved})
    return rows


# ---------------------------------------------------------------------------------------------- report


def fmt_bytes(n: Optional[float]) -> str:
    if n is None or n != n:
        return "n/a"
    n = float(n)
    if abs(n) < 1024:
        return f"{n:.0f} B"
    if abs(n) < 2**20:
        return f"{n / 1024:.1f} KiB"
    if abs(n) < 2**30:
        return f"{n / 2**20:.2f} MiB"
    return f"{n / 2**30:.2f} GiB"


def main_table(res: dict) -> str:
    headers = [
        "library",
        "backward",
        "fwd tol",
        "b_tol",
        "fwd f evals",
        "fwd residual",
        "bwd f evals",
        "bwd VJPs",
        "grad rel. error",
        "fwd+bwd (median)",
        "IQR",
        "of which fwd",
        "bwd",
        "peak memory",
        "saved for bwd",
    ]
    rows = []
    for m in res["rows"]:
        con = m.contender
        bwd_vjp = str(m.bwd_vjp)
        if m.reported_bwd is not None and m.reported_bwd != m.bwd_vjp:
            bwd_vjp += f" [reports {m.reported_bwd}]"
        fwd_evals = str(m.fwd_eval) + (f" (+{m.fwd_vjp} VJP)" if m.fwd_vjp else "")
        bwd_time = m.total.median - m.fwd.median
        rows.append(
            [
                con.library,
                con.label,
                "—" if con.fwd_tol is None else f"{con.fwd_tol:g}",
                "—" if con.b_tol is None else f"{con.b_tol:g}",
                fwd_evals,
                f"{m.fwd_rel_residual:.1e}",
                m.bwd_eval,
                bwd_vjp,
                f"{m.grad_err:.2e}",
                fmt_time(m.total.median),
                fmt_time(m.total.iqr),
                fmt_time(m.fwd.median),
                fmt_time(bwd_time),
                fmt_bytes(m.peak),
                fmt_bytes(m.saved),
            ]
        )
    return markdown_table(headers, rows, "llllrrrrrrrrrrrr")


def time_target(res: dict) -> dict:
    deq = [m for m in res["rows"] if m.contender.library == "deqlab"]
    tdq = [m for m in res["rows"] if m.contender.library == "torchdeq"]
    if not deq or not tdq:
        return {"ok": None, "text": "no torchdeq rows: time target not evaluated", "pairs": []}
    pairs = []
    for t in sorted(tdq, key=lambda m: m.total.median):
        ok = [d for d in deq if d.grad_err <= ERROR_MATCH_FACTOR * t.grad_err]
        best = min(ok, key=lambda m: m.total.median) if ok else None
        pairs.append((t, best))
    t, d = pairs[0]
    if d is None:
        return {
            "ok": False,
            "pairs": pairs,
            "text": f"no deqlab configuration reaches torchdeq's fastest gradient error ({t.grad_err:.2e})",
        }
    ratio = d.total.median / t.total.median
    return {"ok": ratio <= TARGET_TIME_RATIO, "ratio": ratio, "pairs": pairs, "d": d, "t": t}


def pairs_table(pairs) -> str:
    rows = []
    for t, d in pairs:
        if d is None:
            rows.append(
                [t.contender.desc, f"{t.grad_err:.2e}", fmt_time(t.total.median), "none within the error", "", "", ""]
            )
            continue
        rows.append(
            [
                t.contender.desc,
                f"{t.grad_err:.2e}",
                fmt_time(t.total.median),
                d.contender.desc,
                f"{d.grad_err:.2e}",
                fmt_time(d.total.median),
                f"{d.total.median / t.total.median:.2f}×",
            ]
        )
    return markdown_table(
        [
            "torchdeq",
            "grad error",
            "time",
            f"fastest deqlab with error ≤ {ERROR_MATCH_FACTOR:g}× torchdeq's",
            "grad error",
            "time",
            "deqlab / torchdeq",
        ],
        rows,
        "lrrlrrr",
    )


def scaling_verdict(rows: List[dict], steps: Sequence[int], state_bytes: int) -> List[dict]:
    lo, hi = min(steps), max(steps)
    out = []
    for name in dict.fromkeys(r["name"] for r in rows):
        a = next(r for r in rows if r["name"] == name and r["steps"] == lo)
        b = next(r for r in rows if r["name"] == name and r["steps"] == hi)
        dsteps = max(b["nfe"] - a["nfe"], 1)
        per_peak = (b["peak"] - a["peak"]) / dsteps
        per_saved = (b["saved"] - a["saved"]) / dsteps
        out.append(
            {"name": name, "a": a, "b": b, "per_peak": per_peak, "per_saved": per_saved, "frac": per_peak / state_bytes}
        )
    return out


def scaling_table(verdicts: List[dict], lo: int, hi: int) -> str:
    rows = []
    for v in verdicts:
        a, b = v["a"], v["b"]
        rows.append(
            [
                v["name"],
                f"{a['nfe']} / {b['nfe']}",
                fmt_bytes(a["peak"]),
                fmt_bytes(b["peak"]),
                f"{b['peak'] / max(a['peak'], 1):.2f}×",
                fmt_bytes(v["per_peak"]),
                f"{v['frac']:.3f}",
                fmt_bytes(a["saved"]),
                fmt_bytes(b["saved"]),
            ]
        )
    return markdown_table(
        [
            "method",
            f"fwd f evals ({lo} / {hi} steps)",
            f"peak ({lo})",
            f"peak ({hi})",
            "ratio",
            "peak growth per f eval",
            "… in states",
            f"saved for bwd ({lo})",
            f"saved ({hi})",
        ],
        rows,
        "llrrrrrrr",
    )


def memory_target(verdicts: List[dict]) -> Tuple[bool, bool, str, str]:
    deq = [v for v in verdicts if v["name"].startswith("deqlab")]
    unr = [v for v in verdicts if v["name"].startswith("unrolled")]
    flat_ok = bool(deq) and all(abs(v["frac"]) <= FLAT_FRACTION for v in deq)
    lin_ok = bool(unr) and all(v["frac"] >= LINEAR_FRACTION for v in unr)

    def txt(vs):
        return "; ".join(
            f"{fmt_bytes(v['per_peak'])}/f eval ({v['frac']:.3f} state), peak ×"
            f"{v['b']['peak'] / max(v['a']['peak'], 1):.2f}"
            for v in vs
        )

    return flat_ok, lin_ok, txt(deq), txt(unr)


def build_report(results: List[dict], info: dict, args) -> str:
    argv = shown_argv(args.argv)
    parts = [
        "## Backward pass: deqlab implicit backward vs torchdeq IFT vs unrolled backprop",
        "",
        f"Generated by `python benchmarks/backward.py{' ' + ' '.join(argv) if argv else ''}`.",
        "",
        machine_header(info),
        "",
        "Setup: the workloads of `benchmarks/solvers.py` (same builders and seed), their tensors turned into "
        "`nn.Parameter`s of one map module shared by every contender; loss L = ⟨c, z*⟩ with a fixed random c "
        f"(‖c‖ = 1); gradient = dL/dθ of all parameters concatenated. Forward: Anderson, relative tolerance "
        f"{args.tol:g} (per sample ‖f(z) − z‖ ≤ tol·‖f(z)‖), at most {args.max_steps} steps, in both "
        "libraries "
        '(deqlab `DiscreteDEQSolver("anderson", mode="rel_norm")`, memory 5; torchdeq `get_deq(core="sliced", '
        'ift=True, f_solver="anderson", f_stop_mode="rel")`, m = 6). Backward: deqlab `ImplicitBackward(b, tol, '
        f'max_steps={args.b_max_steps})`; torchdeq `b_solver=b, b_stop_mode="rel", b_tol, b_max_iter='
        f"{args.b_max_steps}`; unrolled = autograd through K fixed-point iterations from 0, K = the f evaluations "
        "deqlab's fixed-point iteration needs to reach the forward tolerance. A GMRES `tol` bounds "
        "‖r‖/‖dL/dz*‖; the "
        "fixed-point/Anderson `tol` bounds the relative step, so equal `b_tol` is not equal accuracy — compare "
        "the measured gradient error.",
        "",
        "Columns: **fwd/bwd f evals** and **bwd VJPs** are counted by the benchmark (a counter in the map and a "
        "hook on each of its outputs that fires once per backward pass through it); deqlab's own "
        "`solution.backward_nfe` is shown as [reports n] where it differs; for torchdeq the [reports] value is "
        "its adjoint-solver VJPs + 1. **grad rel. error** = ‖g − g_oracle‖ / ‖g_oracle‖ against the float64 "
        "oracle below. **fwd+bwd** = median wall time of one forward + `autograd.grad` over "
        f"{args.repeats} rounds after {args.warmup} warm-up rounds, all contenders interleaved round-robin; "
        "**of which fwd** = median of the forward part of the same calls, **bwd** = the difference of the "
        "medians. "
        + (
            "**peak memory** = peak bytes allocated by torch's CPU allocator during one forward+backward above "
            "what was allocated when it started, replayed from `torch.profiler` (`profile_memory=True`) "
            "allocation/free events in time order (includes the solver's buffers, temporaries, the backward and "
            "the returned gradients; excludes parameters, x and c). "
            if args.device == "cpu" or args.device.startswith("cpu")
            else "**peak memory** = `torch.cuda.max_memory_allocated()` during one forward+backward minus what was "
            "allocated before it. "
        )
        + "**saved for bwd** = distinct storages packed by `torch.autograd.graph.saved_tensors_hooks` during "
        "the forward (what the autograd graph keeps alive until the backward; parameters and x excluded).",
        "",
    ]
    for res in results:
        wl, orc = res["workload"], res["oracle"]
        checks = ", ".join(f"{k}: {v:.1e}" for k, v in orc["check"].items())
        parts += [
            f"### {wl.name}: {wl.description}",
            "",
            f"Oracle: float64, deqlab Anderson forward to a relative residual of {orc['fwd_res']:.1e} "
            f"({orc['fwd_nfe']} f evals), GMRES adjoint at tol 1e-12 ({orc['bwd_gmres']} VJPs"
            f"{'' if orc['conv_gmres'] else ', **not converged**'}); agreement with {checks} "
            f"(oracle built in {res['t_oracle']:.1f} s). t_f = {fmt_time(res['t_f'].median)}, "
            f"t_vjp = {fmt_time(res['t_vjp'].median)} (one VJP w.r.t. z through a retained graph of f). "
            f"Unrolled depth K = {res['k']}.",
            "",
            main_table(res),
            "",
        ]
        tt = time_target(res)
        if tt["pairs"]:
            parts += [
                f"Equal gradient error: each torchdeq configuration against the fastest deqlab configuration "
                f"whose gradient error is at most {ERROR_MATCH_FACTOR:g}× torchdeq's:",
                "",
                pairs_table(tt["pairs"]),
                "",
            ]
        if res["breakdown"]:
            parts += [
                "Where deqlab's backward time goes (median over the same number of runs; the regions the "
                "implicit backward reports to `deqlab.instrument`: *f re-eval* = `adjoint.linearize` (the "
                "graph of f at z*), *adjoint VJPs* = `adjoint.vjp`, *param VJP* = `adjoint.vjp_inputs`, "
                "*adjoint solver excl. VJPs* = `adjoint.solve` without the VJPs inside it (GMRES, or the "
                "whole fixed-point solve of the adjoint map), per step = per adjoint VJP; *other* = the "
                "autograd engine, the layer's backward bookkeeping (`deq.backward` itself), the "
                "recording's own cost):",
                "",
                breakdown_table(res),
                "",
            ]
        if "scaling" in res:
            lo, hi = min(args.mem_steps), max(args.mem_steps)
            verdicts = scaling_verdict(res["scaling"], args.mem_steps, res["state_bytes"])
            res["memory_target"] = memory_target(verdicts)
            parts += [
                f"Memory against solver steps ({lo} vs {hi} steps, tolerance 0 so every step runs; deqlab "
                f"`max_steps` = steps − 1 gives steps f evaluations, torchdeq `f_max_iter` = steps; backward "
                f"tolerance {args.b_tols[0]:g}). One state = {fmt_bytes(res['state_bytes'])}; "
                "growth per f eval = (peak(hi) − peak(lo)) / (difference in forward f evals):",
                "",
                scaling_table(verdicts, lo, hi),
                "",
            ]
        parts += ["Targets:", "", targets_table(res, tt, args), ""]
    return "\n".join(parts).rstrip() + "\n"


def targets_table(res: dict, tt: dict, args) -> str:
    rows = []
    target = f"deqlab fwd+bwd ≤ {TARGET_TIME_RATIO:g}× torchdeq's fastest, at equal gradient error"
    if tt["ok"] is None:
        rows.append([target, "torchdeq not run", "n/a"])
    elif "ratio" not in tt:
        rows.append([target, tt["text"], "**no**"])
    else:
        d, t = tt["d"], tt["t"]
        rows.append(
            [
                target,
                f"{tt['ratio']:.2f}× — deqlab {d.contender.desc}: {fmt_time(d.total.median)}, error "
                f"{d.grad_err:.1e}; torchdeq {t.contender.desc}: {fmt_time(t.total.median)}, error "
                f"{t.grad_err:.1e}",
                "yes" if tt["ok"] else "**no**",
            ]
        )
    if "memory_target" in res:
        flat_ok, lin_ok, deq_txt, unr_txt = res["memory_target"]
        rows.append(
            [
                f"deqlab memory flat in solver steps (peak growth ≤ {FLAT_FRACTION:g} state per f eval)",
                deq_txt,
                "yes" if flat_ok else "**no**",
            ]
        )
        rows.append(
            [
                f"unrolled memory grows linearly (≥ {LINEAR_FRACTION:g} state per f eval)",
                unr_txt,
                "yes" if lin_ok else "**no**",
            ]
        )
    return markdown_table(["target", "measured", "met"], rows, "lll")


# ------------------------------------------------------------------------------------------------ main


def _floats(s: str) -> List[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def _ints(s: str) -> List[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu; e.g. cuda)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; 0 = torch default)")
    p.add_argument("--quick", action="store_true", help="smoke test: 3 repeats, 1 warm-up, no RESULTS.md update")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2, quick 1)")
    p.add_argument("--tol", type=float, default=1e-4, help="forward relative tolerance (default 1e-4)")
    p.add_argument("--max-steps", type=int, default=50, help="forward max steps (default 50)")
    p.add_argument(
        "--b-tols", type=_floats, default=[1e-4, 1e-6], help="comma-separated backward tolerances (default 1e-4,1e-6)"
    )
    p.add_argument(
        "--tight-factor",
        type=float,
        default=4.0,
        help="also run deqlab with forward tolerance tol / this factor (1 = off; default 4), so a "
        "deqlab row can match torchdeq's gradient error, which its extra f(z*) makes smaller",
    )
    p.add_argument("--b-max-steps", type=int, default=50, help="backward max steps / VJPs (default 50)")
    p.add_argument("--mem-steps", type=_ints, default=[10, 100], help="solver steps for the memory scaling table")
    p.add_argument(
        "--no-breakdown", dest="breakdown", action="store_false", help="skip the per-region timing of deqlab's backward"
    )
    p.add_argument("--no-scaling", dest="scaling", action="store_false", help="skip the memory-vs-steps table")
    p.add_argument("--workloads", default="dense,conv", help="comma-separated subset of: " + ",".join(WORKLOADS))
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-torchdeq", action="store_true", help="benchmark deqlab and unrolled only")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time each deqlab configuration built with compile= (forward and adjoint steps compiled)",
    )
    p.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend of --compile (default inductor)"
    )
    p.add_argument(
        "--write",
        dest="write",
        action="store_true",
        default=None,
        help="update benchmarks/RESULTS.md (default unless --quick)",
    )
    p.add_argument("--no-write", dest="write", action="store_false")
    p.add_argument("--results", type=Path, default=None, help="results file (default benchmarks/RESULTS.md)")
    p.add_argument(
        "--section", default=None, help=f"RESULTS.md section name (default '{SECTION}', '{SECTION}-cuda' on a GPU)"
    )
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 10
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.write is None:
        args.write = not args.quick
    if len(args.mem_steps) < 2:
        p.error("--mem-steps needs two or more step counts")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    setup_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for n in names:
        if n not in WORKLOADS:
            print(f"unknown workload {n!r}; choose from {', '.join(WORKLOADS)}", file=sys.stderr)
            return 2
    packages = ["torch", "deqlab"]
    if not args.no_torchdeq:
        try:
            import torchdeq  # noqa: F401

            packages.append("torchdeq")
        except ImportError:
            print(
                "torchdeq is not installed (pip install torchdeq==0.1.0, or `make bench`); benchmarking deqlab alone",
                file=sys.stderr,
            )
            args.no_torchdeq = True
    info = machine_info(device, packages=packages, dtype=args.dtype)
    print(machine_header(info).replace("**", ""), flush=True)

    t_start = time.perf_counter()
    results = []
    for name in names:
        print(f"\n[{name}] oracle, counts, {args.warmup} warm-up + {args.repeats} timed rounds, memory ...", flush=True)
        res = run_workload(name, args, device, dtype)
        if args.scaling:
            print(f"[{name}] memory against solver steps {args.mem_steps} ...", flush=True)
            res["scaling"] = memory_scaling(name, args, device, dtype, res)
        results.append(res)
        print(f"[{name}] done after {time.perf_counter() - t_start:.0f} s", flush=True)

    report = build_report(results, info, args)
    print()
    print(report)
    if args.write:
        section = args.section or (SECTION if device.type == "cpu" else f"{SECTION}-{device.type}")
        kw = {"path": args.results} if args.results else {}
        path = update_results_section(section, report, **kw)
        print(f"wrote section '{section}' of {path}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
