"""Smoke test of ``benchmarks/revision_ab.py``: it extracts a git revision of deqlab, times it beside the
working tree in alternating subprocesses and reports both revisions' NFE."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_quick_ab_of_head_against_the_working_tree_reports_equal_nfe(tmp_path):
    out = tmp_path / "report.md"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "revision_ab.py"),
            "--quick",
            "--baseline",
            "HEAD",
            "--workloads",
            "solver_anderson",
            "--output",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| solver_anderson")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1] == cells[2] and int(cells[1]) > 1  # same NFE on both sides of the A/B
    assert float(cells[7]) > 0


def test_an_unknown_workload_is_refused_with_the_valid_names():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "revision_ab.py"), "--worker", "nope"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "solver_anderson" in proc.stderr
