"""Resuming from a checkpoint continues exactly where an uninterrupted run would be."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_testkit import digits, trainer

from deqlab.zoo import DigitsDEQ


class _StopAfterFirstEpoch(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def _model():
    pl.seed_everything(123)
    # cosine with the period taken from the Trainer, pretraining crossing the interruption, skip loss on
    return DigitsDEQ(model_type="skip", width=16, scheduler="cosine", pretrain_steps=8, pretrain_depth=3)


def _run(tmp_path, name, callbacks=(), ckpt_path=None):
    tr = trainer(
        max_epochs=2,
        limit_train_batches=5,
        limit_val_batches=1,
        deterministic=True,
        default_root_dir=tmp_path / name,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / name, save_last=True), *callbacks],
    )
    model = _model()
    tr.fit(model, digits(batch_size=32, seed=7), ckpt_path=ckpt_path)  # stock module: resumable as is
    return tr, model


def test_two_epochs_equal_one_epoch_resume_one_epoch(tmp_path):
    straight_tr, straight = _run(tmp_path, "straight")
    stopped_tr, _ = _run(tmp_path, "stopped", callbacks=[_StopAfterFirstEpoch()])
    assert stopped_tr.current_epoch == 1 and stopped_tr.global_step == 5
    resumed_tr, resumed = _run(tmp_path, "resumed", ckpt_path=tmp_path / "stopped" / "last.ckpt")
    assert straight_tr.global_step == resumed_tr.global_step == 10
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert straight_tr.optimizers[0].param_groups[0]["lr"] == resumed_tr.optimizers[0].param_groups[0]["lr"]
