"""Hyperparameters are the arguments of the outermost constructor call, recorded when it is made (not read
from stack frames afterwards), and they rebuild the model from a checkpoint, LightningCLI's included."""

from __future__ import annotations

import inspect
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_testkit import REPO, digits, trainer

from deqlab.lightning import DEQLightningModule, find_deq_layers
from deqlab.zoo import DenseDEQClassifier, DigitsDEQ


def _saved(model, tmp_path):
    tr = trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    tr.fit(model, digits(batch_size=32, flatten=True))
    path = tmp_path / "m.ckpt"
    tr.save_checkpoint(path)
    return path


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


class Doubled(DigitsDEQ):
    """Rebinds an argument before super().__init__: the recorded value must be the one passed."""

    def __init__(self, width: int = 8, **kwargs):
        width = 2 * width
        super().__init__(width=width, **kwargs)


def test_the_arguments_are_recorded_as_passed_not_as_the_constructor_left_its_locals(tmp_path):
    # before: the frame walk read the local `width` after the constructor had doubled it (16), and the model
    # rebuilt from the checkpoint had width 32 and could not take the weights
    model = Doubled(width=8, scheduler="none", log_figures=False)
    assert model.hparams["width"] == 8 and model.head.in_features == 16
    loaded = Doubled.load_from_checkpoint(_saved(model, tmp_path), weights_only=True)
    assert _same_weights(model, loaded)


def test_a_keyword_the_constructor_pops_before_super_is_still_recorded(tmp_path):
    # DenseDEQClassifier pops the old solver keywords from **kwargs before super().__init__: the frame walk
    # recorded the popped dict, and the rebuilt model had the default step budget
    with pytest.warns(DeprecationWarning, match="max_steps"):
        model = DenseDEQClassifier(in_features=64, width=8, max_steps=7, scheduler="none", log_figures=False)
    assert model.hparams["max_steps"] == 7
    with pytest.warns(DeprecationWarning, match="max_steps"):
        loaded = DenseDEQClassifier.load_from_checkpoint(_saved(model, tmp_path), weights_only=True)
    assert loaded.deq.solver.max_steps == 7 and _same_weights(model, loaded)


class Outer(pl.LightningModule):
    """Builds a DEQ model inside its own __init__, after its own save_hyperparameters."""

    def __init__(self, scale: float = 2.0):
        super().__init__()
        self.save_hyperparameters()
        self.inner = DigitsDEQ(width=8, lr=5e-3)


def test_a_model_built_inside_another_modules_constructor_records_its_own_arguments():
    # before: Lightning's frame walk, started at the inner model's outermost __init__, went on into Outer's and
    # added its `scale` to the inner model's hparams (load_from_checkpoint then passed it to DigitsDEQ)
    outer = Outer()
    assert dict(outer.hparams) == {"scale": 2.0}
    assert dict(outer.inner.hparams) == {
        "model_type": "skip",
        "width": 8,
        "solver": None,
        "backward": None,
        "jacobian_regularization": False,
        "lr": 5e-3,
    }


def test_the_recording_keeps_the_real_signature_and_source_for_lightningcli_and_the_docs():
    params = inspect.signature(DigitsDEQ.__init__).parameters
    assert list(params)[:3] == ["self", "model_type", "width"]
    assert inspect.getfullargspec(DigitsDEQ.__init__).args[:3] == [
        "self",
        "model_type",
        "width",
    ]  # load_from_checkpoint's view
    source = inspect.getsource(DigitsDEQ.__init__)  # the constructor's own text, however it is wrapped
    assert "super().__init__(" in source and "in_features=64," in source
    assert set(inspect.signature(DEQLightningModule.__init__).parameters) == {"self", "training", "overrides"}


def test_a_positional_rest_is_not_recorded_and_the_base_class_records_its_own_arguments():
    class Variadic(DEQLightningModule):
        def __init__(self, *layers: int, depth: int = 2, **kwargs):
            super().__init__(**kwargs)
            self.net = nn.Linear(64, 10)

        def forward(self, x):
            return self.net(x), None

    assert dict(Variadic(3, 4, lr=0.1).hparams) == {"depth": 2, "lr": 0.1}
    assert dict(DEQLightningModule(lr=0.1).hparams) == {"training": None, "lr": 0.1}


def test_a_lightningcli_model_keeps_the_clis_record_and_rebuilds_from_a_weights_only_checkpoint(tmp_path):
    from deqlab.lightning.cli import DEQLightningCLI

    override = tmp_path / "o.yaml"
    override.write_text(
        "model:\n  init_args:\n    width: 8\n    solver:\n      class_path: deqlab.solvers.DiscreteDEQSolver\n"
        "      init_args: {algorithm: anderson, max_steps: 7}\n    training: {lr: 0.01, scheduler: none}\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = DEQLightningCLI(
            args=[
                "--config",
                str(REPO / "experiments" / "digits.yaml"),
                "--config",
                str(override),
                "--trainer.logger=false",
            ],
            run=False,
        )
    hp = dict(cli.model.hparams)
    assert hp["_class_path"] == "deqlab.zoo.DigitsDEQ" and hp["width"] == 8
    assert hp["solver"]["class_path"] == "deqlab.solvers.DiscreteDEQSolver"  # plain data, not the object
    path = _saved(cli.model, tmp_path)
    assert torch.load(path, weights_only=True)["hyper_parameters"]["training"] == {"lr": 0.01, "scheduler": "none"}
    loaded = DEQLightningModule.load_from_checkpoint(path)  # the class and the solver object from the record
    assert type(loaded) is DigitsDEQ and find_deq_layers(loaded)[0].solver.max_steps == 7
    assert loaded.deq_config == cli.model.deq_config and _same_weights(cli.model, loaded)
