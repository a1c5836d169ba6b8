"""Train a small stochastic DEQ (Hutchinson Jacobian probes draw from the global RNG) and save its weights;
optionally SIGKILL itself right after a mid-epoch checkpoint exists, or resume from a checkpoint.

Run by test_lightning_resume.py in fresh processes:

    python lightning_resume_script.py straight OUT            # uninterrupted: OUT/straight.pt
    python lightning_resume_script.py killed OUT              # killed at global step KILL_AT (checkpoints in OUT/ckpt)
    python lightning_resume_script.py resume OUT CKPT         # resumed in a new process: OUT/resume.pt
"""
from __future__ import annotations

import os
import signal
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from deqlab.data import DigitsDataModule
from deqlab.zoo import DigitsDEQ

warnings.filterwarnings("ignore")
KILL_AT = 7  # the checkpoint of step 6 (mid epoch 1 of 2 × 5 batches) exists by then


class _KillAt(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)


def main(mode: str, out: Path, ckpt: str | None = None) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(123, verbose=False)
    model = DigitsDEQ(model_type="skip", width=12, jacobian_regularization=True, jacobian_loss_weight=0.3,
                      scheduler="cosine", pretrain_steps=4, pretrain_depth=2, log_figures=False)
    callbacks = [ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")]
    if mode == "killed":
        callbacks.append(_KillAt())
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=5, limit_val_batches=1,
                         num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, deterministic=True, callbacks=callbacks,
                         default_root_dir=out)
    trainer.fit(model, DigitsDataModule(batch_size=32, seed=7, flatten=True), ckpt_path=ckpt)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / f"{mode}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
