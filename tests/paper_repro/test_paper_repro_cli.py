"""The package's shape and its command line: typed flags, ``--list-grid`` / ``--grid-cell``, the names read
from deqlab.models, Lightning kept out of the planning paths, no class built inside a function."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from conftest import REPO

from paper_repro import cli, mnist, plan
from paper_repro.results import RESULT_COLUMNS, latest_per_key, load_results, write_row
from paper_repro.run import main


def test_the_choices_are_the_librarys():
    from deqlab.models import MODEL_TYPES, PROTOCOLS, SOLVER_KINDS
    from deqlab.models._build import ODE_SOLVERS
    from deqlab.models.settings import SEEDS

    assert cli.MODEL_TYPES is MODEL_TYPES and cli.SOLVERS is SOLVER_KINDS and cli.PROTOCOLS is PROTOCOLS
    assert cli.ODE_SOLVERS is ODE_SOLVERS and cli.PAPER_SEEDS is SEEDS


def test_typed_flags_reach_build_model_and_the_training_settings_and_the_plan(capsys):
    argv = [
        "--arch",
        "dense",
        "--tol",
        "1e-3",
        "--max-solver-steps",
        "30",
        "--backward-steps",
        "7",
        "--skip-weight",
        "0.5",
        "--dry-run",
    ]
    args = cli.parse_args(mnist.SPEC, argv)
    cfg = plan.make_config(mnist.SPEC, args, "skip", "discrete", None)
    assert cfg.model_options == {"tol": 1e-3, "max_steps": 30, "backward_max_steps": 7}
    assert cfg.training["skip_loss_weight"] == 0.5
    main(mnist.SPEC, argv)  # builds the network with those keywords: an unknown one would raise
    out = capsys.readouterr().out
    assert "skip weight 0.5" in out and "'max_steps': 30" in out
    assert "tol=0.001 (--tol)" in out and "max_steps=30 (--max-solver-steps)" in out
    assert "backward_max_steps=7 (--backward-steps)" in out and "skip_loss_weight=0.5 (--skip-weight)" in out


@pytest.mark.parametrize(
    "typed, generic",
    [
        (["--tol", "1e-3"], ["--model-option", "tol=1e-2"]),
        (["--max-solver-steps", "30"], ["--model-option", "max_steps=20"]),
        (["--backward-steps", "5"], ["--model-option", "backward_max_steps=5"]),
        (["--skip-weight", "1"], ["--override", "skip_loss_weight=2"]),
    ],
)
def test_a_typed_flag_and_the_same_key_given_untyped_stop_with_one_line(typed, generic):
    with pytest.raises(SystemExit) as err:
        main(mnist.SPEC, [*typed, *generic, "--dry-run"])
    message = str(err.value)
    assert "\n" not in message and typed[0] in message and generic[0] in message and "give one" in message


@pytest.mark.parametrize(
    "argv", [["--tol", "0"], ["--max-solver-steps", "0"], ["--skip-weight", "-1"], ["--grid-cell", "-1"]]
)
def test_typed_flags_out_of_range_are_refused(argv):
    with pytest.raises(SystemExit, match="must be"):
        main(mnist.SPEC, [*argv, "--dry-run"])


GRID = ["--arch", "dense", "--seeds", "1,2", "--model-types", "vanilla,neural_ode", "--ode-solvers", "tsit5"]


def test_list_grid_prints_one_indexed_cell_per_line_in_the_grids_order(capsys, tmp_path):
    out_dir = ["--results-dir", str(tmp_path)]
    main(mnist.SPEC, GRID + ["--grid", "--dry-run"] + out_dir)
    plans = [line[len("plan: ") :] for line in capsys.readouterr().out.splitlines() if line.startswith("plan: ")]
    assert main(mnist.SPEC, GRID + ["--list-grid"] + out_dir) == []
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [line.split("\t") for line in lines] == [[str(i), label] for i, label in enumerate(plans)]
    assert len(lines) == 6 and "--array=0-5" in captured.err


def test_grid_cell_plans_exactly_that_cell(capsys):
    main(mnist.SPEC, GRID + ["--grid-cell", "4", "--dry-run"])
    out = capsys.readouterr().out
    assert "plan: mnist/dense vanilla discrete seed 2 (paper protocol)" in out and "dry run: 1 run(s)" in out
    with pytest.raises(SystemExit, match="the grid has 6 cell"):
        main(mnist.SPEC, GRID + ["--grid-cell", "6", "--dry-run"])


def test_help_dry_run_and_list_grid_never_import_lightning(tmp_path):
    code = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from paper_repro import mnist
from paper_repro.run import main
try:
    main(mnist.SPEC, ["--help"])
except SystemExit:
    pass
main(mnist.SPEC, ["--list-grid", "--seeds", "1", "--results-dir", {str(tmp_path)!r}])
main(mnist.SPEC, ["--grid-cell", "0", "--seeds", "1", "--dry-run"])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("pytorch_lightning", "lightning"))
assert not loaded, loaded
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--tol" in proc.stdout and "0\tmnist/dense" in proc.stdout and "dry run: 1 run(s)" in proc.stdout


def test_no_class_is_defined_inside_a_function():
    nested = []
    for path in sorted((REPO / "paper_repro").glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                nested += [f"{path.name}:{c.lineno} {c.name}" for c in ast.walk(fn) if isinstance(c, ast.ClassDef)]
    assert not nested


def test_one_row_per_run_key_the_one_finished_last(tmp_path):
    base = dict(experiment="mnist", arch="dense", model_type="skip", solver="discrete", seed=1)
    rows = [
        dict(base, test_accuracy="0.1", finished_at="2024-01-01T00:00:00Z"),
        dict(base, seed=2, test_accuracy="0.2", finished_at="2024-01-01T00:00:00Z"),
        dict(base, test_accuracy="0.3", finished_at="2024-01-02T00:00:00Z"),
    ]
    assert [r["test_accuracy"] for r in latest_per_key(rows)] == ["0.3", "0.2"]
    # a cell file and the shared table holding the same run: read once, the later one
    write_row(tmp_path / "cells" / "mnist" / "a.csv", rows[2], RESULT_COLUMNS)
    write_row(tmp_path / "mnist.csv", rows[0], RESULT_COLUMNS)
    runs, epochs = load_results(tmp_path)
    assert [r["test_accuracy"] for r in runs] == ["0.3"] and epochs == []
    assert not list(tmp_path.rglob("*.tmp"))  # the atomic write left no temporary file


def test_help_shows_each_default_once_and_the_papers_values(capsys):
    from paper_repro import cifar10, mnist
    from paper_repro.cli import build_parser

    text = build_parser(mnist.SPEC).format_help()
    assert "(default: None)" not in text and "(default: [])" not in text and "(default: False)" not in text
    flat = " ".join(text.split())
    assert "training epochs (default: the paper's: dense 25, conv 25)" in flat
    assert "(default: the paper's: dense 0.005, conv 0.01)" in flat  # --tol, from each architecture's config
    assert "random seed (default: the paper's first, 6171)" in flat
    assert "(default: the paper's: small 20000, large 90000, v1 -)" in " ".join(
        build_parser(cifar10.SPEC).format_help().split()
    )
