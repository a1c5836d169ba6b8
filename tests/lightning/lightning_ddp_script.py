"""Train a small Skip DEQ single-process or with DDP on 2 CPU processes; save each rank's parameters.

Run by test_lightning_ddp.py as a separate process (``strategy="ddp"`` re-launches this very script as
rank 1, which must not be pytest):

    python lightning_ddp_script.py single OUT_DIR   # 1 process, global batch 16
    python lightning_ddp_script.py ddp OUT_DIR      # 2 processes (gloo), 8 samples per rank and step
    python lightning_ddp_script.py ddp_nan OUT_DIR  # as ddp, one NaN pixel in a sample only rank 1 sees
    python lightning_ddp_script.py single_nan OUT_DIR
    python lightning_ddp_script.py ddp_nanaccum OUT_DIR  # accumulate_grad_batches=2, NaN (rank 1) in batch 0,
    python lightning_ddp_script.py single_nanaccum OUT_DIR  # which does not step

Both runs see the same global batches (an unshuffled DistributedSampler deals the samples of a contiguous
global batch alternately to the two ranks; Lightning's automatic one would shuffle) and every loss term
is a batch mean, so the all-reduced DDP gradient equals the single-process gradient: final parameters
must agree.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from deqlab.lightning import DEQLightningModule, NonFiniteGuard
from deqlab.nn import DenseDEQBlock, ImplicitBackward, SkipDeepEquilibriumNetwork
from deqlab.solvers import DiscreteDEQSolver

warnings.filterwarnings("ignore")
GLOBAL_BATCH = 16
N_SAMPLES = 64


class TinySkipDEQ(DEQLightningModule):
    """The documented subclass contract: network in __init__, forward -> (output, solution)."""

    def __init__(self, width: int = 12, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stem = nn.Sequential(nn.Linear(64, width), nn.ReLU())
        block = DenseDEQBlock(width)
        with torch.no_grad():
            block.w_z.weight.mul_(0.5)  # a clear contraction: the solves converge to 1e-12 quickly
        solver = DiscreteDEQSolver(
            "anderson", mode="abs_norm", abstol_termination=1e-12, reltol_termination=1e-12, max_steps=200
        )
        shortcut = nn.Sequential(nn.Linear(width, width), nn.ReLU())
        self.deq = SkipDeepEquilibriumNetwork(
            block, solver, shortcut=shortcut, backward=ImplicitBackward(tol=1e-13, max_steps=100)
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        z, solution = self.deq(self.stem(x))
        return self.head(z), solution

    def explicit_forward(self, x):
        return self.head(self.deq.explicit(self.stem(x)))


NAN_SAMPLE = 17  # global batch 1, position 1: rank 1's share under DDP
NAN_SAMPLE_ACCUM = 1  # global batch 0 (the first of an accumulation window of 2), position 1: rank 1's share


def data(nan: bool = False, sample: int = NAN_SAMPLE) -> TensorDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:N_SAMPLES], dtype=torch.float64) / 16.0
    if nan:
        x[sample, 5] = float("nan")
    y = torch.tensor(d.target[:N_SAMPLES], dtype=torch.long)
    return TensorDataset(x, y)


class Data(pl.LightningDataModule):
    """Each rank's share of every global batch, in order (no shuffling, so runs are comparable)."""

    def __init__(self, nan: bool = False, sample: int = NAN_SAMPLE) -> None:
        super().__init__()
        self.nan = nan
        self.sample = sample

    def _loader(self) -> DataLoader:
        ds = data(self.nan, self.sample)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
        return DataLoader(ds, batch_size=GLOBAL_BATCH // world, sampler=sampler, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        ds = data()
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
        return DataLoader(ds, batch_size=GLOBAL_BATCH // world, sampler=sampler, shuffle=False)


def main(mode: str, out: Path) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(1234, verbose=False)
    model = TinySkipDEQ(optimizer="sgd", lr=0.5, momentum=0.0, scheduler="none", skip_loss_weight=1.0).double()
    ddp = mode.startswith("ddp")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2 if ddp else 1,
        strategy="ddp" if ddp else "auto",
        max_epochs=2,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(out / f"tb_{mode}", name="", default_hp_metric=False),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        accumulate_grad_batches=2 if mode.endswith("_nanaccum") else 1,
    )
    accum = mode.endswith("_nanaccum")
    trainer.fit(
        model, datamodule=Data(nan=mode.endswith("_nan") or accum, sample=NAN_SAMPLE_ACCUM if accum else NAN_SAMPLE)
    )
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save(
        {
            "state": state,
            "global_step": trainer.global_step,
            "skipped": NonFiniteGuard.of(trainer).skipped_batches,
            "val_loss": float(trainer.callback_metrics["val/loss"]),
        },
        out / f"{mode}_rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
