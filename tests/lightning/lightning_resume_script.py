"""Train a small stochastic DEQ (Hutchinson Jacobian probes draw from the global RNG) and save its weights;
optionally SIGKILL itself right after a checkpoint exists, or resume from a checkpoint.

Run by test_lightning_resume.py (and by hand to measure exactness) in fresh processes:

    python lightning_resume_script.py straight OUT [options]         # uninterrupted: OUT/straight.pt
    python lightning_resume_script.py killed OUT [options]           # SIGKILL at --kill-at (checkpoints in OUT/ckpt)
    python lightning_resume_script.py resume OUT CKPT [options]      # resumed in a new process: OUT/resume.pt
    python lightning_resume_script.py compare A.pt B.pt              # prints max |dw| (0.0: bit-identical)

Options: ``--loader`` ``datamodule`` (deqlab's DigitsDataModule, default), ``plain`` (the user's own
``DataLoader(shuffle=True)``), ``plain_gen`` (the same with its own ``torch.Generator``), ``plain_seq``
(``shuffle=False``), ``stateful_gen`` (torchdata's ``StatefulDataLoader(shuffle=True)`` with its own generator);
``--workers N``; ``--devices 2`` (DDP on CPU, gloo: this script is re-launched as rank 1);
``--every N`` (checkpoint every N steps; 0: at each epoch's end); ``--kill-at N`` (SIGKILL at global step N); ``--batches N``
(training batches per epoch) and ``--epochs N``; ``--model`` ``stock``, ``own_save`` (a subclass whose
``on_save_checkpoint`` does not call ``super()``), ``own_hooks`` (``on_load_checkpoint``/``on_train_start``
overridden without ``super()`` as well).
"""

from __future__ import annotations

import argparse
import os
import signal
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from deqlab.data import DigitsDataModule
from deqlab.zoo import DigitsDEQ

warnings.filterwarnings("ignore")


class OwnSave(DigitsDEQ):
    """A subclass that keeps its own entry and forgets ``super().on_save_checkpoint``."""

    def on_save_checkpoint(self, checkpoint):
        checkpoint["mine"] = 1


class OwnHooks(OwnSave):
    """... and forgets ``super()`` in ``on_load_checkpoint`` and ``on_train_start`` too."""

    def on_load_checkpoint(self, checkpoint):
        self.mine = checkpoint.get("mine")

    def on_train_start(self):
        pass


MODELS = {"stock": DigitsDEQ, "own_save": OwnSave, "own_hooks": OwnHooks}


class _KillAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:  # every rank kills itself at the same step
            os.kill(os.getpid(), signal.SIGKILL)


def _data(args):
    dm = DigitsDataModule(batch_size=32, seed=7, flatten=True, num_workers=args.workers)
    if args.loader == "datamodule":
        return {"datamodule": dm}
    dm.setup("fit")
    options = dict(batch_size=32, num_workers=args.workers, persistent_workers=args.workers > 0)
    if args.loader == "plain":
        train = DataLoader(dm.train_set, shuffle=True, **options)
    elif args.loader == "plain_gen":
        train = DataLoader(dm.train_set, shuffle=True, generator=torch.Generator().manual_seed(11), **options)
    elif args.loader == "plain_seq":
        train = DataLoader(dm.train_set, shuffle=False, **options)
    elif args.loader == "stateful_gen":  # torchdata's StatefulDataLoader as a user would write it
        from torchdata.stateful_dataloader import StatefulDataLoader

        train = StatefulDataLoader(dm.train_set, shuffle=True, generator=torch.Generator().manual_seed(11), **options)
    else:
        raise SystemExit(f"unknown --loader {args.loader}")
    return {"train_dataloaders": train, "val_dataloaders": DataLoader(dm.val_set, batch_size=32)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["straight", "killed", "resume", "compare"])
    parser.add_argument("out")
    parser.add_argument("ckpt", nargs="?")
    parser.add_argument("--loader", default="datamodule")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--kill-at", type=int, default=7)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--model", default="stock", choices=sorted(MODELS))
    args = parser.parse_args(argv)
    if args.mode == "compare":
        a, b = torch.load(args.out), torch.load(args.ckpt)
        assert a.keys() == b.keys()
        print(max(float((a[k].double() - b[k].double()).abs().max()) for k in a))
        return
    out = Path(args.out)
    torch.set_num_threads(1)
    pl.seed_everything(123, verbose=False)
    model = MODELS[args.model](
        model_type="skip",
        width=12,
        jacobian_regularization=True,
        jacobian_loss_weight=0.3,
        scheduler="cosine",
        pretrain_steps=4,
        pretrain_depth=2,
        log_figures=False,
    )
    every = dict(every_n_train_steps=args.every) if args.every else {}  # 0: at the end of every epoch
    callbacks = [ModelCheckpoint(dirpath=out / "ckpt", save_top_k=-1, filename="{step}", **every)]
    if args.mode == "killed":
        callbacks.append(_KillAt(args.kill_at))
    ddp = args.devices > 1
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if ddp else "auto",
        max_epochs=args.epochs,
        limit_train_batches=args.batches,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=callbacks,
        default_root_dir=out,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, **_data(args), ckpt_path=args.ckpt if args.mode == "resume" else None)
    if trainer.global_rank == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / f"{args.mode}.pt")
        notes = sorted({f"{w.category.__name__}: {w.message}" for w in caught if "deqlab" in str(w.message)})
        (out / f"{args.mode}.warnings.txt").write_text("\n".join(notes))


if __name__ == "__main__":
    main()
