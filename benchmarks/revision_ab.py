"""Did a change slow deqlab down? Time the same workloads on two revisions of deqlab, in the same run.

Why a separate script: timings on a shared machine drift by 2x between runs, so a number measured last
week cannot tell whether today's code is slower. This script extracts the baseline revision's ``deqlab``
package with ``git archive`` into a temporary folder and times the baseline and the candidate (by default
the working tree) *in alternation*, each round in a fresh subprocess per revision, so load changes hit both
alike. It reports, per workload, the NFE of each revision (a change that "speeds up" by stopping earlier is
visible at once), the median and minimum time per call, and the candidate / baseline ratio of the medians.

The workloads use only public API that exists in every revision since the first release:

* ``mnist_dense_<vanilla|skip>``: ``deqlab.zoo.MNISTDenseDEQ`` forward + backward on a seeded batch of 32
  random images (the paper's MNIST dense model and adjoint protocol);
* ``solver_<algorithm>``: ``DiscreteDEQSolver(algorithm)`` forward only on the dense map of
  ``_workloads.py`` (``tanh(W z + U x + b)``, D = 256, B = 64, ``‖W‖₂ = 0.9``; the map of ``solvers.py``).

Usage::

    python benchmarks/revision_ab.py --baseline 66dabfa^            # writes the 'revision-ab' section
    python benchmarks/revision_ab.py --baseline HEAD~3 --quick      # 2 rounds, no RESULTS.md update
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]

SECTION = "revision-ab"
DEFAULT_WORKLOADS = ("mnist_dense_vanilla", "mnist_dense_skip", "solver_lbroyden", "solver_anderson")


# ------------------------------------------------------------------------------------- worker (subprocess)


def _mnist_dense(model_type: str):
    import torch

    from deqlab.zoo import MNISTDenseDEQ

    torch.manual_seed(0)
    model = MNISTDenseDEQ(model_type=model_type)
    x, y = torch.randn(32, 784), torch.randint(0, 10, (32,))

    def call() -> int:
        model.zero_grad()
        out, sol = model(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        if getattr(sol, "skip_loss", None) is not None:  # the record differs between revisions
            loss = loss + sol.skip_loss
        loss.backward()
        return int(sol.nfe)

    return call


def _solver(algorithm: str):
    import torch

    from _workloads import make_dense

    from deqlab.solvers import DiscreteDEQSolver

    wl = make_dense(torch.device("cpu"), torch.float32, seed=0)
    f = wl.closure()
    solver = DiscreteDEQSolver(algorithm, abstol_termination=1e-4, reltol_termination=1e-4, max_steps=100)

    def call() -> int:
        with torch.no_grad():
            return int(solver(f, wl.z0()).nfe)

    return call


def worker(workload: str, repeats: int, warmup: int) -> Dict[str, object]:
    """Time ``repeats`` calls of one workload in this process (the revision on ``sys.path``)."""
    import torch

    torch.set_num_threads(1)
    if workload.startswith("mnist_dense_"):
        call = _mnist_dense(workload[len("mnist_dense_") :])
    elif workload.startswith("solver_"):
        call = _solver(workload[len("solver_") :])
    else:
        raise SystemExit(f"unknown workload {workload!r}; valid: {', '.join(DEFAULT_WORKLOADS)}")
    nfe = 0
    for _ in range(warmup):
        nfe = call()
    times: List[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        nfe = call()
        times.append(time.perf_counter() - t0)
    return {"times": times, "nfe": nfe}


# ----------------------------------------------------------------------------------------------- driver


def extract(revision: str, into: Path) -> str:
    """Write ``deqlab/`` of ``revision`` under ``into``; return the revision's short hash."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", revision], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    archive = subprocess.run(["git", "archive", sha, "deqlab"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return sha


def run_once(tree: Path, workload: str, repeats: int, warmup: int) -> Dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", workload, "--repeats", str(repeats), "--warmup", str(warmup)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{workload} on {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> str:
    from _common import fmt_time, machine_header, machine_info, markdown_table

    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "baseline"
        base_tree.mkdir()
        base_sha = extract(args.baseline, base_tree)
        if args.candidate == "worktree":
            cand_tree, cand_name = ROOT, "working tree"
        else:
            cand_tree = Path(tmp) / "candidate"
            cand_tree.mkdir()
            cand_name = extract(args.candidate, cand_tree)
        trees = {"baseline": base_tree, "candidate": cand_tree}
        rows = []
        for workload in args.workloads:
            times: Dict[str, List[float]] = {"baseline": [], "candidate": []}
            nfe: Dict[str, set] = {"baseline": set(), "candidate": set()}
            for r in range(args.rounds):
                order = ("baseline", "candidate") if r % 2 == 0 else ("candidate", "baseline")
                for name in order:
                    out = run_once(trees[name], workload, args.repeats, args.warmup)
                    times[name].extend(out["times"])
                    nfe[name].add(out["nfe"])
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append(
                [
                    workload,
                    "/".join(map(str, sorted(nfe["baseline"]))),
                    "/".join(map(str, sorted(nfe["candidate"]))),
                    fmt_time(med["baseline"]),
                    fmt_time(med["candidate"]),
                    fmt_time(min(times["baseline"])),
                    fmt_time(min(times["candidate"])),
                    f"{med['candidate'] / med['baseline']:.2f}",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    info = machine_info(
        "cpu",
        packages=("torch",),
        threads_requested=1,
        notes=f"{args.rounds} rounds x {args.repeats} calls per revision, alternating order, a fresh process per round",
    )
    table = markdown_table(
        [
            "workload",
            "NFE baseline",
            "NFE candidate",
            "baseline (median)",
            "candidate (median)",
            "baseline (min)",
            "candidate (min)",
            "candidate / baseline",
        ],
        rows,
        align="lrrrrrrr",
    )
    return (
        f"## Revision A/B: baseline `{base_sha}` ({args.baseline}) vs {cand_name}\n\n"
        f"`python benchmarks/revision_ab.py --baseline {args.baseline}`\n\n{machine_header(info)}\n\n{table}\n"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--baseline",
        default="66dabfa^",
        help="git revision to compare against (default: the last commit before the core reshaping of issue 7)",
    )
    p.add_argument("--candidate", default="worktree", help="git revision, or 'worktree' (default)")
    p.add_argument("--workloads", nargs="+", default=list(DEFAULT_WORKLOADS))
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="2 rounds of 3 calls, no RESULTS.md update")
    p.add_argument("--output", type=Path, default=None, help="also write the report to this file")
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.repeats, args.warmup)))
        return 0
    if args.quick:
        args.rounds, args.repeats, args.warmup = 2, 3, 1
    report = run(args)
    print(report)
    if args.output is not None:
        args.output.write_text(report, encoding="utf-8")
    if not args.quick and not args.no_write:
        from _common import update_results_section

        print(f"wrote {update_results_section(SECTION, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
