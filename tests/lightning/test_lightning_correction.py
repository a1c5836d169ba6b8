"""DEQLightningModule with a layer that samples states: the task term is the fixed-point correction loss."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_testkit import trainer

from deqlab import DeepEquilibriumNetwork, DiscreteDEQSolver
from deqlab.lightning import DEQLightningModule
from deqlab.nn import DenseDEQBlock, correction_weights


class Sampled(DEQLightningModule):
    correction_gamma = 0.5

    def __init__(self, n_states: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.stem = nn.Linear(6, 8)
        self.deq = DeepEquilibriumNetwork(
            DenseDEQBlock(8),
            DiscreteDEQSolver("anderson", max_steps=12),
            sample_states=n_states,
            on_unconverged="ignore",
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        z, solution = self.deq(self.stem(x))
        return self.head(z), solution

    def state_output(self, state):
        return self.head(state)


class _Logged(pl.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.logged_metrics.items()})


def _data():
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    return DataLoader(ds, batch_size=16)


def test_correction_loss_is_the_task_term_and_its_parts_are_logged():
    pl.seed_everything(0)
    model = Sampled(scheduler="none", num_classes=3)
    rec = _Logged()
    trainer(max_steps=2, limit_val_batches=0, callbacks=[rec]).fit(model, _data())
    logged = rec.rows[-1]
    parts = [logged[f"train/state_loss_{i}"] for i in range(3)]
    assert "train/state_loss_3" not in logged
    weights = correction_weights(3, "exp", 0.5)
    assert logged["train/task_loss"] == pytest.approx(sum(w * p for w, p in zip(weights, parts)), rel=1e-5)
    assert logged["train/loss"] == pytest.approx(logged["train/task_loss"], rel=1e-6)


def test_without_state_output_the_module_says_what_to_implement():
    class NoHook(Sampled):
        state_output = DEQLightningModule.state_output

    model = NoHook(scheduler="none", num_classes=3)
    with pytest.raises(NotImplementedError, match="state_output"):
        model._shared_step((torch.randn(4, 6), torch.randint(0, 3, (4,))), "val")


def test_state_loss_names_are_reserved():
    from deqlab.lightning.losses import checked_extra_terms

    with pytest.raises(ValueError, match="reserved"):
        checked_extra_terms("M", {"state_loss_0": torch.tensor(1.0)}, {}, "val")
