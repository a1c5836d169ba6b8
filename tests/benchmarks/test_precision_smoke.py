"""Smoke test of ``benchmarks/precision.py``: float32 and bf16-mixed runs of the digits model and of the
paper's MNIST dense model (on MNIST written in the real IDX format) each report a table row."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("_data_writers", ROOT / "tests" / "data" / "conftest.py")
writers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(writers)  # type: ignore[union-attr]


def _rows(stdout: str) -> list:
    return [
        [c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines() if line.startswith("| skip |")
    ]


@pytest.mark.parametrize("data", ["digits", "mnist"])
def test_float32_and_bf16_runs_report_accuracy_and_nfe(tmp_path, data):
    labels = (np.arange(64) % 10).astype(np.uint8)
    writers.write_mnist(
        tmp_path, writers.random_images(64, (28, 28), 1), labels, writers.random_images(32, (28, 28), 2), labels[:32]
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "precision.py"),
            "--data",
            data,
            "--data-dir",
            str(tmp_path),
            "--epochs",
            "1",
            "--models",
            "skip",
            "--precisions",
            "32-true,bf16-mixed",
            "--limit-train-batches",
            "2",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(proc.stdout)
    assert [r[1] for r in rows] == ["32-true", "bf16-mixed"]
    for r in rows:
        assert r[2].endswith("%") and float(r[4]) >= 1  # a test accuracy and a test NFE were measured
