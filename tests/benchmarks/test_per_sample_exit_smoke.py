"""Smoke test of ``benchmarks/per_sample_exit.py``: it runs in quick mode and reports work saved with the
full-batch and early-exit solves agreeing (masks and per-sample steps identical)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_reports_work_saved_and_identical_masks(tmp_path):
    out = tmp_path / "report.md"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "per_sample_exit.py"),
            "--quick",
            "--algorithms",
            "lbroyden",
            "--data-dir",
            str(tmp_path / "no-data"),
            "--output",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| mlp") or line.startswith("| mnist")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[10] == "yes"  # same masks & per-sample steps as the full-batch solve
        assert float(cells[4]) < float(cells[3])  # sample-weighted NFE below the batched NFE


def test_cifar10_generated_runs_the_paper_script_and_reports_throughput(tmp_path):
    # the script benchmarks/gpu_check.sh runs with --gpus 1; here 2 CPU steps on a tiny generated set
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "cifar10_generated.py"),
            "--n-train",
            "40",
            "--n-test",
            "16",
            "--out",
            str(tmp_path / "out"),
            "--gpus",
            "0",
            "--arch",
            "small",
            "--model-type",
            "vanilla",
            "--solver",
            "discrete",
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--override",
            "pretrain_steps=0",
            "--num-workers",
            "0",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "images/s (batch 4)" in proc.stdout and "2 steps" in proc.stdout
    assert (tmp_path / "out" / "cifar10.csv").exists()
