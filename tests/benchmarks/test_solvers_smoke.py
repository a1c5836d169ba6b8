"""Smoke test of ``benchmarks/solvers.py``: the quick run solves the dense workload with every deqlab
algorithm and its breakdown (the regions of ``deqlab.instrument``) accounts for the solve's time.

Why: the breakdown used to patch deqlab's private methods by dotted names, and a rename broke it only when
someone ran the benchmark; this runs it in the test suite (< 20 s), breakdown included.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALGORITHMS = ("fixed_point", "anderson", "broyden", "lbroyden", "newton_krylov")


def _cells(line: str) -> list:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _ms(text: str) -> float:
    value, unit = text.split("(")[0].split()
    return float(value) * {"µs": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def test_quick_run_reports_every_algorithm_and_a_breakdown_that_adds_up(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "solvers.py"),
            "--quick",
            "--no-torchdeq",
            "--workloads",
            "dense",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--write",
            "--results",
            str(results),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = results.read_text(encoding="utf-8")
    main = {c[1]: c for c in map(_cells, text.splitlines()) if c[0] == "deqlab"}
    assert set(main) == set(ALGORITHMS)
    assert all(row[5] == "yes" for row in main.values())  # every algorithm converged
    assert "Where deqlab's time goes" in text
    header = next(_cells(line) for line in text.splitlines() if line.startswith("| deqlab solver"))
    assert header[4:] == [
        "f evals",
        "termination (per call)",
        "algorithm step excl. f (per step)",
        "algorithm init",
        "setup",
        "result",
        "solver loop",
        "other",
    ]
    rows = [
        dict(zip(header, c)) for c in map(_cells, text.splitlines()) if len(c) == len(header) and c[0] in ALGORITHMS
    ]
    assert [r["deqlab solver"] for r in rows] == list(ALGORITHMS)
    for r in rows:
        assert _ms(r["f evals"]) > 0 and _ms(r["termination (per call)"]) > 0
        parts = sum(_ms(r[c]) for c in header[4:])
        # the regions and "other" add up to the solve (medians of one run: exactly, up to rounding)
        assert abs(parts - _ms(r["total"])) <= 0.05 * _ms(r["total"]) + 0.05, r


def test_compile_run_shows_eager_compiled_and_block_columns_side_by_side(tmp_path):
    # the tracing-only backend: the table's shape and the equal-results column, not inductor's speed
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, str(ROOT / "benchmarks" / "solvers.py"), "--quick", "--no-torchdeq", "--no-breakdown"]
    command += ["--workloads", "dense", "--repeats", "1", "--warmup", "0", "--no-write"]
    command += ["--compile", "--compile-backend", "eager", "--block", "3"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(_cells(line) for line in lines if line.startswith("| solver "))
    assert header[3:7] == [
        "eager (median)",
        "compiled (median)",
        "speed-up",
        "compiled, blocks of k steps (NFE, median)",
    ]
    rows = {c[0]: c for c in map(_cells, lines) if c and c[0] in ALGORITHMS + ("tsit5", "vcab3")}
    assert set(rows) == {"fixed_point", "anderson", "broyden", "lbroyden", "tsit5", "vcab3"}
    assert all(row[2] == "yes" for row in rows.values())  # the compiled solve equals the eager one
    for name in ("fixed_point", "anderson", "broyden", "lbroyden"):
        k, rest = rows[name][6].split(": ")
        assert k == "k = 3" and int(rest.split(",")[0]) - int(rows[name][1]) in (0, 1, 2)  # < k extra steps
    assert rows["tsit5"][6] == "n/a"
    # where the time goes: the solver's own cost per step around the evaluations of f, for each column
    assert header[10:12] == ["NFE × t_f", "around f per step: eager / compiled / blocks"]
    assert len(rows["anderson"][11].split(" / ")) == 3 and len(rows["tsit5"][11].split(" / ")) == 2
