"""Smoke tests of ``benchmarks/train_step.py``: the script runs in quick mode on one tiny configuration and
its table has the promised columns; the host-sync counter counts exactly the conversions it claims to.

Why: benchmarks rot silently when the library changes under them; this keeps the script runnable in the
test suite (< 20 s) without timing anything meaningful.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "train_step.py"

COLUMNS = [
    "step (median)",
    "fwd",
    "bwd",
    "NFE",
    "steps",
    "VJPs",
    "t_f",
    "t_vjp",
    "param VJP",
    "opt step",
    "overhead",
    "overhead (full)",
    "syncs/solve",
    "sync target",
]


def _table_header(text: str, first: str) -> list:
    for line in text.splitlines():
        if line.startswith(f"| {first}"):
            return [c.strip() for c in line.strip().strip("|").split("|")]
    raise AssertionError(f"no table starting with {first!r} in:\n{text}")


def test_train_step_quick_runs_and_reports_columns(tmp_path):
    out = tmp_path / "report.md"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--models",
            "mnist_dense",
            "--model-types",
            "vanilla",
            "--solvers",
            "discrete",
            "--batch",
            "4",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--no-torchdeq",
            "--no-breakdown",
            "--prediction",
            "--pred-batches",
            "1",
            "--fit-steps",
            "2",
            "--data-dir",
            str(tmp_path / "no-data"),
            "--output",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    header = _table_header(text, "model")
    for col in COLUMNS:
        assert col in header, f"missing column {col!r} in {header}"
    row = next(line for line in text.splitlines() if line.startswith("| mnist_dense"))
    cells = dict(zip(header, [c.strip() for c in row.strip().strip("|").split("|")]))
    assert int(cells["NFE"]) >= 1 and int(cells["VJPs"]) >= 1
    assert float(cells["overhead"]) > 0
    assert "Where the step's time goes" in text
    assert "### Host syncs per forward solve" in text
    pred = _table_header(text, "model type")
    for col in ("test NFE (mean)", "time / batch (median)", "NFE / vanilla's", "predictor cost", "met"):
        assert col in pred, f"missing column {col!r} in {pred}"
    assert "Gaussian noise" in text  # no MNIST in the temporary folder: it says so instead of failing


def test_train_step_region_breakdown_covers_discrete_and_continuous_solves(tmp_path):
    # the breakdown path: deqlab.instrument's regions, one row per solver kind, every column measured
    out = tmp_path / "report.md"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--models",
            "mnist_dense",
            "--model-types",
            "vanilla",
            "--solvers",
            "discrete,continuous",
            "--batch",
            "4",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--no-torchdeq",
            "--output",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    assert "Inside the step" in text
    header = next(_cells(line) for line in text.splitlines() if line.startswith("| model") and "fwd f evals" in line)
    rows = {
        cells[2]: dict(zip(header, cells))
        for cells in (_cells(line) for line in text.splitlines())
        if len(cells) == len(header) and cells[0] == "mnist_dense" and "fwd f evals" in header
    }
    assert set(rows) == {"discrete", "continuous"}
    for solver, row in rows.items():
        for col in (
            "fwd f evals",
            "termination",
            "algorithm / stepper",
            "f re-eval",
            "adjoint VJPs",
            "adjoint solver excl. VJPs",
            "param VJP",
        ):
            assert row[col] and not row[col].startswith(("0 µs", "−")), (solver, col, row[col])


def _cells(line: str) -> list:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_sync_counter_counts_scalar_conversions_and_restores_tensor():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from train_step import SyncCounter
    finally:
        sys.path.pop(0)
    t = torch.tensor([1.5])
    before = {name: torch.Tensor.__dict__.get(name) for name in ("item", "__bool__", "__float__")}
    with SyncCounter(torch.device("cpu")) as sc:
        float(t)
        bool(t > 0)
        t.item()
        t.tolist()
        _ = t + 1  # no conversion
    assert sc.count == 4
    assert sc.by_method == {"__float__": 1, "__bool__": 1, "item": 1, "tolist": 1}
    assert {name: torch.Tensor.__dict__.get(name) for name in before} == before
    with SyncCounter(torch.device("cpu")) as sc2:
        pass
    assert sc2.count == 0
