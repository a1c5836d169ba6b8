"""summarize.py: tables with mean ± std over seeds beside the paper's numbers, the claimed ratios, and plots,
from a small hand-written CSV whose answers are known."""

from __future__ import annotations

import pytest

from paper_repro import summarize
from paper_repro.paper_reference import reference
from paper_repro.results import EPOCH_COLUMNS, RESULT_COLUMNS, append_row


def write_runs(folder):
    # vanilla continuous: 2 seeds, step time 0.4 / 0.6 (mean 0.5, std 0.1414), test NFE 18 / 20;
    # skip continuous: step time 0.2, NFE 4; neural ODE: backward 1.0 vs vanilla's 0.25.
    base = dict(
        experiment="mnist",
        arch="dense",
        jac_reg=False,
        device="cpu",
        parameters=100,
        protocol="paper",
        requested_epochs=25,
        requested_max_steps=-1,
    )
    tsit5 = dict(solver="continuous", ode_solver="tsit5")
    specs = [
        dict(
            model_type="vanilla",
            **tsit5,
            seed=1,
            test_accuracy=0.97,
            train_time_per_step_s=0.4,
            backward_time_s=0.2,
            prediction_time_s=0.1,
            test_nfe=18,
            test_reference_nfe=21,
        ),
        dict(
            model_type="vanilla",
            **tsit5,
            seed=2,
            test_accuracy=0.99,
            train_time_per_step_s=0.6,
            backward_time_s=0.3,
            prediction_time_s=0.1,
            test_nfe=20,
            test_reference_nfe=23,
        ),
        dict(
            model_type="skip",
            **tsit5,
            seed=1,
            test_accuracy=0.98,
            explicit_accuracy=0.9,
            train_time_per_step_s=0.2,
            backward_time_s=0.1,
            prediction_time_s=0.05,
            test_nfe=4,
        ),
        dict(
            model_type="neural_ode",
            **tsit5,
            seed=1,
            test_accuracy=0.96,
            train_time_per_step_s=1.5,
            backward_time_s=1.0,
            prediction_time_s=0.2,
            test_nfe=30,
        ),
        dict(
            model_type="vanilla",
            solver="discrete",
            seed=1,
            test_accuracy=0.97,
            train_time_per_step_s=0.25,
            backward_time_s=0.25,
            prediction_time_s=0.05,
            test_nfe=9,
        ),
        dict(
            model_type="vanilla",
            solver="continuous",
            ode_solver="vcab3",
            seed=1,
            test_accuracy=0.97,
            train_time_per_step_s=0.3,
            prediction_time_s=0.05,
            test_nfe=9,
        ),
        # a 5-epoch v1-protocol run: its own table, never averaged with the paper protocol's 25 epochs
        dict(
            model_type="vanilla",
            solver="continuous",
            ode_solver="",
            protocol="",
            requested_epochs=5,
            seed=3,
            test_accuracy=0.5,
            test_nfe=76,
        ),
    ]
    for s in specs:
        append_row(folder / "mnist.csv", {**base, **s}, RESULT_COLUMNS)
    for seed in (1, 2):
        for epoch, acc, nfe in ((0, 0.9, 12.0), (1, 0.95, 15.0)):
            append_row(
                folder / "mnist_epochs.csv",
                dict(
                    experiment="mnist",
                    arch="dense",
                    model_type="vanilla",
                    solver="continuous",
                    jac_reg=False,
                    seed=seed,
                    stage="train",
                    epoch=epoch,
                    step=10 * (epoch + 1),
                    eval_accuracy=acc,
                    eval_nfe=nfe,
                    protocol="paper",
                    ode_solver="tsit5",
                ),
                EPOCH_COLUMNS,
            )


def test_tables_ratios_and_plots(tmp_path):
    results, out = tmp_path / "results", tmp_path / "out"
    write_runs(results)
    written = summarize.main(["--results-dir", str(results), "--out", str(out)])
    assert {p.name for p in written} == {
        "summary.md",
        "mnist_dense_paper_figure1.png",
        "mnist_dense_paper_epochs.png",
        "mnist_dense_v1_figure1.png",
    }
    for p in written[1:]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    md = (out / "summary.md").read_text()
    assert "## mnist dense: paper protocol, 25 epochs" in md and "## mnist dense: v1 protocol, 5 epochs" in md
    paper_part, v1_part = md.split("## mnist dense: v1 protocol, 5 epochs")
    assert "| vanilla | continuous/tsit5 | 1 | 50.00 |" in v1_part
    lines = paper_part.splitlines()
    [vanilla_c] = [row for row in lines if row.startswith("| vanilla | continuous/tsit5 |")]
    cells = [c.strip() for c in vanilla_c.strip("|").split("|")]
    assert cells[2] == "2"  # two seeds (the v1 row is not among them)
    assert cells[3] == "98.00 ± 1.41"  # accuracy % mean ± sample std
    assert cells[4] == "97.93"  # the paper's number beside ours
    assert (
        cells[6] == "19.0 ± 1.4" and cells[7] == "22.0 ± 1.4" and cells[8] == "18.3"
    )  # ours, in the paper's count, the paper's
    assert cells[12] == "0.5000 ± 0.1414"  # train s/step
    [discrete] = [row for row in lines if row.startswith("| vanilla | discrete |")]
    assert discrete.split("|")[9].strip() == "18.3"  # the paper's MNIST NFE came from L-Broyden runs
    # vanilla / skip continuous: step time 0.5 / 0.2 = 2.5, NFE 19 / 4 = 4.75 (paper 18.3 / 4.0 = 4.575)
    assert "| vanilla / skip (continuous/tsit5) | train_time_per_step_s | 2.50 | - |" in md
    assert "| vanilla / skip (continuous/tsit5) | test_nfe | 4.75 | 4.58 |" in md
    assert "| neural_ode / vanilla continuous/tsit5 | backward_time_s | 4.00 | - |" in md  # 1.0 / 0.25
    assert "| continuous/tsit5 / discrete (vanilla) | train_time_per_step_s | 2.00 | - |" in md  # 0.5 / 0.25
    assert "| vcab3 / tsit5 (vanilla) | test_nfe | 0.47 | - |" in md  # 9 / 19; the paper has one row for both
    assert "| continuous/tsit5 / discrete (vanilla) | test_nfe | 2.11 | - |" in md
    assert "4.7-6.182x" in md  # the headline claims are listed


def test_no_csv_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no run CSVs"):
        summarize.main(["--results-dir", str(tmp_path), "--out", str(tmp_path / "out")])


def test_paper_reference_matches_the_transcribed_tables():
    assert reference("cifar10", "small", "vanilla", "discrete")["accuracy"] == 81.23
    assert reference("cifar10", "large", "neural_ode", "continuous")["backward_time_s"] == 4.569
    assert reference("mnist", "dense", "skip_reg", "continuous", True) == dict(
        accuracy=98.02, test_nfe=4.0, train_minutes=5.13
    )
    assert reference("imagenet", "small", "neural_ode", "continuous") is None  # not trained in the paper


def test_runs_of_grids_run_apart_merge_once(tmp_path):
    from paper_repro.results import EPOCH_COLUMNS, RESULT_COLUMNS, append_row, merge_results, read_rows

    a, b, dest = tmp_path / "a", tmp_path / "b", tmp_path / "dest"
    base = dict(experiment="mnist", arch="dense", jac_reg=False, protocol="paper", requested_epochs=25)
    for folder, model_type in ((a, "vanilla"), (b, "skip"), (dest, "vanilla")):
        row = {**base, "model_type": model_type, "solver": "discrete", "seed": 1, "test_accuracy": 0.9}
        append_row(folder / "mnist.csv", row, RESULT_COLUMNS)
        ident = {k: v for k, v in base.items() if k != "requested_epochs"}
        append_row(
            folder / "mnist_epochs.csv",
            {**ident, "model_type": model_type, "solver": "discrete", "seed": 1, "stage": "test", "eval_accuracy": 0.9},
            EPOCH_COLUMNS,
        )
    assert merge_results([a, b], dest, "mnist") == 1  # vanilla was there already; skip is new
    assert sorted(r["model_type"] for r in read_rows(dest / "mnist.csv")) == ["skip", "vanilla"]
    assert sorted(r["model_type"] for r in read_rows(dest / "mnist_epochs.csv")) == ["skip", "vanilla"]
    assert merge_results([a, b], dest, "mnist") == 0  # idempotent


def test_the_committed_record_is_never_overwritten_by_default(tmp_path):
    # the committed summary is tracked by git: refused unless asked for explicitly
    from paper_repro.results import REPO

    results = tmp_path / "results"
    write_runs(results)
    with pytest.raises(SystemExit, match="tracked by git: paper_repro/results/summary.md.*--overwrite-tracked"):
        summarize.main(["--results-dir", str(results), "--out", str(REPO / "paper_repro" / "results")])
    assert (REPO / "paper_repro" / "results" / "summary.md").read_text().startswith("# Paper reproduction")
    # the default goes under runs/, which git ignores
    assert summarize.build_parser().get_default("out") == REPO / "runs" / "paper_repro" / "summary"
