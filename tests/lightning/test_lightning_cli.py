"""The ``deqlab`` CLI: experiment configs train, and bad configs fail with jsonargparse's message."""

from __future__ import annotations

import pytest
import yaml

from lightning_testkit import REPO

from deqlab.cli import main

FAST = [
    "--trainer.max_steps=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def test_fit_then_test_with_the_digits_config(tmp_path):
    config = str(REPO / "experiments" / "digits.yaml")
    main(
        [
            "fit",
            "--config",
            config,
            *FAST,
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    run = tmp_path / "digits" / "version_0"
    assert (run / "config.yaml").exists()
    assert list(run.glob("events.out.tfevents*"))
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    main(["test", "--config", config, *FAST, f"--trainer.logger.init_args.save_dir={tmp_path}", f"--ckpt_path={ckpt}"])


def test_mnist_dense_config_parses_to_the_paper_model():
    cfg = yaml.safe_load((REPO / "experiments" / "mnist_dense.yaml").read_text())
    assert cfg["model"]["class_path"] == "deqlab.zoo.MNISTDenseDEQ"
    assert cfg["data"]["init_args"]["batch_size"] == 32 and cfg["trainer"]["max_epochs"] == 25
    from deqlab.lightning.cli import DEQLightningCLI

    cli = DEQLightningCLI(args=["--config", str(REPO / "experiments" / "mnist_dense.yaml")], run=False)
    assert type(cli.model).__name__ == "MNISTDenseDEQ"
    # the paper's stated protocol: Adam at a constant 1e-3, λ_skip 0.01
    cfg_ = cli.model.deq_config
    assert cfg_.skip_loss_weight == 0.01 and cfg_.optimizer == "adam" and cfg_.scheduler == "none"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model:\n  init_args:\n    widht: 8\n", "widht"),
        ("model:\n  init_args:\n    width: lots\n", "width"),
        ("model:\n  init_args:\n    model_type: deep\n", "model_type"),
        # the nested training settings and the data options are type-checked too
        ("model:\n  init_args:\n    training: {lr: lots}\n", "lr"),
        ("model:\n  init_args:\n    training: {lrate: 0.1}\n", "lrate"),
        ("data:\n  init_args:\n    batch_size: many\n", "batch_size"),
    ],
)
def test_bad_config_fails_naming_the_key(tmp_path, capsys, override, needle):
    bad = tmp_path / "bad.yaml"
    bad.write_text(override)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(REPO / "experiments" / "digits.yaml"), "--config", str(bad)])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert needle in err, err


@pytest.mark.parametrize("cls, lr, weight_decay", [("DigitsDEQ", 3e-3, 1e-5), ("MNISTDenseDEQ", None, 0.0)])
def test_a_zoo_model_named_on_the_command_line_keeps_its_training_defaults(cls, lr, weight_decay):
    # without a training key jsonargparse passes training=None: that failed to validate (DigitsDEQ) or would
    # silently fall back to DEQLightningModule's generic defaults
    from deqlab import zoo
    from deqlab.lightning.cli import DEQLightningCLI

    cli = DEQLightningCLI(args=[f"--model=deqlab.zoo.{cls}", "--data=deqlab.data.DigitsDataModule"], run=False)
    expected = getattr(zoo, "DIGITS_TRAINING" if cls == "DigitsDEQ" else "MNIST_TRAINING")
    assert cli.model.deq_config.weight_decay == weight_decay == expected.weight_decay
    assert cli.model.deq_config.lr == expected.lr and (lr is None or expected.lr == lr)
    tuned = DEQLightningCLI(
        args=[f"--model=deqlab.zoo.{cls}", "--model.training.lr=0.5", "--data=deqlab.data.DigitsDataModule"], run=False
    )
    assert tuned.model.deq_config.lr == 0.5 and tuned.model.deq_config.weight_decay == expected.weight_decay
    assert tuned.model.deq_config.optimizer == expected.optimizer == cli.model.deq_config.optimizer


def test_the_old_cli_alias_warns_and_names_the_console_command():
    import deqlab.cli
    import deqlab.lightning.cli as lcli

    with pytest.warns(DeprecationWarning, match=r"deqlab.lightning.cli: main is deprecated; use deqlab.cli.main"):
        assert lcli.main is deqlab.cli.main
    with pytest.raises(AttributeError, match="has no attribute 'mian'"):
        _ = lcli.mian


@pytest.mark.parametrize(
    "override, needle",
    [
        # a value the constructor rejects: one line naming the key, the class and the constructor's reason
        (
            "--model.init_args.solver.init_args.abstol_termination=-1",
            "model.init_args.solver (deqlab.solvers.discrete.DiscreteDEQSolver): ValueError: abstol_termination must be",
        ),
        ("--model.init_args.solver.init_args.algorithm=lbroydn", "did you mean 'lbroyden'?"),
        (
            "--model.init_args.training.skip_loss_weight=.nan",
            "model (deqlab.zoo.DigitsDEQ): ValueError: skip_loss_weight",
        ),
        # optimizer values are checked when the model is built, before any data is set up
        (
            "--model.init_args.training.lr=-1",
            "model (deqlab.zoo.DigitsDEQ): ValueError: lr must be a finite number >= 0",
        ),
    ],
)
def test_a_rejected_value_ends_in_one_line_naming_the_key(capsys, override, needle):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(REPO / "experiments" / "digits.yaml"), override, "--trainer.logger=false"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1], err[-5:]
    assert not any(line.startswith("Traceback") or "Given value" in line for line in err), err[-5:]
