"""Issue 7 on the Lightning side: DEQ layers found through the DEQLayer protocol, the step record as the
one channel to callbacks, typed config written once (DEQTrainingConfig, solver/backward objects in YAML),
the extra-loss hook, and the errors for a forward without a solution and for a Jacobian weight without
Jacobian regularization."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_testkit import REPO, digits, trainer

from deqlab.lightning import DEQLightningModule, PretrainingSchedule, StepRecord, find_deq_layers
from deqlab.nn import DeepEquilibriumNetwork, DenseDEQBlock, ImplicitBackward
from deqlab.solvers import DiscreteDEQSolver
from deqlab.spec import DEQTrainingConfig
from deqlab.zoo import DigitsDEQ, MNISTDenseDEQ


# ---------------------------------------------------------------- item 4: the DEQLayer protocol
class _OnlyAnInt(nn.Module):
    """Has an int ``fixed_depth`` but no ``fixed_depth_mode``: not a DEQ layer."""

    def __init__(self):
        super().__init__()
        self.fixed_depth = 0


class _ForeignLayer(nn.Module):
    """A researcher's own layer implementing the protocol (no deqlab base class)."""

    jacobian_regularization = False

    def __init__(self):
        super().__init__()
        self.fixed_depth = 0

    @contextlib.contextmanager
    def fixed_depth_mode(self, depth):
        old, self.fixed_depth = self.fixed_depth, depth
        try:
            yield self
        finally:
            self.fixed_depth = old


def test_deq_layers_are_found_by_the_protocol_not_by_attribute_names():
    holder = nn.Module()
    holder.a = _OnlyAnInt()
    holder.b = _ForeignLayer()
    holder.c = DeepEquilibriumNetwork(DenseDEQBlock(4), DiscreteDEQSolver("anderson"))
    found = find_deq_layers(holder)
    assert holder.b in found and holder.c in found
    assert holder.a not in found  # an int attribute alone does not make a DEQ layer


class _Foreign(DEQLightningModule):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.layer = _ForeignLayer()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x), None


def test_evaluation_drives_foreign_layers_through_fixed_depth_mode_and_restores_the_depth():
    model = _Foreign(scheduler="none")
    model.set_fixed_depth(3)
    schedule = PretrainingSchedule()
    schedule.on_validation_start(None, model)
    assert model.layer.fixed_depth == 0
    schedule.on_validation_end(None, model)
    assert model.layer.fixed_depth == 3


# ---------------------------------------------------------------- item 3: the record, not last_step_stats
class _Records(pl.Callback):
    def __init__(self):
        self.train, self.val = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train.append(outputs["deq"])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.val.append(outputs["deq"])


def test_callbacks_read_the_step_record_with_the_backward_part_filled_in():
    pl.seed_everything(0)
    model = DigitsDEQ(model_type="vanilla", width=12, scheduler="none", log_figures=False)
    assert not hasattr(model, "last_step_stats")
    rec = _Records()
    trainer(max_steps=2, limit_val_batches=1, val_check_interval=2, callbacks=[rec]).fit(model, digits(batch_size=32))
    assert len(rec.train) == 2 and len(rec.val) == 1
    for r in rec.train:
        assert isinstance(r, StepRecord) and r.stage == "train"
        assert r.nfe >= 1 and r.backward_nfe is not None and r.backward_nfe >= 1
        assert sum(r.status_counts.values()) == 1 and 0.0 <= r.unconverged_fraction <= 1.0
    assert rec.train[1].batch_idx == 1
    assert rec.val[0].stage == "val" and rec.val[0].backward_nfe is None


# ---------------------------------------------------------------- item 7: forward contract, Jacobian weight
class _LogitsOnly(DEQLightningModule):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


def test_a_forward_that_returns_only_logits_is_told_what_to_return():
    with pytest.raises(TypeError, match=r"must return a pair \(output, solution\)"):
        trainer(max_steps=1, limit_val_batches=0).fit(_LogitsOnly(scheduler="none"), digits(batch_size=32))


def test_a_solution_that_is_not_a_record_is_refused():
    class _Bad(_LogitsOnly):
        def forward(self, x):
            out = self.net(x)
            return out, out

    with pytest.raises(TypeError, match="DeepEquilibriumSolution"):
        trainer(max_steps=1, limit_val_batches=0).fit(_Bad(scheduler="none"), digits(batch_size=32))


def test_jacobian_weight_without_jacobian_regularization_raises_at_fit_start():
    model = DigitsDEQ(width=8, model_type="vanilla", jacobian_loss_weight=1.0, scheduler="none")
    with pytest.raises(ValueError, match="jacobian_regularization=True"):
        trainer(max_steps=1, limit_val_batches=0).fit(model, digits(batch_size=32))
    assert model.global_step == 0  # no step ran with the term silently 0


# ---------------------------------------------------------------- item 7: the extra-loss hook
class _WithExtra(DEQLightningModule):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stem = nn.Linear(64, 8)
        self.deq = DeepEquilibriumNetwork(
            DenseDEQBlock(8),
            DiscreteDEQSolver("anderson", max_steps=20),
            backward=ImplicitBackward(tol=1e-4, max_steps=15),
        )
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        z, solution = self.deq(self.stem(x.flatten(1)))
        return self.head(z), solution

    def extra_losses(self, batch, output, solutions, stage):
        return {"z_norm": solutions[0].z_star.pow(2).mean(), "logit_norm": output.pow(2).mean()}


class _Logged(pl.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.logged_metrics.items()})


def test_extra_losses_are_weighted_added_and_logged_per_stage():
    pl.seed_everything(0)
    model = _WithExtra(scheduler="none", extra_loss_weights={"z_norm": 0.5}, log_figures=False)
    cb = _Logged()
    tr = trainer(max_steps=2, limit_val_batches=1, limit_test_batches=1, val_check_interval=2, callbacks=[cb])
    tr.fit(model, digits(batch_size=32))
    row = cb.rows[-1]
    assert row["train/z_norm"] > 0 and row["train/logit_norm"] > 0
    expected = row["train/task_loss"] + 0.5 * row["train/z_norm"] + 1.0 * row["train/logit_norm"]
    assert row["train/loss"] == pytest.approx(expected, rel=1e-5)
    assert "val/z_norm" in tr.callback_metrics and "val/logit_norm" in tr.callback_metrics
    tr.test(model, digits(batch_size=32), verbose=False)
    assert "test/z_norm" in tr.callback_metrics


def test_extra_loss_weights_must_name_returned_terms_and_names_must_be_free():
    model = _WithExtra(scheduler="none", extra_loss_weights={"z_nrom": 0.5})
    with pytest.raises(ValueError, match="z_nrom"):
        trainer(max_steps=1, limit_val_batches=0).fit(model, digits(batch_size=32))

    class _Reserved(_WithExtra):
        def extra_losses(self, batch, output, solutions, stage):
            return {"skip_loss": output.mean()}

    with pytest.raises(ValueError, match="reserved"):
        trainer(max_steps=1, limit_val_batches=0).fit(_Reserved(scheduler="none"), digits(batch_size=32))


# ---------------------------------------------------------------- item 6: config written once
def test_training_settings_are_one_dataclass_flat_names_checked_against_it():
    cfg = DEQTrainingConfig(lr=2e-3, scheduler="none")
    model = DigitsDEQ(width=8, training=cfg, weight_decay=0.5)
    assert model.deq_config.lr == 2e-3 and model.deq_config.scheduler == "none"
    assert model.deq_config.weight_decay == 0.5  # flat keywords apply on top of training=
    assert DigitsDEQ(width=8).deq_config.lr == 3e-3  # the model's defaults
    with pytest.raises(TypeError, match="'lrate'"):
        DigitsDEQ(width=8, lrate=1e-3)
    with pytest.raises(TypeError, match="'weight_dcay'"):
        _Foreign(weight_dcay=1.0)
    with pytest.raises(ValueError, match="pretrain"):
        DEQTrainingConfig(pretrain_depth=0)
    import inspect

    params = inspect.signature(DEQLightningModule.__init__).parameters
    assert set(params) == {"self", "training", "overrides"}  # no copy of the fields in the signature


def test_zoo_models_take_solver_and_backward_objects_and_names():
    solver = DiscreteDEQSolver("anderson", max_steps=7, abstol_termination=1e-4, reltol_termination=1e-4)
    backward = ImplicitBackward("fixed_point", tol=1e-3, max_steps=9)
    m = DigitsDEQ(width=8, solver=solver, backward=backward)
    layer = find_deq_layers(m)[0]
    assert layer.solver is solver and layer.backward is backward
    by_name = find_deq_layers(DigitsDEQ(width=8, solver="anderson"))[0]
    assert by_name.solver.max_steps == 30 and by_name.backward.max_steps == 15
    # the adjoint tolerance is ImplicitBackward's default: the forward solver's termination tolerance
    assert by_name.backward.tol is None
    assert by_name.backward.linear_solver(by_name.solver.termination.tol).tol == 5e-3
    with pytest.warns(DeprecationWarning) as caught:  # the old flat keywords warn, naming the object form
        legacy = find_deq_layers(MNISTDenseDEQ(max_steps=12, reltol=1e-2, backward_max_steps=4))[0]
    said = " ".join(str(w.message) for w in caught)
    assert "build_solver(name, max_steps=...)" in said and "build_backward(name, max_steps=...)" in said
    assert legacy.solver.max_steps == 12 and legacy.backward.max_steps == 4
    assert legacy.backward.linear_solver(legacy.solver.termination.tol).tol == 1e-2
    with pytest.raises(ValueError, match="solver name"):
        DigitsDEQ(width=8, solver=solver, max_steps=3)


def test_a_yaml_config_names_solver_and_backward_by_class_path(tmp_path):
    from deqlab.lightning.cli import DEQLightningCLI

    override = tmp_path / "o.yaml"
    override.write_text(
        "model:\n  init_args:\n    solver:\n      class_path: deqlab.solvers.DiscreteDEQSolver\n"
        "      init_args: {algorithm: anderson, max_steps: 7, mode: abs_norm}\n"
        "    backward:\n      class_path: deqlab.nn.JacobianFreeBackward\n"
        "    training: {lr: 0.01}\n"
    )
    cli = DEQLightningCLI(
        args=["--config", str(REPO / "experiments" / "digits.yaml"), "--config", str(override)], run=False
    )
    layer = find_deq_layers(cli.model)[0]
    assert type(layer.solver).__name__ == "DiscreteDEQSolver" and layer.solver.max_steps == 7
    assert layer.solver.termination.mode == "abs_norm"
    assert type(layer.backward).__name__ == "JacobianFreeBackward"
    cfg = cli.model.deq_config
    assert cfg.lr == 0.01 and cfg.weight_decay == 1e-5 and cfg.skip_loss_weight == 1.0  # merged over the config


def test_data_module_options_are_defined_once_and_keep_per_dataset_defaults(tmp_path):
    import inspect

    from deqlab.data import CIFAR10DataModule, ImageNetDataModule, MNISTDataModule, SVHNDataModule

    for cls in (MNISTDataModule, SVHNDataModule):
        assert "seed" not in inspect.signature(cls.__init__).parameters
    assert CIFAR10DataModule(tmp_path).batch_size == 128 and SVHNDataModule(tmp_path).batch_size == 64
    im = ImageNetDataModule(tmp_path)
    assert (im.num_workers, im.val_fraction, im.augment) == (8, 0.01, True)
    with pytest.raises(TypeError):
        MNISTDataModule(tmp_path, batchsize=3)


def test_importing_deqlab_lightning_does_not_import_the_zoo():
    code = (
        "import sys, deqlab.lightning, deqlab.lightning.cli; "
        "bad = [m for m in sys.modules if m.startswith(('deqlab.zoo', 'deqlab.models', 'deqlab.cli'))]; "
        "assert not bad, bad"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_deq_classifier_keeps_the_network_out_of_hparams_and_reloads_with_it(tmp_path):
    from deqlab.zoo import DEQClassifier
    from deqlab.zoo import DigitsDEQ as _D

    class _Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _D(width=8, model_type="vanilla")

        def forward(self, x):
            return self.inner(x)

    pl.seed_everything(0)
    module = DEQClassifier(_Net(), lr=2e-3, scheduler="none", log_figures=False)
    assert "network" not in module.hparams and module.hparams["lr"] == 2e-3
    tr = trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    tr.fit(module, digits(batch_size=32, flatten=True))
    tr.save_checkpoint(tmp_path / "c.ckpt")
    loaded = DEQClassifier.load_from_checkpoint(tmp_path / "c.ckpt", network=_Net(), weights_only=True)
    assert loaded.deq_config == module.deq_config
    for (k, a), b in zip(module.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


# ---------------------------------------------------------------- audit follow-ups: protocol members, checked forward
class _Wrapper(nn.Module):
    """A researcher's layer wrapping a deqlab DEQ: one DEQ layer to the trainer, answering for the inner one."""

    def __init__(self, jac: bool):
        super().__init__()
        self.inner = DeepEquilibriumNetwork(
            DenseDEQBlock(8), DiscreteDEQSolver("anderson", max_steps=20), jacobian_regularization=jac
        )

    @property
    def fixed_depth(self):
        return self.inner.fixed_depth

    @fixed_depth.setter
    def fixed_depth(self, depth):
        self.inner.fixed_depth = depth

    @property
    def jacobian_regularization(self):
        return self.inner.jacobian_regularization

    def fixed_depth_mode(self, depth):
        return self.inner.fixed_depth_mode(depth)

    def forward(self, x):
        return self.inner(x)


class _Wrapped(DEQLightningModule):
    def __init__(self, jac: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.stem = nn.Linear(64, 8)
        self.layer = _Wrapper(jac)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        z, solution = self.layer(self.stem(x.flatten(1)))
        return self.head(z), solution


def test_find_deq_layers_returns_the_outermost_layer_only():
    model = _Wrapped()
    assert find_deq_layers(model) == [model.layer]  # not also model.layer.inner: the wrapper drives it
    model.set_fixed_depth(4)
    assert model.layer.inner.fixed_depth == 4
    schedule = PretrainingSchedule()
    schedule.on_test_start(None, model)
    assert model.layer.inner.fixed_depth == 0
    schedule.on_test_end(None, model)
    assert model.layer.inner.fixed_depth == 4


def test_jacobian_regularization_is_a_protocol_member_read_from_the_layer():
    from deqlab.nn import DEQLayer

    class _NoFlag(nn.Module):
        fixed_depth = 0

        def fixed_depth_mode(self, depth):
            return contextlib.nullcontext(self)

    assert not isinstance(_NoFlag(), DEQLayer)  # the flag is part of the protocol
    _Wrapped(jac=True, jacobian_loss_weight=1.0)._check_jacobian_setting()
    with pytest.raises(ValueError, match="jacobian_regularization=True"):
        _Wrapped(jac=False, jacobian_loss_weight=1.0)._check_jacobian_setting()


def test_predict_step_checks_the_forward_contract_and_returns_the_output():
    with pytest.raises(TypeError, match=r"must return a pair \(output, solution\)"):
        _LogitsOnly(scheduler="none").predict_step((torch.randn(5, 64), torch.zeros(5)), 0)
    model = DigitsDEQ(width=8, model_type="vanilla")
    out = model.predict_step((torch.randn(5, 64), torch.zeros(5)), 0)
    assert out.shape == (5, 10)
    assert model.predict_step({"x": torch.randn(3, 64)}, 0).shape == (3, 10)
    assert model.predict_step(torch.randn(2, 64), 0).shape == (2, 10)


def test_the_convergence_figure_checks_the_forward_contract(tmp_path):
    from types import SimpleNamespace

    from pytorch_lightning.loggers import TensorBoardLogger

    from deqlab.lightning import ConvergenceFigure

    figure = ConvergenceFigure(num_samples=2)
    figure._batch = torch.randn(2, 64)  # two rows: an unchecked `_, solution = logits` would unpack them
    fake_trainer = SimpleNamespace(loggers=[TensorBoardLogger(tmp_path)], global_step=0, current_epoch=0)
    with pytest.raises(TypeError, match=r"_LogitsOnly.forward\(x\) must return a pair"):
        figure._draw(fake_trainer, _LogitsOnly(scheduler="none"))
    figure._draw(fake_trainer, DigitsDEQ(width=8, model_type="vanilla"))  # a conforming model draws


def test_deq_classifier_reads_explicit_forward_through_its_protocol():
    from deqlab.models import build_model
    from deqlab.zoo import DEQClassifier, ExplicitPredictor

    class _Plain(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :10], None

    assert DEQClassifier(_Plain()).explicit_forward(torch.randn(2, 64)) is None
    net = build_model("mnist", "dense", width=8)
    assert isinstance(net, ExplicitPredictor)
    assert DEQClassifier(net).explicit_forward(torch.randn(2, 784)).shape == (2, 10)
