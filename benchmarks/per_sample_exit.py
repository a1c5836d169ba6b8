"""Per-sample early exit: work saved and wall time on batches that converge unevenly.

``DiscreteDEQSolver(per_sample_exit=True)`` evaluates the map only on the samples still iterating. This
script solves the same batch with and without it, round-robin (so load drift hits both alike), and reports
for each workload and algorithm:

* NFE (batched calls, the same with and without the exit) and the sample-weighted NFE (rows evaluated / B),
  hence the share of map work saved;
* the median wall time of both solves and their ratio;
* the largest difference between the two solutions' fixed points, and whether their convergence masks
  and per-sample step counts are identical.

Workloads:

* ``mlp``: ``f(z, x) = r(x) * W2 tanh(W1 z) + x`` (width 256, hidden 1024, batch 128, ``W2 W1`` orthogonal)
  with a per-sample contraction ``r`` spread over [0.2, 0.9] — a map whose cost dominates the solver's,
  with per-sample step counts from a few to tens;
* ``mnist_dense``: the paper's MNIST dense DEQ layer (``deqlab.models``, eval mode; real MNIST test images
  when ``--data-dir`` has them, else random ones; both from ``_workloads.py``), timed as the layer's
  forward: a tiny map, where the exit's copies cost about as much as the evaluations they save.

Usage::

    python benchmarks/per_sample_exit.py                 # CPU, 1 thread, writes the section of RESULTS.md
    python benchmarks/per_sample_exit.py --quick         # smoke test: small sizes, 2 rounds, prints only
    python benchmarks/per_sample_exit.py --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from _common import (
    fmt_time,
    machine_header,
    machine_info,
    markdown_table,
    setup_threads,
    time_interleaved,
    update_results_section,
)
from _workloads import mnist_images, per_sample_mlp

from deqlab.solvers import DiscreteDEQSolver, SolverResult

SECTION = "per-sample-exit"


def mlp_solve(batch: int, width: int, hidden: int, device) -> Callable[[DiscreteDEQSolver], SolverResult]:
    f, z0 = per_sample_mlp(batch, width, hidden, device)
    return lambda solver: solver(f, z0)


def mnist_dense_solve(batch: int, data_dir: Path, device) -> Tuple[Callable[[DiscreteDEQSolver], SolverResult], str]:
    """The paper's MNIST dense DEQ layer (eval mode) with the given solver: the map the layer builds and
    hands its solver is restrictable, so the same layer runs with and without the exit."""
    from deqlab.models import build_model

    torch.manual_seed(0)
    model = build_model("mnist", "dense", model_type="vanilla", solver="discrete").to(device).eval()
    # raw [0, 1] pixels, as this benchmark has always fed the (untrained) layer; noise when MNIST is absent
    x, source = mnist_images(data_dir, "test", batch, normalize=False)
    with torch.no_grad():
        injection = model.stem(x.to(device))

    def solve(solver: DiscreteDEQSolver) -> SolverResult:
        model.deq.solver = solver
        return model.deq(injection)[1].solver_result

    return solve, source


def run(args) -> str:
    device = torch.device(args.device)
    threads = setup_threads(args.threads)
    quick = args.quick
    mnist_solve, mnist_source = mnist_dense_solve(32 if quick else 128, args.data_dir, device)
    workloads: Dict[str, Callable[[DiscreteDEQSolver], SolverResult]] = {
        "mlp": mlp_solve(32 if quick else args.batch, 64 if quick else 256, 256 if quick else 1024, device),
        "mnist_dense": mnist_solve,
    }
    rows: List[list] = []
    for wname, solve in workloads.items():
        for algorithm in args.algorithms:
            kw = dict(max_steps=args.max_steps, abstol_termination=args.tol, reltol_termination=args.tol)
            full = DiscreteDEQSolver(algorithm, **kw)
            exit_ = DiscreteDEQSolver(algorithm, per_sample_exit=True, **kw)
            with torch.no_grad():
                r_full, r_exit = solve(full), solve(exit_)
                times = time_interleaved(
                    {"full": lambda s=solve, f=full: s(f), "exit": lambda s=solve, f=exit_: s(f)},
                    repeats=2 if quick else args.repeats,
                    warmup=1,
                    device=device,
                )
            dz = float((r_full.z - r_exit.z).abs().max())
            same = bool(
                torch.equal(r_full.converged, r_exit.converged)
                and torch.equal(r_full.sample_steps, r_exit.sample_steps)
            )
            steps = r_full.sample_steps.float()
            saved = 1 - r_exit.sample_weighted_nfe / r_full.nfe
            t_full, t_exit = times["full"].median, times["exit"].median
            rows.append(
                [
                    wname,
                    algorithm,
                    f"{int(steps.min())}–{int(steps.max())}",
                    r_full.nfe,
                    f"{r_exit.sample_weighted_nfe:.1f}",
                    f"{100 * saved:.0f} %",
                    fmt_time(t_full),
                    fmt_time(t_exit),
                    f"{t_exit / t_full:.2f}",
                    f"{dz:.1e}",
                    "yes" if same else "NO",
                    f"{float(r_full.converged.float().mean()):.2f}",
                ]
            )
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    info = machine_info(
        device,
        packages=("torch",),
        threads_requested=threads,
        notes=f"tol {args.tol}, max_steps {args.max_steps}, {args.repeats} rounds, "
        f"round-robin; mnist_dense: the layer's solve on {mnist_source}",
    )
    table = markdown_table(
        [
            "workload",
            "algorithm",
            "sample steps",
            "NFE",
            "sample-weighted NFE",
            "work saved",
            "full (median)",
            "exit (median)",
            "exit / full",
            "max |Δz|",
            "same masks & steps",
            "converged",
        ],
        rows,
        align="llrrrrrrrrcr",
    )
    return (
        f"## Per-sample early exit\n\n`python benchmarks/per_sample_exit.py{' --quick' if quick else ''}`\n\n"
        f"{machine_header(info)}\n\n{table}\n"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--algorithms", nargs="+", default=["lbroyden", "anderson", "fixed_point"])
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--quick", action="store_true", help="small sizes, 2 rounds, no RESULTS.md update")
    p.add_argument("--output", type=Path, default=None, help="also write the report to this file")
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    report = run(args)
    print(report)
    if args.output is not None:
        args.output.write_text(report, encoding="utf-8")
    if not args.quick and not args.no_write:
        name = SECTION if args.device == "cpu" else f"{SECTION}-{torch.device(args.device).type}"
        print(f"wrote {update_results_section(name, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
