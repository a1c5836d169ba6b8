"""summarize.py: tables with mean ± std over seeds beside the paper's numbers, the claimed ratios, and plots,
from a small hand-written CSV whose answers are known."""
from __future__ import annotations

import pytest

from paper_repro import common, summarize
from paper_repro.paper_reference import reference


def write_runs(folder):
    # vanilla continuous: 2 seeds, step time 0.4 / 0.6 (mean 0.5, std 0.1414), test NFE 18 / 20;
    # skip continuous: step time 0.2, NFE 4; neural ODE: backward 1.0 vs vanilla's 0.25.
    base = dict(experiment="mnist", arch="dense", jac_reg=False, device="cpu", parameters=100)
    specs = [
        dict(model_type="vanilla", solver="continuous", seed=1, test_accuracy=0.97, train_time_per_step_s=0.4,
             backward_time_s=0.2, prediction_time_s=0.1, test_nfe=18),
        dict(model_type="vanilla", solver="continuous", seed=2, test_accuracy=0.99, train_time_per_step_s=0.6,
             backward_time_s=0.3, prediction_time_s=0.1, test_nfe=20),
        dict(model_type="skip", solver="continuous", seed=1, test_accuracy=0.98, explicit_accuracy=0.9,
             train_time_per_step_s=0.2, backward_time_s=0.1, prediction_time_s=0.05, test_nfe=4),
        dict(model_type="neural_ode", solver="continuous", seed=1, test_accuracy=0.96, train_time_per_step_s=1.5,
             backward_time_s=1.0, prediction_time_s=0.2, test_nfe=30),
        dict(model_type="vanilla", solver="discrete", seed=1, test_accuracy=0.97, train_time_per_step_s=0.25,
             backward_time_s=0.25, prediction_time_s=0.05, test_nfe=9),
    ]
    for s in specs:
        common.append_row(folder / "mnist.csv", {**base, **s}, common.RESULT_COLUMNS)
    for seed in (1, 2):
        for epoch, acc, nfe in ((0, 0.9, 12.0), (1, 0.95, 15.0)):
            common.append_row(folder / "mnist_epochs.csv", dict(
                experiment="mnist", arch="dense", model_type="vanilla", solver="continuous", jac_reg=False,
                seed=seed, stage="train", epoch=epoch, step=10 * (epoch + 1), eval_accuracy=acc, eval_nfe=nfe),
                common.EPOCH_COLUMNS)


def test_tables_ratios_and_plots(tmp_path):
    results, out = tmp_path / "results", tmp_path / "out"
    write_runs(results)
    written = summarize.main(["--results-dir", str(results), "--out", str(out)])
    assert {p.name for p in written} == {"summary.md", "mnist_dense_figure1.png", "mnist_dense_epochs.png"}
    for p in written[1:]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    md = (out / "summary.md").read_text()
    lines = md.splitlines()
    [vanilla_c] = [l for l in lines if l.startswith("| vanilla | continuous |")]
    cells = [c.strip() for c in vanilla_c.strip("|").split("|")]
    assert cells[2] == "2"  # two seeds
    assert cells[3] == "98.00 ± 1.41"  # accuracy % mean ± sample std
    assert cells[4] == "97.93"  # the paper's number beside ours
    assert cells[6] == "19.0 ± 1.4" and cells[7] == "18.3"  # test NFE, ours and the paper's
    assert cells[10] == "0.5000 ± 0.1414"  # train s/step
    # vanilla / skip continuous: step time 0.5 / 0.2 = 2.5, NFE 19 / 4 = 4.75 (paper 18.3 / 4.0 = 4.575)
    assert "| vanilla / skip (continuous) | train_time_per_step_s | 2.50 | - |" in md
    assert "| vanilla / skip (continuous) | test_nfe | 4.75 | 4.58 |" in md
    assert "| neural_ode / vanilla continuous | backward_time_s | 4.00 | - |" in md  # 1.0 / 0.25
    assert "| continuous / discrete (vanilla) | train_time_per_step_s | 2.00 | - |" in md  # 0.5 / 0.25
    assert "4.7-6.182x" in md  # the headline claims are listed


def test_no_csv_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no run CSVs"):
        summarize.main(["--results-dir", str(tmp_path), "--out", str(tmp_path / "out")])


def test_paper_reference_matches_the_transcribed_tables():
    assert reference("cifar10", "small", "vanilla", "discrete")["accuracy"] == 81.23
    assert reference("cifar10", "large", "neural_ode", "continuous")["backward_time_s"] == 4.569
    assert reference("mnist", "dense", "skip_reg", "continuous", True) == dict(accuracy=98.02, test_nfe=4.0, train_minutes=5.13)
    assert reference("imagenet", "small", "neural_ode", "continuous") is None  # not trained in the paper
