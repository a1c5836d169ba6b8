"""Smoke test of ``benchmarks/backward.py``: the quick run on the dense workload measures deqlab's implicit
backward against the float64 oracle and the unrolled baseline, and its breakdown (the backward's regions in
``deqlab.instrument``) fills every column for each adjoint solver (GMRES and the fixed-point ones).

Why: the breakdown used to patch deqlab's private methods by dotted names; this runs it in the test suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _cells(line: str) -> list:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_quick_run_reports_gradients_and_a_backward_breakdown(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "backward.py"),
            "--quick",
            "--no-torchdeq",
            "--workloads",
            "dense",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--no-scaling",
            "--b-tols",
            "1e-4",
            "--tight-factor",
            "1",
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
    lines = [_cells(line) for line in text.splitlines() if line.startswith("|")]
    main = [c for c in lines if c[0] in ("deqlab", "unrolled")]
    assert [c[1] for c in main] == [
        "ImplicitBackward(gmres)",
        "ImplicitBackward(fixed_point)",
        "ImplicitBackward(anderson)",
        "fixed-point × 10",
    ]
    for c in main:
        assert float(c[8]) < 1e-2  # gradient error against the float64 oracle
    assert "Where deqlab's backward time goes" in text
    header = next(c for c in lines if c[0] == "deqlab backward")
    rows = [dict(zip(header, c)) for c in lines if c[0].startswith("ImplicitBackward") and len(c) == len(header)]
    assert len(rows) == 3
    for r in rows:
        for col in ("f re-eval", "adjoint VJPs (per VJP)", "param VJP", "adjoint solver excl. VJPs (per step)"):
            assert not r[col].startswith("0 µs"), (r["deqlab backward"], col, r[col])


def test_compile_adds_a_compiled_row_per_configuration_with_the_same_gradients(tmp_path):
    # the tracing-only backend: the rows and their VJP counts and gradient errors, not inductor's speed
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, str(ROOT / "benchmarks" / "backward.py"), "--quick", "--no-torchdeq"]
    command += ["--workloads", "dense", "--repeats", "1", "--warmup", "0", "--no-scaling", "--no-breakdown"]
    command += ["--b-tols", "1e-4", "--tight-factor", "1", "--no-write", "--compile", "--compile-backend", "eager"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {c[1]: c for c in map(_cells, proc.stdout.splitlines()) if c and c[0] == "deqlab"}
    for b in ("gmres", "fixed_point", "anderson"):
        eager, compiled = rows[f"ImplicitBackward({b})"], rows[f"ImplicitBackward({b}), compiled"]
        assert compiled[4:8] == eager[4:8]  # the same forward evaluations, residual and backward VJPs
        assert abs(float(compiled[8]) - float(eager[8])) <= 1e-3 * float(eager[8])  # the same gradient error
