"""Grid cells run at the same time as separate processes (what a SLURM job array does) each record their own
row; ``summarize.py`` and ``--grid`` see them all; a finished cell run again is skipped."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO, out_args

from paper_repro import mnist, summarize
from paper_repro.results import ResultFiles, load_results
from paper_repro.run import main

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


def test_two_cells_at_once_write_two_rows_that_summarize_merges(mnist_dir, tmp_path, capsys):
    grid = [
        "--arch",
        "dense",
        "--seeds",
        "7",
        "--model-types",
        "vanilla,skip",
        "--solvers",
        "discrete",
        "--max-steps",
        "1",
        "--batch-size",
        "16",
        "--train-subset",
        "16",
        "--test-subset",
        "16",
        "--data-dir",
        str(mnist_dir),
        *out_args(tmp_path),
    ]
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    env.update(
        OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "paper_repro" / "mnist.py"), *grid, "--grid-cell", str(i)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, f"cell failed:\n{out[-3000:]}\n{err[-3000:]}"

    files = ResultFiles(tmp_path / "results", "mnist")
    assert not files.runs_csv.exists() and not files.epochs_csv.exists()  # cells never touch the shared tables
    cell_rows = sorted(p.name for p in files.cells_dir.glob("*.csv") if not p.stem.endswith("_epochs"))
    assert len(cell_rows) == 2 and len(list(files.cells_dir.glob("*_epochs.csv"))) == 2
    runs, epochs = load_results(tmp_path / "results")
    assert sorted(r["model_type"] for r in runs) == ["skip", "vanilla"]
    assert {e["stage"] for e in epochs} == {"train", "test"}

    summary = tmp_path / "summary"
    summarize.main(["--results-dir", str(tmp_path / "results"), "--out", str(summary)])
    md = (summary / "summary.md").read_text()
    assert "| vanilla | discrete | 1 |" in md and "| skip | discrete | 1 |" in md

    capsys.readouterr()
    assert main(mnist.SPEC, grid + ["--grid-cell", "1"]) == []  # finished: skipped, not run again
    assert "already in" in capsys.readouterr().out
    assert main(mnist.SPEC, grid + ["--grid"]) == []  # the sequential grid resumes from the cells' rows too
    main(mnist.SPEC, grid + ["--list-grid"])
    assert [line.split("\t")[-1] for line in capsys.readouterr().out.splitlines()[-2:]] == ["done", "done"]
