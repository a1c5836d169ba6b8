#!/usr/bin/env python
"""Forward fixed-point solvers: deqlab against torchdeq 0.1.0 on the same maps.

For every workload both libraries solve the same closure ``lambda z: f(z, x)`` from ``z0 = 0`` under
``torch.no_grad()``, with the same seeds, dtype and thread count, to the same per-sample criterion

    ||f(z) - z||_2 / ||f(z)||_2 <= tol          (default tol = 1e-4, every sample of the batch)

* deqlab: ``DiscreteDEQSolver(algo, mode="rel_norm", reltol_termination=tol)``; ``rel_norm`` tests
  ``||du|| <= reltol * ||du + u||`` per sample and the solve ends when every sample has met it.
* torchdeq: ``stop_mode="rel", tol=tol``. Its ``rel`` residual is per sample as well,
  ``||f(z) - z||_2 / (||f(z)||_2 + 1e-9)`` over the flattened sample (an un-normalised L2 norm, no
  ``sqrt(N)``), and it stops when the *maximum over the batch* is ``< tol``, i.e. when every sample has
  met it. So the same number is the same criterion; no conversion is needed. (Its ``abs`` mode would
  need a per-sample tolerance ``tol * ||f(z*)||``, which no single scalar can express.)

Reported per solver: NFE (batched evaluations of ``f`` counted by the benchmark itself, JVPs included),
the median wall time of the solve, the final per-sample relative residual *re-measured by the benchmark*
at the returned iterate (max over samples), and the overhead ``time / (NFE * t_f)`` where ``t_f`` is the
median time of one evaluation of ``f`` measured in the same run.

Usage::

    python benchmarks/solvers.py                  # CPU, 1 thread, writes benchmarks/RESULTS.md
    python benchmarks/solvers.py --quick          # smoke test (3 repeats)
    python benchmarks/solvers.py --device cuda    # GPU run
    python benchmarks/solvers.py --compile --workloads dense --section solvers-compiled
                                                  # + eager vs compiled solver step (inductor compiles:
                                                  #   about a minute per algorithm on a small CPU)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:
    sys.path.insert(1, str(_HERE.parent))  # run from a checkout without `pip install -e .`

warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)

import torch  # noqa: E402

from _common import (  # noqa: E402
    Timing,
    fmt_time,
    machine_header,
    machine_info,
    markdown_table,
    setup_threads,
    shown_argv,
    synchronize,
    time_once,
    update_results_section,
)
from _workloads import WORKLOADS, Workload, relative_residual  # noqa: E402

SECTION = "solvers"
DEQLAB_ALGOS = ("fixed_point", "anderson", "broyden", "lbroyden", "newton_krylov")
TORCHDEQ_ALGOS = ("anderson", "broyden", "fixed_point_iter")
TARGET_TIME_RATIO = 0.6
TARGET_OVERHEAD = 1.3


# ---------------------------------------------------------------------------------------------- solvers


class CountingMap:
    """Wraps the closure and counts batched evaluations; calls made inside ``torch.func.jvp`` (whose
    argument is a functorch-wrapped tensor) are counted separately as JVPs."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn
        self.plain = 0
        self.jvp = 0
        self._wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if self._wrapped(z):
            self.jvp += 1
        else:
            self.plain += 1
        return self.fn(z)

    @property
    def total(self) -> int:
        return self.plain + self.jvp


@dataclass
class SolverSpec:
    library: str
    algorithm: str
    solve: Callable[[Callable, torch.Tensor], tuple]  # (f, z0) -> (z, steps, reported_nfe or None)

    @property
    def label(self) -> str:
        return f"{self.library} {self.algorithm}"


def deqlab_specs(tol: float, max_steps: int, algos=DEQLAB_ALGOS) -> List[SolverSpec]:
    from deqlab.solvers import DiscreteDEQSolver

    specs = []
    for algo in algos:
        solver = DiscreteDEQSolver(algo, mode="rel_norm", reltol_termination=tol, max_steps=max_steps)

        def solve(f, z0, solver=solver):
            r = solver(f, z0)
            return r.z, r.steps, r.nfe

        specs.append(SolverSpec("deqlab", algo, solve))
    return specs


def torchdeq_specs(tol: float, max_steps: int, algos=TORCHDEQ_ALGOS) -> List[SolverSpec]:
    from torchdeq.solver import get_solver

    specs = []
    for algo in algos:
        fn = get_solver(algo)

        def solve(f, z0, fn=fn):
            with torch.no_grad():
                z, _, info = fn(f, z0, max_iter=max_steps, tol=tol, stop_mode="rel")
            return z, int(info["nstep"].max()), None

        specs.append(SolverSpec("torchdeq", algo, solve))
    return specs


# ------------------------------------------------------------------------------------------- measuring


@dataclass
class Row:
    spec: SolverSpec
    nfe: int = 0
    nfe_jvp: int = 0
    reported_nfe: Optional[int] = None
    steps: int = 0
    max_rel: float = float("nan")
    converged: bool = False
    timing: Timing = field(default_factory=Timing)

    @property
    def time(self) -> float:
        return self.timing.median


@torch.no_grad()
def run_workload(
    wl: Workload,
    specs: List[SolverSpec],
    *,
    tol: float,
    repeats: int,
    warmup: int,
    device: torch.device,
    f_evals_per_round: int = 5,
) -> dict:
    f = wl.closure()
    rows = [Row(spec) for spec in specs]

    # 1) one untimed solve each: NFE (counted here), steps, residual re-measured at the returned iterate.
    z_star = None
    for row in rows:
        counter = CountingMap(f)
        z, steps, reported = row.spec.solve(counter, wl.z0())
        synchronize(device)
        rel = relative_residual(f, z)
        row.nfe, row.nfe_jvp, row.reported_nfe, row.steps = counter.total, counter.jvp, reported, steps
        row.max_rel = float(rel.max())
        row.converged = bool((rel <= tol * (1 + 1e-6)).all())
        if z_star is None or (row.converged and row.spec.library == "deqlab"):
            z_star = z

    # 2) timing, round-robin so load drifts on a shared machine hit every solver alike; one f evaluation
    #    (and one JVP, for Newton-Krylov's accounting) is timed in every round too.
    v = torch.randn(z_star.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = v.to(z_star.device, z_star.dtype)
    f_time, jvp_time = Timing(), Timing()
    calls = {row.spec.label: (lambda row=row: row.spec.solve(f, wl.z0())) for row in rows}
    for r in range(warmup + repeats):
        timed = r >= warmup
        for row in rows:
            t = time_once(calls[row.spec.label], device)
            if timed:
                row.timing.add(t)
        for _ in range(f_evals_per_round):
            t = time_once(lambda: f(z_star), device)
            if timed:
                f_time.add(t)
        t = time_once(lambda: torch.func.jvp(f, (z_star,), (v,)), device)
        if timed:
            jvp_time.add(t)
    return {"workload": wl, "rows": rows, "f_time": f_time, "jvp_time": jvp_time}


# --------------------------------------------------------------------------- eager vs compiled step

# those with a pure step: the discrete algorithms, and the continuous integrators (solved to the same
# criterion, ODE tolerance = the termination tolerance, at most 200 stepper calls)
COMPILED_ALGOS = ("fixed_point", "anderson", "broyden", "lbroyden", "tsit5", "vcab3")


@torch.no_grad()
def compile_comparison(
    wl: Workload,
    *,
    tol: float,
    max_steps: int,
    repeats: int,
    device: torch.device,
    backend="inductor",
    algos=COMPILED_ALGOS,
    block: int = 4,
) -> List[dict]:
    """Per algorithm: the eager and the compiled (``compile=backend``) solve of the same map, timed
    round-robin; the first compiled solve's extra time is the compile time, and it is amortised after
    ``compile time / (eager - compiled)`` solves. Discrete algorithms also run with ``check_every=block``:
    the block of steps between two host checks as one compiled graph, captured as a CUDA graph
    (``cuda_graphs=True``) on a GPU."""
    from deqlab.solvers import ContinuousDEQSolver, DiscreteDEQSolver
    from deqlab.solvers.compiled import reset_cache

    f = wl.closure()
    out = []
    for algo in algos:
        kw: Dict[str, Any] = dict(mode="rel_norm", reltol_termination=tol, max_steps=max_steps)
        make: Any = DiscreteDEQSolver
        if algo in ("tsit5", "vcab3"):
            kw.update(abstol_termination=tol, ode_abstol=tol, ode_reltol=tol, max_steps=max(max_steps, 200))
            make = ContinuousDEQSolver
        eager, compiled = make(algo, **kw), make(algo, compile=backend, **kw)
        blocked = None
        if make is DiscreteDEQSolver and block > 1:
            blocked = make(algo, compile=backend, check_every=block, cuda_graphs=device.type == "cuda", **kw)
        reset_cache()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = time_once(lambda compiled=compiled: compiled(f, wl.z0()), device)
        fell_back = any("running eager" in str(w.message) for w in caught)
        r_e, r_c = eager(f, wl.z0()), compiled(f, wl.z0())
        same = r_e.nfe == r_c.nfe and r_e.status == r_c.status and bool(torch.equal(r_e.sample_steps, r_c.sample_steps))
        t_e, t_c, t_b = Timing(), Timing(), Timing()
        r_b = None
        if blocked is not None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                r_b = blocked(f, wl.z0())
            fell_back = fell_back or any("running eager" in str(w.message) for w in caught)
        for _ in range(repeats):
            t_e.add(time_once(lambda eager=eager: eager(f, wl.z0()), device))
            t_c.add(time_once(lambda compiled=compiled: compiled(f, wl.z0()), device))
            if blocked is not None:
                t_b.add(time_once(lambda blocked=blocked: blocked(f, wl.z0()), device))
        compile_time = max(first - t_c.median, 0.0)
        gain = t_e.median - t_c.median
        out.append(
            {
                "algorithm": algo,
                "nfe": r_c.nfe,
                "steps": r_c.steps,
                "same": same,
                "eager": t_e,
                "compiled": t_c,
                "blocked": t_b if r_b is not None else None,
                "block": block,
                "block_nfe": None if r_b is None else r_b.nfe,
                "compile_time": compile_time,
                "fell_back": fell_back,
                "amortise_solves": compile_time / gain if gain > 0 else math.inf,
                "amortise_steps": compile_time / (gain / max(r_c.steps, 1)) if gain > 0 else math.inf,
            }
        )
    return out


def compile_table(rows: List[dict], torchdeq_best: Optional[Row] = None, t_f: Optional[float] = None) -> str:
    """The eager / compiled / blocks columns side by side; with ``t_f`` (one evaluation of f, measured in the
    same run) also where the time goes: what each solve spends around its NFE × t_f, per step."""
    headers = [
        "solver",
        "NFE",
        "same NFE, steps, status",
        "eager (median)",
        "compiled (median)",
        "speed-up",
        "compiled, blocks of k steps (NFE, median)",
        "compile time (first solve)",
        "amortised after (solves)",
        "amortised after (steps)",
    ]
    if t_f is not None:
        headers.append("NFE × t_f")
        headers.append("around f per step: eager / compiled / blocks")
    if torchdeq_best is not None:
        headers.append(f"compiled / torchdeq {torchdeq_best.spec.algorithm}")
    table = []
    for r in rows:
        line = [
            r["algorithm"] + (" (**eager fallback**)" if r["fell_back"] else ""),
            r["nfe"],
            "yes" if r["same"] else "**no**",
            fmt_time(r["eager"].median),
            fmt_time(r["compiled"].median),
            f"{r['eager'].median / r['compiled'].median:.2f}×",
            "n/a"
            if r.get("blocked") is None
            else f"k = {r['block']}: {r['block_nfe']}, {fmt_time(r['blocked'].median)}",
            f"{r['compile_time']:.1f} s",
            "never" if math.isinf(r["amortise_solves"]) else f"{math.ceil(r['amortise_solves'])}",
            "never" if math.isinf(r["amortise_steps"]) else f"{math.ceil(r['amortise_steps'])}",
        ]
        if t_f is not None:
            steps = max(r["steps"], 1)
            around = [(r["eager"].median - r["nfe"] * t_f) / steps, (r["compiled"].median - r["nfe"] * t_f) / steps]
            if r.get("blocked") is not None:
                around.append((r["blocked"].median - r["block_nfe"] * t_f) / max(r["block_nfe"] - 1, 1))
            line.append(fmt_time(r["nfe"] * t_f))
            line.append(" / ".join(fmt_time(a) for a in around))
        if torchdeq_best is not None:
            line.append(f"{r['compiled'].median / torchdeq_best.time:.2f}×")
        table.append(line)
    align = "lrlrrrrrrr" + ("rr" if t_f is not None else "") + ("r" if torchdeq_best is not None else "")
    return markdown_table(headers, table, align)


# ------------------------------------------------------------------------------- deqlab time breakdown

# The regions deqlab's solvers report to `deqlab.instrument` (exclusive times: a region's own time, the
# regions nested in it subtracted), in the order of the table's columns.
BREAKDOWN_COLUMNS = ("f", "termination", "algorithm.step", "algorithm.init", "solver.setup", "solver.result", "solver")
COLUMN_TITLES = {
    "f": "f evals",
    "termination": "termination (per call)",
    "algorithm.step": "algorithm step excl. f (per step)",
    "algorithm.init": "algorithm init",
    "solver.setup": "setup",
    "solver.result": "result",
    "solver": "solver loop",
}


@torch.no_grad()
def deqlab_breakdown(wl: Workload, specs: List[SolverSpec], *, repeats: int, device: torch.device) -> dict:
    """Per deqlab solver: median per-solve time in each region (seconds) and the median total."""
    from deqlab import instrument

    f = wl.closure()
    out = {}
    sync = device if device.type != "cpu" else False
    for spec in specs:
        if spec.library != "deqlab":
            continue
        per_region: Dict[str, List[float]] = {r: [] for r in BREAKDOWN_COLUMNS + ("other",)}
        totals = []
        spec.solve(f, wl.z0())  # warm-up unrecorded
        for _ in range(repeats):
            with instrument.record(sync=sync) as rec:
                synchronize(device)
                t0 = time.perf_counter()
                _, steps, nfe = spec.solve(f, wl.z0())
                synchronize(device)
                total = time.perf_counter() - t0
            totals.append(total)
            ex = rec.exclusive()
            for r in BREAKDOWN_COLUMNS:
                per_region[r].append(ex.get(r, 0.0))
            per_region["other"].append(total - rec.total)
        out[spec.algorithm] = {
            "total": statistics.median(totals),
            "regions": {r: statistics.median(v) for r, v in per_region.items()},
            "steps": steps,
            "nfe": nfe,
            "calls": rec.calls(),  # of the last run
        }
    return out


def breakdown_table(bd: dict) -> str:
    headers = ["deqlab solver", "NFE", "steps", "total"] + [COLUMN_TITLES[r] for r in BREAKDOWN_COLUMNS] + ["other"]
    rows = []
    for algo, d in bd.items():
        reg, tot, calls = d["regions"], d["total"], d["calls"]

        def cell(r, per=None, reg=reg, tot=tot):
            v = reg[r]
            s = f"{fmt_time(v)} ({100 * v / tot:.0f}%)"
            if per:
                s += f", {fmt_time(v / per)}"
            return s

        rows.append(
            [algo, d["nfe"], d["steps"], fmt_time(tot)]
            + [
                cell(r, max(calls.get(r, 1), 1) if r in ("termination", "algorithm.step") else None)
                for r in BREAKDOWN_COLUMNS
            ]
            + [cell("other")]
        )
    return markdown_table(headers, rows, "lrrr" + "r" * (len(BREAKDOWN_COLUMNS) + 1))


# --------------------------------------------------------------------------------------------- reports


def overhead(row: Row, t_f: float, t_jvp: float, *, jvp_aware: bool = False) -> float:
    if jvp_aware:
        return row.time / ((row.nfe - row.nfe_jvp) * t_f + row.nfe_jvp * t_jvp)
    return row.time / (row.nfe * t_f)


def fmt_res(x: float) -> str:
    return f"{x:.2e}" if math.isfinite(x) else str(x)


def workload_table(res: dict, tol: float) -> str:
    t_f, t_jvp = res["f_time"].median, res["jvp_time"].median
    headers = [
        "library",
        "solver",
        "NFE",
        "steps",
        "max rel. residual",
        "converged",
        "time (median)",
        "IQR",
        "min",
        "time / NFE",
        "overhead",
        "overhead (min)",
    ]
    rows = []
    for row in res["rows"]:
        nfe = str(row.nfe) + (f" ({row.nfe_jvp} JVP)" if row.nfe_jvp else "")
        if row.reported_nfe is not None and row.reported_nfe != row.nfe:
            nfe += f" [reports {row.reported_nfe}]"
        ov = f"{overhead(row, t_f, t_jvp):.2f}"
        if row.nfe_jvp:
            ov += f" ({overhead(row, t_f, t_jvp, jvp_aware=True):.2f} JVP-priced)"
        ov_min = row.timing.min / (row.nfe * res["f_time"].min)
        rows.append(
            [
                row.spec.library,
                row.spec.algorithm,
                nfe,
                row.steps,
                fmt_res(row.max_rel),
                "yes" if row.converged else "**no**",
                fmt_time(row.time),
                fmt_time(row.timing.iqr),
                fmt_time(row.timing.min),
                fmt_time(row.time / max(row.nfe, 1)),
                ov,
                f"{ov_min:.2f}",
            ]
        )
    return markdown_table(headers, rows, "llrrrlrrrrrr")


def targets(res: dict, tol: float) -> dict:
    t_f = res["f_time"].median
    rows = [r for r in res["rows"] if r.converged]
    deq = [r for r in rows if r.spec.library == "deqlab"]
    tdq = [r for r in rows if r.spec.library == "torchdeq"]
    out = {"ok": False}
    if not deq or not tdq:
        out["text"] = "cannot compare: no converged solver in " + ("deqlab" if not deq else "torchdeq")
        return out
    best_d = min(deq, key=lambda r: r.time)
    best_t = min(tdq, key=lambda r: r.time)
    min_nfe_t = min(r.nfe for r in tdq)
    ov = overhead(best_d, t_f, res["jvp_time"].median)
    checks = [
        (f"NFE ≤ torchdeq's fewest ({min_nfe_t})", best_d.nfe <= min_nfe_t, f"{best_d.nfe}"),
        (
            f"time ≤ {TARGET_TIME_RATIO}× torchdeq's fastest ({best_t.spec.algorithm}, {fmt_time(best_t.time)})",
            best_d.time <= TARGET_TIME_RATIO * best_t.time,
            f"{best_d.time / best_t.time:.2f}×",
        ),
        (f"overhead ≤ {TARGET_OVERHEAD}", ov <= TARGET_OVERHEAD, f"{ov:.2f}"),
    ]
    out["ok"] = all(c[1] for c in checks)
    table = markdown_table(
        ["target (deqlab's fastest: " + best_d.spec.algorithm + ")", "measured", "met"],
        [[c[0], c[2], "yes" if c[1] else "**no**"] for c in checks],
        "lrl",
    )
    out["text"] = table
    return out


def build_report(results: List[dict], info: dict, args) -> str:
    parts = [
        "## Forward solvers: deqlab vs torchdeq",
        "",
        f"Generated by `python benchmarks/solvers.py{' ' + ' '.join(shown_argv(args.argv)) if shown_argv(args.argv) else ''}`.",
        "",
        machine_header(info),
        "",
        f"Criterion: per-sample relative residual ‖f(z) − z‖₂ / ‖f(z)‖₂ ≤ {args.tol:g} for every sample. "
        f'deqlab: `DiscreteDEQSolver(algo, mode="rel_norm", reltol_termination={args.tol:g}, '
        f'max_steps={args.max_steps})`. torchdeq 0.1.0: `stop_mode="rel", tol={args.tol:g}, '
        f"max_iter={args.max_steps}`: its `rel` residual is also per sample (un-normalised L2 over the flattened "
        "sample, divided by ‖f(z)‖₂ + 1e-9) and it stops when the batch *maximum* is below `tol`, which is the "
        "same criterion, so the tolerance needs no conversion (its `abs` mode would need a per-sample "
        "tolerance tol·‖f(z*)‖). Both solve `lambda z: f(z, x)` from z0 = 0 under `torch.no_grad()`; "
        "U x is computed inside f. Library defaults otherwise (deqlab: Anderson memory 5, Broyden memory = "
        "max_steps, L-Broyden memory 27, Newton–Krylov GMRES(20) with forward-mode JVPs; torchdeq: Anderson "
        "m = 6, λ = 1e-4, Broyden memory = max_iter, no line search).",
        "",
        "Columns: **NFE** = batched calls of f counted by the benchmark (JVPs through f included and shown); "
        "**steps** = deqlab's iterations after the first evaluation, torchdeq's reported `nstep` (the step "
        "of the iterate it returns); "
        "**max rel. residual** = re-measured by the benchmark at the returned iterate, max over samples "
        "(torchdeq's Anderson and fixed-point iteration return f(z_k), one map application past the iterate "
        "they tested, hence their smaller residuals); **time** = median wall time of one solve over "
        f"{args.repeats} runs after {args.warmup} warm-up runs, solvers timed round-robin; **overhead** = time / "
        "(NFE × t_f) with t_f the median time of one f evaluation measured in the same rounds (1.00 = "
        "nothing but f); **overhead (min)** = fastest solve / (NFE × fastest f evaluation), less sensitive to "
        "other processes on a shared machine. For Newton–Krylov a JVP costs more than f; the JVP-priced overhead uses the measured "
        "JVP time for those evaluations.",
        "",
    ]
    for res in results:
        wl = res["workload"]
        parts += [
            f"### {wl.name}: {wl.description}",
            "",
            f"t_f (one f evaluation) = {fmt_time(res['f_time'].median)} (IQR {fmt_time(res['f_time'].iqr)}, "
            f"{res['f_time'].n} samples); one JVP through f = {fmt_time(res['jvp_time'].median)}.",
            "",
            workload_table(res, args.tol),
            "",
            "Targets:",
            "",
            targets(res, args.tol)["text"],
            "",
        ]
        if "compiled" in res:
            tdq = [r for r in res["rows"] if r.spec.library == "torchdeq" and r.converged]
            best_t = min(tdq, key=lambda r: r.time) if tdq else None
            parts += [
                f"Eager vs compiled solver step (`DiscreteDEQSolver(..., compile={args.compile_backend!r})`: "
                "algorithm update, f and termination bookkeeping fused by `torch.compile`; "
                "`ContinuousDEQSolver(tsit5 | vcab3, compile=...)`: one stepper call fused, ODE tolerance = "
                "the termination tolerance; same criterion, "
                f"{args.repeats} solves each, timed round-robin; compile time = first compiled solve minus "
                "the median one; amortised after = compile time / (eager − compiled) per solve, and in "
                "solver steps of this workload; *blocks of k steps*: `check_every=k`, the k steps between two "
                "host checks as one compiled graph (a CUDA graph with `cuda_graphs=True` on a GPU), which may "
                "run up to k − 1 steps past the last sample's stop, hence its NFE; *around f per step* = "
                "(time − NFE × t_f) / steps, the solver's own cost per step (per stepper call for tsit5 / vcab3) "
                "with t_f measured in the same rounds — what compiling and blocks remove; negative where the "
                "compiled graph evaluates f faster than the eager t_f):",
                "",
                compile_table(res["compiled"], best_t, res["f_time"].median),
                "",
            ]
        if "breakdown" in res:
            parts += [
                "Where deqlab's time goes (median per solve over the same number of runs; the regions deqlab "
                "reports to `deqlab.instrument`, each timed exclusively, i.e. without the regions nested in "
                "it: *f evals* = region `f` (JVPs included), *algorithm step* = `algorithm.step` without the "
                "f evaluations inside it, *setup* = `solver.setup` (checking and flattening z0, the "
                "termination tracker), *result* = `solver.result`, *solver loop* = `solver` itself (the loop, "
                "`fz - z`), *other* = the call around the solver and the recording's own cost)"
                + (
                    "; on CUDA `record(sync=device)` synchronises the device at every region boundary, so "
                    "these regions add up to more than the unsynchronised solve above"
                    if args.device.startswith("cuda")
                    else ""
                )
                + ":",
                "",
                breakdown_table(res["breakdown"]),
                "",
            ]
    return "\n".join(parts).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu; e.g. cuda)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; 0 = torch default)")
    p.add_argument("--quick", action="store_true", help="smoke test: 3 repeats, 1 warm-up, no RESULTS.md update")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per solver (default 20, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per solver first (default 2, quick 1)")
    p.add_argument("--tol", type=float, default=1e-4, help="shared relative tolerance (default 1e-4)")
    p.add_argument("--max-steps", type=int, default=50, help="deqlab max_steps = torchdeq max_iter (default 50)")
    p.add_argument("--workloads", default="dense,conv", help="comma-separated subset of: " + ",".join(WORKLOADS))
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-torchdeq", action="store_true", help="benchmark deqlab alone")
    p.add_argument(
        "--no-breakdown",
        dest="breakdown",
        action="store_false",
        help="skip the per-region timing of deqlab's solvers (deqlab.instrument: f / termination / algorithm / setup)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time DiscreteDEQSolver(compile=...) against eager (compile time, amortisation)",
    )
    p.add_argument(
        "--block",
        type=int,
        default=4,
        help="with --compile, also time check_every=BLOCK: the block as one graph (a CUDA graph on a GPU; default 4)",
    )
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of --compile (default inductor; aot_eager for a quick check)",
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
        args.repeats = 3 if args.quick else 20
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.write is None:
        args.write = not args.quick
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

    specs = deqlab_specs(args.tol, args.max_steps)
    packages = ["torch", "deqlab"]
    if not args.no_torchdeq:
        try:
            specs += torchdeq_specs(args.tol, args.max_steps)
            packages.append("torchdeq")
        except ImportError:
            print(
                "torchdeq is not installed (pip install torchdeq==0.1.0, or `make bench`); benchmarking deqlab alone",
                file=sys.stderr,
            )
    info = machine_info(device, packages=packages, dtype=args.dtype)
    print(machine_header(info).replace("**", ""), flush=True)

    results = []
    for name in names:
        wl = WORKLOADS[name](device, dtype, args.seed)
        print(f"\n[{name}] {wl.description}: {args.warmup} warm-up + {args.repeats} timed rounds ...", flush=True)
        res = run_workload(wl, specs, tol=args.tol, repeats=args.repeats, warmup=args.warmup, device=device)
        print(workload_table(res, args.tol))
        print(f"t_f = {fmt_time(res['f_time'].median)}, JVP = {fmt_time(res['jvp_time'].median)}")
        print(targets(res, args.tol)["text"], flush=True)
        if args.compile:
            res["compiled"] = compile_comparison(
                wl,
                tol=args.tol,
                max_steps=args.max_steps,
                repeats=args.repeats,
                device=device,
                backend=args.compile_backend,
                block=args.block,
            )
            tdq = [r for r in res["rows"] if r.spec.library == "torchdeq" and r.converged]
            best = min(tdq, key=lambda r: r.time) if tdq else None
            print(compile_table(res["compiled"], best, res["f_time"].median), flush=True)
        if args.breakdown:
            res["breakdown"] = deqlab_breakdown(wl, specs, repeats=args.repeats, device=device)
            print("deqlab time per solve by region (median over runs; % of the solve):")
            print(breakdown_table(res["breakdown"]), flush=True)
        results.append(res)

    report = build_report(results, info, args)
    if args.write:
        section = args.section or (SECTION if device.type == "cpu" else f"{SECTION}-{device.type}")
        kw = {"path": args.results} if args.results else {}
        path = update_results_section(section, report, **kw)
        print(f"\nwrote section '{section}' of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
