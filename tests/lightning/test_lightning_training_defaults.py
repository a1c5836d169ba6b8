"""A model's training defaults are written once (``default_training``) and a partial ``training`` block
changes only what it names, whether it comes from a YAML config, the command line or Python."""

from __future__ import annotations

import pytest
import yaml

from lightning_testkit import REPO

from deqlab.lightning import DEQLightningModule
from deqlab.lightning.cli import DEQLightningCLI
from deqlab.spec import DEQTrainingConfig
from deqlab.zoo import DIGITS_TRAINING, MNIST_TRAINING, DigitsDEQ, MNISTDenseDEQ

# The zoo models' documented defaults, written out here as the oracle (not read from the code under test).
DIGITS = dict(optimizer="adamw", lr=3e-3, weight_decay=1e-5, scheduler="cosine", eta_min=1e-6, skip_loss_weight=1.0)
# MNIST dense: the protocol the paper's text states (Adam at a constant 1e-3, λ_skip 0.01)
MNIST = dict(
    optimizer="adam",
    lr=1e-3,
    betas=(0.9, 0.999),
    weight_decay=0.0,
    scheduler="none",
    skip_loss_weight=0.01,
    jacobian_loss_weight=0.0,
)


def _cli(tmp_path, model: dict):
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {"model": model, "data": {"class_path": "deqlab.data.DigitsDataModule"}, "trainer": {"logger": False}}
        )
    )
    return DEQLightningCLI(args=["--config", str(config)], run=False, seed_everything_default=False)


@pytest.mark.parametrize("cls, width, expected", [("DigitsDEQ", {"width": 8}, DIGITS), ("MNISTDenseDEQ", {}, MNIST)])
def test_a_partial_yaml_training_block_keeps_the_model_defaults(tmp_path, cls, width, expected):
    cli = _cli(tmp_path, {"class_path": f"deqlab.zoo.{cls}", "init_args": {**width, "training": {"lr": 0.01}}})
    assert cli.model.deq_config == DEQTrainingConfig(**{**expected, "lr": 0.01})
    assert cli.model.deq_config.weight_decay == expected["weight_decay"]


def test_the_command_line_and_python_give_the_same_settings_as_the_yaml_block(tmp_path):
    yaml_cfg = _cli(
        tmp_path, {"class_path": "deqlab.zoo.DigitsDEQ", "init_args": {"width": 8, "training": {"lr": 0.01}}}
    ).model.deq_config
    cmdline = DEQLightningCLI(
        run=False,
        seed_everything_default=False,
        args=[
            "--model=deqlab.zoo.DigitsDEQ",
            "--model.width=8",
            "--model.training.lr=0.01",
            "--data=deqlab.data.DigitsDataModule",
            "--trainer.logger=false",
        ],
    ).model.deq_config
    mapping = DigitsDEQ(width=8, training={"lr": 0.01}).deq_config
    flat = DigitsDEQ(width=8, lr=0.01).deq_config
    assert yaml_cfg == cmdline == mapping == flat == DEQTrainingConfig(**{**DIGITS, "lr": 0.01})


def test_a_complete_config_object_is_used_as_given():
    # an object has every field, so it replaces the defaults; a mapping names only what it changes
    model = DigitsDEQ(width=8, training=DEQTrainingConfig(lr=0.01))
    assert model.deq_config.weight_decay == 0.0 and model.deq_config.lr == 0.01


def test_a_partial_block_rebuilds_the_same_model_from_its_hparams():
    model = MNISTDenseDEQ(model_type="vanilla", training={"lr": 0.02, "eta_min": 0.0})
    assert dict(model.hparams)["training"] == {"lr": 0.02, "eta_min": 0.0}  # stored as given: partial
    assert MNISTDenseDEQ(**model.hparams).deq_config == model.deq_config
    assert model.deq_config == DEQTrainingConfig(**{**MNIST, "lr": 0.02, "eta_min": 0.0, "skip_loss_weight": 0.0})


def test_a_misspelt_or_mistyped_key_of_a_partial_block_raises():
    with pytest.raises(TypeError, match="'lrate'"):
        DigitsDEQ(width=8, training={"lrate": 0.1})
    with pytest.raises(TypeError, match="training must be"):
        DigitsDEQ(width=8, training=[("lr", 0.1)])


def test_each_model_states_its_defaults_once_and_the_constants_are_them():
    assert DigitsDEQ.default_training is DIGITS_TRAINING and MNISTDenseDEQ.default_training is MNIST_TRAINING
    assert DEQLightningModule.default_training == DEQTrainingConfig()
    assert DigitsDEQ(width=8).deq_config == DEQTrainingConfig(**DIGITS)
    assert MNISTDenseDEQ().deq_config == DEQTrainingConfig(**MNIST)


def test_a_subclass_default_training_is_applied_under_a_partial_block():
    class Tuned(DEQLightningModule):
        default_training = DEQTrainingConfig(lr=0.5, weight_decay=0.25, scheduler="none")

        def __init__(self, **kwargs):
            super().__init__(**kwargs)

    cfg = Tuned(training={"weight_decay": 0.125}).deq_config
    assert (cfg.lr, cfg.weight_decay, cfg.scheduler) == (0.5, 0.125, "none")


@pytest.mark.parametrize("name, cls", [("digits", DigitsDEQ), ("mnist_dense", MNISTDenseDEQ)])
def test_the_experiment_configs_restate_their_models_defaults(name, cls):
    # experiments/*.yaml say their training blocks are the model's defaults ("unset fields keep ...");
    # the run they configure is the model built in Python with the same model arguments
    path = REPO / "experiments" / f"{name}.yaml"
    init = yaml.safe_load(path.read_text())["model"]["init_args"]
    cli = DEQLightningCLI(args=["--config", str(path), "--trainer.logger=false"], run=False)
    python = cls(**{k: v for k, v in init.items() if k in ("model_type", "width", "jacobian_regularization")})
    assert cli.model.deq_config == python.deq_config
    # the block is partial: an empty block changes nothing
    assert (
        cls(**{k: v for k, v in init.items() if k in ("model_type", "width")}, training={}).deq_config
        == python.deq_config
    )
