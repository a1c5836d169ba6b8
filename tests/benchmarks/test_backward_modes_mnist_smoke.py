"""Smoke test of ``benchmarks/backward_modes_mnist.py``: a quick run on MNIST written in the real IDX format
trains the dense model under every backward mode and writes one table row per mode (accuracy, NFE, step
time, memory), the reversible rows with the reversible solver's NFE (1 + 2 × steps), and the
memory-against-steps table in which reversible's backward peak does not grow with its steps."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("_data_writers", ROOT / "tests" / "data" / "conftest.py")
writers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(writers)  # type: ignore[union-attr]


def _cells(line: str) -> list:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _kib(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"B": 1 / 1024, "KiB": 1, "MiB": 1024, "GiB": 1024**2}[unit]


def test_quick_run_reports_every_mode_on_idx_mnist(tmp_path):
    labels = (np.arange(32) % 10).astype(np.uint8)
    writers.write_mnist(
        tmp_path, writers.random_images(32, (28, 28), 1), labels, writers.random_images(16, (28, 28), 2), labels[:16]
    )
    results = tmp_path / "RESULTS.md"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "backward_modes_mnist.py"),
            "--quick",
            "--data-dir",
            str(tmp_path),
            "--models",
            "dense",
            "--dense-steps",
            "2",
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
    assert "<!-- backward-modes-mnist:start -->" in text
    assert "the first 16 MNIST train images" in text  # the IDX files were read, not the noise fallback
    lines = [_cells(line) for line in text.splitlines() if line.startswith("|")]
    header = next(c for c in lines if c[0] == "mode")
    rows = {c[0]: dict(zip(header, c)) for c in lines if c[0] in ("implicit", "phantom", "neumann", "reversible")}
    assert list(rows) == ["implicit", "phantom", "neumann", "reversible"]
    for r in rows.values():
        assert r["test acc"].endswith("%") and float(r["fwd NFE"]) >= 1 and float(r["bwd NFE"]) >= 1
        assert r["fwd+bwd peak"] != "n/a" and r["saved fwd→bwd"] != "n/a"
    assert float(rows["phantom"]["bwd NFE"]) == 5
    assert 3 <= float(rows["reversible"]["fwd NFE"]) <= 13  # 1 + 2 x steps, max_steps 6
    scaling = {c[0]: c for c in lines if c[0].startswith(("phantom, ", "reversible, "))}
    assert list(scaling) == ["phantom, 5 steps", "phantom, 20 steps", "reversible, 6 steps", "reversible, 24 steps"]
    assert _kib(scaling["reversible, 24 steps"][3]) <= 1.05 * _kib(scaling["reversible, 6 steps"][3])


def test_a_run_on_noise_does_not_replace_the_committed_figures(tmp_path):
    # `make bench` on a machine without MNIST falls back to seeded noise: RESULTS.md keeps its real figures
    results = tmp_path / "RESULTS.md"
    results.write_text("measured on real MNIST\n", encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [sys.executable, str(ROOT / "benchmarks" / "backward_modes_mnist.py"), "--quick", "--data-dir",
            str(tmp_path / "empty"), "--models", "dense", "--modes", "implicit", "--dense-steps", "1", "--write",
            "--results", str(results)]  # fmt: skip
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not writing RESULTS.md: MNIST was not found" in proc.stdout
    assert results.read_text(encoding="utf-8") == "measured on real MNIST\n"


def test_batch_norm_statistics_are_recalibrated_before_testing():
    # A short run leaves BatchNorm's running statistics near their initial values (mean 0, variance 1): the
    # conv model then tested at chance in eval mode while its train-mode accuracy was 64 %. The benchmark
    # recomputes them over training batches, after which eval mode normalises like train mode did.
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("_bm_backward", ROOT / "benchmarks" / "backward_modes_mnist.py")
        bm = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = bm  # its dataclasses look their module up
        spec.loader.exec_module(bm)  # type: ignore[union-attr]
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    batch = 0.01 * torch.randn(64, 4) + 3.0  # far from the initial running mean 0 / variance 1
    with torch.no_grad():
        expected = net.train()(batch)
        stale = net.eval()(batch)
    assert not torch.allclose(stale, expected, atol=1e-2)
    assert bm.recalibrate_batch_norm(net, [batch]) == 1
    with torch.no_grad():
        recalibrated = net.eval()(batch)
    assert not net.training
    # eval uses the unbiased variance where train mode used the biased one: a factor (n-1)/n on the variance
    torch.testing.assert_close(recalibrated, expected, atol=2e-2, rtol=2e-2)
    assert bm.recalibrate_batch_norm(nn.Sequential(nn.Linear(2, 2)), [torch.zeros(1, 2)]) == 0
