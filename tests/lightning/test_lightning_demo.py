"""``make demo`` (deqlab.demo) and the paper-reproduction script for MNIST."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from lightning_testkit import MNIST_DIR, REPO

from deqlab import demo


def test_demo_fast_mode_returns_the_table_rows(tmp_path):
    rows = demo.main(epochs=1, log_dir=str(tmp_path), limit_train_batches=3, verbose=False)
    assert [r["model"] for r in rows] == ["Skip DEQ", "DEQ"]
    skip, vanilla = rows
    assert skip["explicit_accuracy"] is not None and vanilla["explicit_accuracy"] is None
    for r in rows:
        assert 0 <= r["test_accuracy"] <= 1 and r["test_nfe"] > 0 and r["backward_nfe"] > 0 and r["epoch_time_s"] > 0
    table = demo.format_table(rows)
    assert "Skip DEQ" in table and "explicit acc" in table
    assert list((tmp_path / "skip").rglob("events.out.tfevents*"))


@pytest.mark.slow
def test_demo_reaches_95_percent_on_digits(tmp_path):
    rows = demo.main(log_dir=str(tmp_path), verbose=False)
    for r in rows:
        assert r["test_accuracy"] >= 0.95, r


@pytest.mark.skipif(
    not (MNIST_DIR / "MNIST" / "raw" / "train-images-idx3-ubyte").exists(), reason="MNIST not in shared/data"
)
def test_paper_repro_mnist_runs_a_few_steps_on_the_real_mnist_and_writes_results(tmp_path):
    """The README's command, as a subprocess, on the real MNIST (the other paper_repro tests write tiny idx files)."""
    cmd = [
        sys.executable,
        str(REPO / "paper_repro" / "mnist.py"),
        "--model-type",
        "skip",
        "--max-steps",
        "5",
        "--data-dir",
        str(MNIST_DIR),
        "--train-subset",
        "256",
        "--test-subset",
        "128",
        "--num-workers",
        "0",
        "--log-dir",
        str(tmp_path / "runs"),
        "--results-dir",
        str(tmp_path / "results"),
        "--seed",
        "6171",
        "--progress",
        "none",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(tmp_path / "results" / "mnist.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1
    [row] = rows
    assert row["steps"] == "5" and row["model_type"] == "skip" and row["explicit_accuracy"] != ""
    assert row["train_samples"] == "256" and row["test_samples"] == "128"
    assert 0.0 <= float(row["test_accuracy"]) <= 1.0 and float(row["test_nfe"]) >= 1


def test_paper_repro_mnist_reports_missing_data(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "paper_repro" / "mnist.py"), "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "MNIST not found" in proc.stderr and "--data-dir" in proc.stderr
