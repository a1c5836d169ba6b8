"""No override of a Lightning hook can switch deqlab's policies off (issue 16, item 2).

Each test case subclasses ``DigitsDEQ`` and overrides one hook a user may override, *without* ``super()``,
then trains 2 epochs in which batch 1 has a NaN pixel, with fixed-depth pretraining crossing the epoch
boundary and a validation during pretraining, and resumes a second run from a mid-epoch checkpoint. The
policies must still hold: the pretraining depth is applied (and validation and test run the solver), the NaN
batch is skipped and the warning names batch 1, and the resumed run ends bit-identical to the uninterrupted
one. A ``configure_callbacks`` override that drops deqlab's callbacks cannot keep them: it must warn.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_testkit import trainer

from deqlab.lightning import NonFiniteGuard, find_deq_layers
from deqlab.zoo import DigitsDEQ

PRETRAIN_STEPS, PRETRAIN_DEPTH = 5, 3
BATCHES = 4  # per epoch; 2 epochs: global steps 0-7, pretraining for steps 0-4


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
    optimizer.step(closure=optimizer_closure)  # Lightning's documented pattern, without super()


def _configure_optimizers(self):
    return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _backward(self, loss, *args, **kwargs):
    loss.backward()


def _training_step(self, batch, batch_idx):  # the user's own step: deqlab's loss and logs are not used
    x, y = batch
    # a NaN input would make the Skip shortcut's initial guess NaN, which the solver refuses (ValueError); the
    # guard's finite stand-in is what deqlab's own step uses
    output, _ = self(NonFiniteGuard.of(self.trainer).stand_in(x))
    return F.cross_entropy(output, y)


#: every hook a user may override, and the override (no super()); optimizer_zero_grad is left out: Lightning
#: calls it to clear the gradients, and a no-op would accumulate them over the whole run
OVERRIDES: Dict[str, Any] = {
    **{
        name: _noop
        for name in (
            "prepare_data",
            "setup",
            "configure_model",
            "teardown",
            "on_fit_start",
            "on_fit_end",
            "on_train_start",
            "on_train_end",
            "on_train_epoch_start",
            "on_train_epoch_end",
            "on_train_batch_start",
            "on_train_batch_end",
            "on_validation_start",
            "on_validation_end",
            "on_validation_epoch_start",
            "on_validation_epoch_end",
            "on_validation_batch_start",
            "on_validation_batch_end",
            "on_validation_model_eval",
            "on_validation_model_train",
            "on_test_start",
            "on_test_end",
            "on_test_epoch_start",
            "on_test_epoch_end",
            "on_test_batch_start",
            "on_test_batch_end",
            "on_before_backward",
            "on_after_backward",
            "on_before_optimizer_step",
            "on_before_zero_grad",
            "on_save_checkpoint",
            "on_load_checkpoint",
        )
    },
    "optimizer_step": _optimizer_step,
    "configure_optimizers": _configure_optimizers,
    "backward": _backward,
    "training_step": _training_step,
}


def _model(hook: str) -> pl.LightningModule:
    cls = type(f"Overrides_{hook}", (DigitsDEQ,), {hook: OVERRIDES[hook]})
    pl.seed_everything(0)
    # Hutchinson probes draw from the global RNG: the resumed run is exact only if deqlab restores it
    return cls(
        model_type="skip",
        width=8,
        jacobian_regularization=True,
        jacobian_loss_weight=0.1,
        scheduler="none",
        pretrain_steps=PRETRAIN_STEPS,
        pretrain_depth=PRETRAIN_DEPTH,
        log_figures=False,
    )


def _data(nan: bool = True) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16 * BATCHES, 64, generator=g)
    y = torch.randint(0, 10, (16 * BATCHES,), generator=g)
    if nan:
        x[16 + 4, 3] = float("nan")  # one pixel of one sample of batch 1
    return DataLoader(TensorDataset(x, y), batch_size=16)


class _Probe(pl.Callback):
    """The DEQ layers' depth in each training batch, in validation and in test."""

    def __init__(self) -> None:
        self.train, self.val, self.test = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train.append(find_deq_layers(pl_module)[0].fixed_depth)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append(find_deq_layers(pl_module)[0].fixed_depth)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.test.append(find_deq_layers(pl_module)[0].fixed_depth)


def _fit(hook: str, root: Path, ckpt_path=None):
    model, probe = _model(hook), _Probe()
    tr = trainer(
        max_epochs=2,
        limit_val_batches=1,
        deterministic=True,
        enable_checkpointing=True,
        default_root_dir=root,
        callbacks=[probe, ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1, filename="{step}")],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(model, _data(), _data(nan=False), ckpt_path=ckpt_path)
    nonfinite = [str(w.message) for w in caught if "non-finite training batch" in str(w.message)]
    return tr, model, probe, nonfinite


@pytest.mark.parametrize("hook", sorted(OVERRIDES))
def test_an_override_without_super_keeps_every_policy(hook, tmp_path):
    tr, model, probe, nonfinite = _fit(hook, tmp_path / "straight")
    # pretraining: fixed depth for global steps 0-4, the solver after; validation (at step 4) with the solver
    assert probe.train == [PRETRAIN_DEPTH] * PRETRAIN_STEPS + [0] * (2 * BATCHES - PRETRAIN_STEPS), probe.train
    assert probe.val == [0, 0], probe.val
    # the NaN batch (batch 1 of each epoch) is skipped, the warning names it, the weights stay finite
    assert len(nonfinite) == 1 and "non-finite training batch 1 (epoch 0" in nonfinite[0], nonfinite
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    logged = tr.logged_metrics.get("train/skipped_batches")
    assert logged is not None and float(logged) == 2.0
    # test runs the solver and gives the training depth back
    model.set_fixed_depth(PRETRAIN_DEPTH)
    tr.test(model, _data(nan=False), verbose=False)
    assert probe.test and set(probe.test) == {0} and find_deq_layers(model)[0].fixed_depth == PRETRAIN_DEPTH
    # resumed from the checkpoint at step 3 (mid epoch 0, before the end of pretraining and the second NaN
    # batch), the run ends exactly where the uninterrupted one did
    resumed_tr, resumed, _, _ = _fit(hook, tmp_path / "resumed", ckpt_path=tmp_path / "straight" / "step=3.ckpt")
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert float(resumed_tr.logged_metrics["train/skipped_batches"]) == 2.0  # the count continued


def test_a_configure_callbacks_override_that_drops_deqlabs_callbacks_warns_naming_them(tmp_path):
    from deqlab.lightning import PolicyWarning

    cls = type("DropsCallbacks", (DigitsDEQ,), {"configure_callbacks": lambda self: []})
    model = cls(width=8, scheduler="none", pretrain_steps=2, log_figures=False)
    with pytest.warns(
        PolicyWarning,
        match=r"DropsCallbacks trains without deqlab's PhaseTiming, PretrainingSchedule, "
        r"NonFiniteGuard, BackwardStats, HParamsTab, CheckpointIntegrity and "
        r"ExactResume callback\(s\)",
    ):
        trainer(max_steps=1, limit_val_batches=0).fit(model, _data())
