"""The DDP path of the scripts: 2 CPU processes (gloo) against 1 process with the same effective batch.

Lightning's DDP re-launches the running command as rank 1, so the script runs in a clean subprocess (no
inherited MASTER_ADDR/RANK/... from an outer launcher), never inside pytest itself. Under DDP each rank
draws its own shard of a shuffled epoch (Lightning's DistributedSampler), so the sample order differs from
the single process: with a tiny learning rate both runs stay next to the common initialization and the
final test loss must agree closely; steps, epochs and the effective batch must agree exactly.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

CLEAN = {
    "MASTER_ADDR",
    "MASTER_PORT",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "RANK",
    "NODE_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "TORCHELASTIC_RUN_ID",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    proc = subprocess.run(
        [sys.executable, str(REPO / "paper_repro" / "mnist.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, f"run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def _rows(path: Path):
    with open(path, newline="") as f:
        return {(r["model_type"], r["solver"]): r for r in csv.DictReader(f)}, sum(1 for _ in open(path)) - 1


@pytest.mark.slow
def test_two_cpu_processes_match_one_process_with_the_same_effective_batch(mnist_dir, tmp_path):
    # One batch per epoch (8 training images, effective batch 8): each step sees the same 8 samples in both
    # runs, whatever order DistributedSampler deals them in, so the gradients agree up to rounding. Plain SGD
    # keeps that rounding rounding-sized (Adam's g / sqrt(v) turns it into full-size steps where g ~ 0); tight
    # solves keep DDP's per-rank stopping (each rank stops when its half of the batch converges) out of it.
    common = [
        "--arch",
        "dense",
        "--grid",
        "--model-types",
        "vanilla,skip",
        "--solvers",
        "discrete",
        "--seeds",
        "5",
        "--epochs",
        "4",
        "--train-subset",
        "8",
        "--test-subset",
        "16",
        "--override",
        "optimizer=sgd",
        "--override",
        "lr=0.05",
        "--override",
        "momentum=0.0",
        "--model-option",
        "tol=1e-6",
        "--model-option",
        "max_steps=200",
        "--model-option",
        "backward_max_steps=60",
        "--data-dir",
        str(mnist_dir),
        "--num-workers",
        "0",
        "--progress",
        "lines",
    ]
    _run(
        common + ["--batch-size", "8", "--results-dir", str(tmp_path / "single"), "--log-dir", str(tmp_path / "tb1")],
        tmp_path,
    )
    out = _run(
        common
        + [
            "--accelerator",
            "cpu",
            "--devices",
            "2",
            "--batch-size",
            "4",
            "--results-dir",
            str(tmp_path / "ddp"),
            "--log-dir",
            str(tmp_path / "tb2"),
        ],
        tmp_path,
    )
    single, n_single = _rows(tmp_path / "single" / "mnist.csv")
    ddp, n_ddp = _rows(tmp_path / "ddp" / "mnist.csv")
    assert n_single == n_ddp == 2, "one row per run (rank 1 must not write)"
    assert "strategy          ddp" in out
    for key in (("vanilla", "discrete"), ("skip", "discrete")):
        a, b = single[key], ddp[key]
        assert (a["world_size"], b["world_size"]) == ("1", "2")
        assert a["steps"] == b["steps"] == "4" and a["epochs"] == b["epochs"] == "4.0"
        assert a["effective_batch_size"] == b["effective_batch_size"] == "8"
        assert a["test_samples"] == b["test_samples"] == "16"
        assert float(b["test_loss"]) == pytest.approx(float(a["test_loss"]), rel=1e-3)
        assert abs(float(b["test_accuracy"]) - float(a["test_accuracy"])) <= 1 / 16 + 1e-6
    assert list((tmp_path / "tb2").rglob("events.out.tfevents*")), "rank 0 wrote no TensorBoard events"


@pytest.mark.slow
def test_cifar10_small_trains_with_ddp_on_two_cpu_processes(cifar_dir, tmp_path):
    """The headline command's path (``cifar10.py --gpus 4``), here with 2 CPU processes and gloo."""
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    args = [
        "cifar10",
        "--arch",
        "small",
        "--accelerator",
        "cpu",
        "--devices",
        "2",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--train-subset",
        "8",
        "--test-subset",
        "4",
        "--data-dir",
        str(cifar_dir),
        "--num-workers",
        "0",
        "--progress",
        "lines",
        "--results-dir",
        str(tmp_path / "r"),
        "--log-dir",
        str(tmp_path / "tb"),
    ]
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("ddp_entry.py")), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, f"run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    rows, n = _rows(tmp_path / "r" / "cifar10.csv")
    assert n == 1
    row = rows[("skip", "discrete")]
    assert row["world_size"] == row["num_processes"] == "2" and row["strategy"] == "ddp"
    assert row["steps"] == "2" and row["effective_batch_size"] == "4" and row["steps_per_epoch"] == "2"
    assert row["test_samples"] == "4" and row["test_accuracy"] != ""
