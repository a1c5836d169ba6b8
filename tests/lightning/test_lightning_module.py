"""DEQLightningModule: loss composition, logging, pretraining, optimizers, explicit path, hparams."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_testkit import digits, trainer

from deqlab.lightning import DEQLightningModule, find_deq_layers
from deqlab.zoo import DigitsDEQ, MNISTDenseDEQ


class _Record(pl.Callback):
    """Per training batch: the returned loss, the step's record (``outputs["deq"]``), and what it logged."""

    def __init__(self) -> None:
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        row = outputs["deq"].as_dict()
        row["loss"] = float(outputs["loss"])
        row["global_step"] = trainer.global_step
        row["logged"] = {k: float(v) for k, v in trainer.logged_metrics.items()}
        row["depths"] = [m.fixed_depth for m in find_deq_layers(pl_module)]
        self.rows.append(row)


def test_loss_is_task_plus_weighted_skip_and_jacobian_and_each_part_is_logged():
    pl.seed_everything(0)
    model = DigitsDEQ(
        model_type="skip",
        width=16,
        jacobian_regularization=True,
        skip_loss_weight=0.7,
        jacobian_loss_weight=0.3,
        scheduler="none",
    )
    rec = _Record()
    tr = trainer(max_steps=2, limit_val_batches=0, callbacks=[rec])
    tr.fit(model, digits(batch_size=32, flatten=True))
    assert len(rec.rows) == 2
    logged = rec.rows[-1]["logged"]
    for key in (
        "train/loss",
        "train/task_loss",
        "train/skip_loss",
        "train/jacobian_loss",
        "train/batch_accuracy",
        "solver/train_nfe",
        "solver/train_backward_nfe",
        "solver/train_abs_residual_mean",
        "solver/train_abs_residual_max",
        "solver/train_samples_converged",
        "time/forward",
        "time/backward",
        "time/optimizer",
    ):
        assert key in logged, key
    task, skip, jac = logged["train/task_loss"], logged["train/skip_loss"], logged["train/jacobian_loss"]
    assert skip > 0 and jac > 0 and task > 0
    assert logged["train/loss"] == pytest.approx(task + 0.7 * skip + 0.3 * jac, rel=1e-5)
    assert rec.rows[-1]["loss"] == pytest.approx(logged["train/loss"], rel=1e-6)
    assert logged["solver/train_backward_nfe"] >= 1  # implicit backward ran and was counted
    assert all(logged[k] >= 0 for k in ("time/forward", "time/backward", "time/optimizer"))


def test_pretraining_runs_fixed_depth_then_the_solver_and_logs_the_switch(caplog):
    pl.seed_everything(0)
    model = DigitsDEQ(
        model_type="vanilla", width=16, pretrain_steps=3, pretrain_depth=4, scheduler="none", max_steps=40
    )
    rec = _Record()
    tr = trainer(max_steps=6, limit_val_batches=0, callbacks=[rec])
    with caplog.at_level("INFO"):
        tr.fit(model, digits(batch_size=32, flatten=True))
    nfes = [r["nfe"] for r in rec.rows]
    flags = [r["logged"]["train/pretraining"] for r in rec.rows]
    assert nfes[:3] == [4, 4, 4]
    assert flags == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert [r["depths"] for r in rec.rows[:3]] == [[4]] * 3 and [r["depths"] for r in rec.rows[3:]] == [[0]] * 3
    # after pretraining the solver decides the NFE and the backward is implicit again
    assert all(r["backward_nfe"] and r["backward_nfe"] > 0 for r in rec.rows[3:])
    assert all(r["backward_nfe"] == 4 for r in rec.rows[:3])  # unrolled: plain backprop, one VJP per step
    text = " ".join(m for m in caplog.messages)
    assert "pretraining" in text and "finished" in text


def test_validation_uses_the_solver_during_pretraining():
    pl.seed_everything(0)
    model = DigitsDEQ(model_type="vanilla", width=16, pretrain_steps=100, pretrain_depth=3, scheduler="none")
    tr = trainer(max_steps=2, limit_val_batches=1, val_check_interval=2)
    tr.fit(model, digits(batch_size=32, flatten=True))
    assert tr.callback_metrics["solver/val_nfe"] != 3
    assert [m.fixed_depth for m in find_deq_layers(model)] == [3]  # training mode restored after validation


@pytest.mark.parametrize(
    "options, kind, check",
    [
        (
            dict(optimizer="adamw", lr=2e-3, weight_decay=2.5e-6, betas=(0.8, 0.99)),
            torch.optim.AdamW,
            lambda g: g["lr"] == 2e-3 and g["weight_decay"] == 2.5e-6 and tuple(g["betas"]) == (0.8, 0.99),
        ),
        (dict(optimizer="adam", lr=1e-3), torch.optim.Adam, lambda g: g["lr"] == 1e-3),
        (
            dict(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-6),
            torch.optim.SGD,
            lambda g: g["momentum"] == 0.9 and g["nesterov"] and g["weight_decay"] == 1e-6,
        ),
    ],
)
def test_optimizer_from_hparams(options, kind, check):
    model = DigitsDEQ(width=8, scheduler="none", **options)
    opt = model.configure_optimizers()
    assert type(opt) is kind and check(opt.param_groups[0])
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_params


def test_schedulers_from_hparams():
    cos = DigitsDEQ(width=8, scheduler="cosine", scheduler_steps=123, eta_min=1e-6).configure_optimizers()
    sched = cos["lr_scheduler"]["scheduler"]
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert sched.T_max == 123 and sched.eta_min == 1e-6 and cos["lr_scheduler"]["interval"] == "step"
    step = DigitsDEQ(width=8, optimizer="sgd", lr=0.05, scheduler="step", step_milestones=[10, 20], step_gamma=0.5)
    sched = step.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert isinstance(sched, torch.optim.lr_scheduler.MultiStepLR)
    assert dict(sched.milestones) == {10: 1, 20: 1} and sched.gamma == 0.5
    with pytest.raises(ValueError, match="step_milestones"):
        DigitsDEQ(width=8, scheduler="step").configure_optimizers()
    with pytest.raises(ValueError, match="scheduler_steps"):
        DigitsDEQ(width=8, scheduler="cosine").configure_optimizers()  # no trainer, no steps


def test_cosine_period_defaults_to_the_trainers_total_steps_and_reaches_eta_min():
    pl.seed_everything(0)
    model = DigitsDEQ(width=8, model_type="vanilla", scheduler="cosine", lr=1e-2, eta_min=1e-4)
    tr = trainer(max_steps=5, limit_val_batches=0)
    tr.fit(model, digits(batch_size=32, flatten=True))
    sched = tr.lr_scheduler_configs[0].scheduler
    assert sched.T_max == 5
    assert tr.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4)


def test_the_cosine_period_is_asked_at_the_first_step_not_in_configure_optimizers():
    # asking the Trainer for its total steps in configure_optimizers sets the training data up before a
    # checkpoint is restored, and Lightning 2.6 then drops the loader's mid-epoch position (its issue 20550)
    seen = {}

    class Probe(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            seen["data_set_up"] = trainer.train_dataloader is not None

    pl.seed_everything(0)
    model = DigitsDEQ(width=8, model_type="vanilla", scheduler="cosine")
    tr = trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0, callbacks=[Probe()])
    tr.fit(model, digits(batch_size=32, flatten=True))
    assert seen == {"data_set_up": False}
    sched = tr.lr_scheduler_configs[0].scheduler
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR) and sched.T_max == 3
    assert "_period" not in sched.state_dict()  # checkpoints stay plain data


def test_mnist_dense_defaults_follow_the_paper():
    m = MNISTDenseDEQ(model_type="skip")
    cfg = m.deq_config
    # the protocol the paper's text states: Adam at a constant 1e-3, λ_skip 0.01
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.betas, cfg.scheduler) == (
        "adam",
        1e-3,
        0.0,
        (0.9, 0.999),
        "none",
    )
    assert cfg.skip_loss_weight == 0.01 and cfg.jacobian_loss_weight == 0.0
    assert MNISTDenseDEQ(model_type="vanilla", jacobian_regularization=True).deq_config.jacobian_loss_weight == 1.0
    assert MNISTDenseDEQ(model_type="vanilla").deq_config.skip_loss_weight == 0.0
    deq = find_deq_layers(m)[0]
    assert deq.solver.max_steps == 50 if hasattr(deq.solver, "max_steps") else True
    w = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in w[:1]] == [(784, 128)]
    out, sol = m(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 10) and sol.z_star.shape == (4, 128)
    assert m.explicit_forward(torch.randn(4, 784)).shape == (4, 10)


def test_explicit_accuracy_and_time_for_skip_models_only():
    pl.seed_everything(0)
    dm = digits(batch_size=64, flatten=True)
    for model_type, expected in (("skip", True), ("skip_reg", True), ("vanilla", False)):
        model = DigitsDEQ(width=16, model_type=model_type, scheduler="none")
        tr = trainer(limit_val_batches=2)
        tr.validate(model, dm, verbose=False)
        metrics = tr.callback_metrics
        assert ("val/explicit_accuracy" in metrics) is expected, model_type
        assert ("val/explicit_time" in metrics) is expected, model_type
        assert "val/accuracy" in metrics and "solver/val_nfe" in metrics and "hp/val_nfe" in metrics


def test_top5_accuracy_only_for_more_than_ten_classes():
    assert "train_top5_accuracy" not in DigitsDEQ(width=8).metrics
    assert "val_top5_accuracy" in DigitsDEQ(width=8, num_classes=20).metrics


def test_hparams_rebuild_the_model_from_a_checkpoint(tmp_path):
    pl.seed_everything(0)
    model = DigitsDEQ(width=12, model_type="skip_reg", lr=2e-3, scheduler="none", pretrain_steps=1)
    tr = trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    tr.fit(model, digits(batch_size=32, flatten=True))
    path = tmp_path / "m.ckpt"
    tr.save_checkpoint(path)
    assert "in_features" not in model.hparams  # only the most-derived constructor's arguments
    loaded = DigitsDEQ.load_from_checkpoint(path)
    assert loaded.deq_config == model.deq_config
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


class _NoDEQ(DEQLightningModule):
    """A plain network through the base class: solution None must work (ablations)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x), None


def test_a_model_without_deq_trains_and_pretraining_needs_a_deq_layer():
    pl.seed_everything(0)
    model = _NoDEQ(scheduler="none")
    assert model.hparams["scheduler"] == "none"
    tr = trainer(max_steps=2, limit_val_batches=1, val_check_interval=2)
    tr.fit(model, digits(batch_size=32))
    assert math.isfinite(float(tr.callback_metrics["val/loss"]))
    with pytest.raises(RuntimeError, match="no DEQ layer"):
        trainer(max_steps=1, limit_val_batches=0).fit(_NoDEQ(scheduler="none", pretrain_steps=1), digits(batch_size=32))


def test_bad_hyperparameters_fail_with_a_clear_message():
    with pytest.raises(ValueError, match="pretrain"):
        DigitsDEQ(pretrain_steps=-1)
    with pytest.raises(ValueError, match="model_type"):
        DigitsDEQ(model_type="nope")
    with pytest.raises(ValueError, match="in_features"):
        DigitsDEQ(width=8)(torch.randn(2, 3, 8, 8))
