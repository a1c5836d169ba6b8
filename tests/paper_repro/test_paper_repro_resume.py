"""A killed run resumes from its last epoch's checkpoint: same result as an uninterrupted run, epoch rows
once each, the whole run's timings, and no checkpoint left once the row is written."""

from __future__ import annotations

import csv
import dataclasses

import pytest

from conftest import out_args

from paper_repro import mnist
from paper_repro.cli import parse_args
from paper_repro.plan import RunConfig, planned_runs
from paper_repro.recording import RunRecorder
from paper_repro.results import EPOCH_COLUMNS, append_row, drop_unfinished_epoch_rows
from paper_repro.run import main


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Killed(RuntimeError):
    pass


def _argv(mnist_dir, tmp_path, name):
    return [
        "--arch", "dense", "--model-type", "skip", "--solver", "discrete", "--epochs", "3", "--batch-size", "16",
        "--train-subset", "32", "--test-subset", "16", "--seed", "3", "--data-dir", str(mnist_dir),
        *out_args(tmp_path / name),
    ]  # fmt: skip


def test_a_killed_run_resumes_where_its_last_epoch_ended(mnist_dir, tmp_path, monkeypatch, capsys):
    [whole] = main(mnist.SPEC, _argv(mnist_dir, tmp_path, "whole"))

    real = RunRecorder.on_train_batch_start

    def dies_in_the_third_epoch(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 5:  # epoch 2's second batch: the checkpoint of epoch 1 is on disk
            raise Killed("the job was killed")
        return real(self, trainer, pl_module, batch, batch_idx)

    monkeypatch.setattr(RunRecorder, "on_train_batch_start", dies_in_the_third_epoch)
    with pytest.raises(Killed):
        main(mnist.SPEC, _argv(mnist_dir, tmp_path, "killed"))
    results = tmp_path / "killed" / "results"
    assert not (results / "mnist.csv").exists()
    [ckpt_dir] = (results / "checkpoints").iterdir()
    assert (ckpt_dir / "last.ckpt").is_file()

    monkeypatch.setattr(RunRecorder, "on_train_batch_start", real)
    capsys.readouterr()
    [resumed] = main(mnist.SPEC, _argv(mnist_dir, tmp_path, "killed"))
    assert "resumed at epoch 2 (step 4)" in capsys.readouterr().out
    assert resumed["steps"] == whole["steps"] == 6
    # the data order, the random state and the optimizer came back with the checkpoint: the same model
    assert resumed["test_loss"] == pytest.approx(whole["test_loss"], rel=1e-6)
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    assert resumed["epoch_time_measured"] and resumed["fit_time_s"] > 0
    epochs = [e for e in rows(results / "mnist_epochs.csv") if e["stage"] == "train"]
    assert [e["epoch"] for e in epochs] == ["0", "1", "2"]
    assert not ckpt_dir.exists()  # recorded: starting again must train afresh
    # one TensorBoard folder for the run, written by both attempts
    assert len([p for p in (tmp_path / "killed" / "tb").rglob("version_*") if p.is_dir()]) == 1


def test_no_checkpoints_leaves_nothing_behind(mnist_dir, tmp_path):
    main(mnist.SPEC, [*_argv(mnist_dir, tmp_path, "plain"), "--epochs", "1", "--no-checkpoints"])
    assert not (tmp_path / "plain" / "results" / "checkpoints").exists()


def test_only_the_unfinished_attempts_rows_of_the_epochs_trained_again_are_dropped(tmp_path):
    cfg = RunConfig(**{**_cfg_fields(), "seed": 5})
    path = tmp_path / "mnist_epochs.csv"

    def row(stage, epoch, seed=5):
        base = dict.fromkeys(EPOCH_COLUMNS)
        base.update(
            experiment=cfg.experiment, arch=cfg.arch, model_type=cfg.model_type, solver=cfg.solver,
            jac_reg=cfg.jacobian_regularization, seed=seed, protocol=cfg.protocol, ode_solver=cfg.ode_solver,
            stage=stage, epoch=epoch,
        )  # fmt: skip
        return base

    # an earlier finished run of the same identity, another seed's run, then the killed attempt
    for r in (row("train", 0), row("train", 1), row("test", 1), row("train", 0, seed=6), row("train", 0),
              row("train", 1), row("train", 2)):  # fmt: skip
        append_row(path, r, EPOCH_COLUMNS)
    assert drop_unfinished_epoch_rows(path, cfg, 1) == 2
    left = [(r["stage"], r["epoch"], r["seed"]) for r in rows(path)]
    assert left == [("train", "0", "5"), ("train", "1", "5"), ("test", "1", "5"), ("train", "0", "6"),
                    ("train", "0", "5")]  # fmt: skip
    assert drop_unfinished_epoch_rows(path, cfg, 1) == 0


def _cfg_fields():
    args = parse_args(mnist.SPEC, ["--arch", "dense", "--model-type", "vanilla", "--solver", "discrete"])
    [cfg] = planned_runs(mnist.SPEC, args).cells
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def test_the_run_checkpoint_is_the_only_one_written(mnist_dir, tmp_path):
    main(mnist.SPEC, [*_argv(mnist_dir, tmp_path, "one"), "--epochs", "1"])
    assert not list((tmp_path / "one").rglob("*.ckpt"))  # the run's own is gone; none in the TensorBoard folder
