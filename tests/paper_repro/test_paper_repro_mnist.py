"""paper_repro/mnist.py end to end on tiny generated MNIST files (the real IDX format), on the CPU."""

from __future__ import annotations

import csv

import pytest

from conftest import out_args

from paper_repro import mnist
from paper_repro.results import RESULT_COLUMNS, append_row
from paper_repro.run import main


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(argv):
    return main(mnist.SPEC, argv)


def test_a_few_steps_write_one_row_with_every_column_and_tensorboard_events(mnist_dir, tmp_path, capsys):
    out = run(
        [
            "--arch",
            "dense",
            "--model-type",
            "skip",
            "--solver",
            "continuous",
            "--max-steps",
            "3",
            "--batch-size",
            "8",
            "--train-subset",
            "32",
            "--test-subset",
            "16",
            "--data-dir",
            str(mnist_dir),
            *out_args(tmp_path),
            "--log-every",
            "1",
        ]
    )
    assert len(out) == 1
    [row] = rows(tmp_path / "results" / "mnist.csv")
    assert (row["experiment"], row["arch"], row["model_type"], row["solver"], row["jac_reg"]) == (
        "mnist",
        "dense",
        "skip",
        "continuous",
        "False",
    )
    assert row["steps"] == "3" and float(row["epochs"]) == pytest.approx(3 / 4)  # 32 samples / batch 8
    assert row["train_samples"] == "32" and row["test_samples"] == "16"
    for name in (
        "test_accuracy",
        "explicit_accuracy",
        "train_time_per_step_s",
        "train_time_per_epoch_s",
        "forward_time_s",
        "backward_time_s",
        "prediction_time_s",
        "train_nfe",
        "test_nfe",
        "backward_nfe",
        "parameters",
        "torch_version",
        "lightning_version",
        "deqlab_version",
    ):
        assert row[name] != "", f"{name} is empty"
    assert 0.0 <= float(row["test_accuracy"]) <= 1.0
    assert float(row["test_nfe"]) >= 1 and float(row["backward_nfe"]) >= 1
    assert row["device"].startswith("cpu") and row["num_processes"] == "1"
    assert list((tmp_path / "tb").rglob("events.out.tfevents*")), "no TensorBoard events written"
    for yaml in (tmp_path / "tb").rglob("hparams.yaml"):  # hyperparameters, not the network's weights
        assert yaml.stat().st_size < 20_000 and "network:" not in yaml.read_text()
    printed = capsys.readouterr().out
    assert "step 3/3" in printed and "eta" in printed and "parameters" in printed
    epochs = rows(tmp_path / "results" / "mnist_epochs.csv")
    assert [e["stage"] for e in epochs] == ["train", "test"]  # a partial epoch, then the final test
    assert epochs[-1]["eval_accuracy"] == row["test_accuracy"]


def test_epochs_validate_on_the_test_set_every_epoch(mnist_dir, tmp_path):
    run(
        [
            "--arch",
            "dense",
            "--model-type",
            "vanilla",
            "--solver",
            "discrete",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--train-subset",
            "32",
            "--test-subset",
            "16",
            "--data-dir",
            str(mnist_dir),
            *out_args(tmp_path),
        ]
    )
    [row] = rows(tmp_path / "results" / "mnist.csv")
    assert row["steps"] == "4" and float(row["epochs"]) == 2.0 and row["epoch_time_measured"] == "True"
    assert row["explicit_accuracy"] == ""  # vanilla: u0 = 0 predicts nothing
    epochs = rows(tmp_path / "results" / "mnist_epochs.csv")
    train = [e for e in epochs if e["stage"] == "train"]
    assert [e["epoch"] for e in train] == ["0", "1"] and [e["step"] for e in train] == ["2", "4"]
    assert all(e["eval_accuracy"] != "" and e["eval_nfe"] != "" for e in train)


def test_grid_writes_one_row_per_run_and_skips_finished_runs(mnist_dir, tmp_path, capsys):
    base = [
        "--arch",
        "dense",
        "--grid",
        "--seeds",
        "7",
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
    run(base + ["--model-types", "vanilla,neural_ode"])
    first = rows(tmp_path / "results" / "mnist.csv")
    # vanilla x (continuous, discrete) and the neural ODE once (it has no steady-state solver to vary)
    assert sorted((r["model_type"], r["solver"]) for r in first) == [
        ("neural_ode", "continuous"),
        ("vanilla", "continuous"),
        ("vanilla", "discrete"),
    ]
    assert {r["seed"] for r in first} == {"7"}
    capsys.readouterr()
    again = run(base + ["--model-types", "vanilla,skip", "--solvers", "discrete"])
    assert [(r["model_type"], r["solver"]) for r in again] == [("skip", "discrete")]  # vanilla was finished
    assert "already in" in capsys.readouterr().out
    assert len(rows(tmp_path / "results" / "mnist.csv")) == 4


def test_dry_run_prints_the_plan_for_four_gpus_without_any(capsys, tmp_path):
    run(["--arch", "dense", "--gpus", "4", "--dry-run", "--data-dir", str(tmp_path / "nothing-here")])
    out = capsys.readouterr().out
    assert "gpu x 4" in out and "ddp" in out and "batch per process 32" in out and "effective batch   128" in out
    assert "469 steps per epoch" in out and "11725 steps in all" in out  # 60000 / (4 * 32), 25 epochs
    assert not (tmp_path / "nothing-here").exists()


def test_missing_gpus_give_a_one_line_error(mnist_dir, tmp_path):
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    with pytest.raises(SystemExit) as err:
        run(["--gpus", "2", "--data-dir", str(mnist_dir), *out_args(tmp_path)])
    message = str(err.value)
    assert "\n" not in message and f"found {torch.cuda.device_count()}" in message and "--gpus" in message


def test_missing_data_says_where_it_looked(tmp_path):
    with pytest.raises(SystemExit, match="MNIST/raw"):
        run(["--max-steps", "1", "--data-dir", str(tmp_path / "empty"), *out_args(tmp_path)])


def test_accelerator_gpu_devices_are_checked_too_and_devices_needs_an_accelerator(tmp_path):
    import torch

    if torch.cuda.device_count() >= 8:
        pytest.skip("this machine has the GPUs")
    with pytest.raises(SystemExit, match="asked for 8 GPUs but found"):
        run(["--accelerator", "gpu", "--devices", "8", *out_args(tmp_path)])
    with pytest.raises(SystemExit, match="--devices needs --accelerator"):
        run(["--devices", "2", *out_args(tmp_path)])


def test_rows_carry_the_protocol_the_integrator_and_the_papers_nfe_count(mnist_dir, tmp_path):
    run(
        [
            "--arch",
            "dense",
            "--grid",
            "--seeds",
            "7",
            "--model-types",
            "skip",
            "--solvers",
            "continuous",
            "--ode-solvers",
            "tsit5",
            "--max-steps",
            "2",
            "--batch-size",
            "16",
            "--train-subset",
            "16",
            "--test-subset",
            "16",
            "--data-dir",
            str(mnist_dir),
            "--save-model",
            *out_args(tmp_path),
        ]
    )
    [row] = rows(tmp_path / "results" / "mnist.csv")
    assert (row["protocol"], row["solver"], row["ode_solver"]) == ("paper", "continuous", "tsit5")
    # MNIST's NFE were counted by the January-2022 code (FastDEQ): Tsit5's 6 per attempted step + 5, while
    # deqlab's own count is 2 + 6 per step: the two differ by 3 on every batch
    for ours, paper in (("train_nfe", "train_reference_nfe"), ("test_nfe", "test_reference_nfe")):
        assert float(row[paper]) == pytest.approx(float(row[ours]) + 3)
    epochs = rows(tmp_path / "results" / "mnist_epochs.csv")
    assert all(e["protocol"] == "paper" and e["eval_reference_nfe"] != "" for e in epochs)
    [saved] = (tmp_path / "results" / "models").glob("*.pt")
    import torch

    payload = torch.load(saved, weights_only=False)
    assert payload["model_type"] == "skip" and payload["ode_solver"] == "tsit5" and payload["state_dict"]


def test_the_v1_protocol_builds_the_2022_codes_semantics(capsys):
    run(["--arch", "dense", "--protocol", "v1", "--model-type", "vanilla", "--solver", "discrete", "--dry-run"])
    out = capsys.readouterr().out
    assert "v1 protocol (the January-2022 reference code)" in out and "raw [0, 1] pixels" in out
    assert "'reapply_map': True" in out and "skip weight 5.0" in out  # λ·mean|z*| on vanilla
    run(["--arch", "dense", "--model-type", "vanilla", "--solver", "discrete", "--dry-run"])
    out = capsys.readouterr().out
    assert "paper protocol (the paper's stated protocol)" in out and "adam lr 0.001 wd 0.0, constant rate" in out
    assert "normalized" in out and "skip weight 0.0" in out


def test_an_old_results_table_gains_the_new_columns_without_shifting_rows(tmp_path):
    path = tmp_path / "mnist.csv"
    old_columns = [c for c in RESULT_COLUMNS if c not in ("protocol", "ode_solver", "test_reference_nfe")]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_columns)
        w.writeheader()
        w.writerow({c: ("old" if c == "model_type" else "1") for c in old_columns})
    append_row(path, {"model_type": "new", "protocol": "paper", "test_reference_nfe": 4.5}, RESULT_COLUMNS)
    old, new = rows(path)
    assert old["model_type"] == "old" and old["protocol"] == "" and old["test_nfe"] == "1"
    assert new["model_type"] == "new" and new["protocol"] == "paper" and new["test_reference_nfe"] == "4.5"
    with open(path, "w", newline="") as f:  # a column this version no longer writes is never dropped silently
        f.write("experiment,gone\nmnist,1\n")
    with pytest.raises(KeyError, match="gone"):
        append_row(path, {"experiment": "mnist"}, RESULT_COLUMNS)
