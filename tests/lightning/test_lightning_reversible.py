"""One Lightning training step of a DEQ solved by ReversibleSolver and differentiated by ReversibleBackward
(built by its registry name, "reversible"): a finite loss, weights that moved, solver/ metrics logged."""

from __future__ import annotations

import warnings

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_testkit import trainer

from deqlab.lightning import DEQLightningModule
from deqlab.nn import DeepEquilibriumNetwork, ReversibleBackward
from deqlab.solvers import ReversibleSolver, get_solver


class _Contraction(nn.Module):
    """f(z, x) = tanh(W z) / 2 + x: a contraction, so the relaxed coupled iteration converges."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, dim, bias=False)

    def forward(self, z, x):
        return 0.5 * torch.tanh(self.lin(z)) + x


class _ReversibleDEQ(DEQLightningModule):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stem = nn.Linear(8, 4)
        solver = get_solver("reversible", beta=0.8, mode="abs_norm", abstol_termination=1e-5, max_steps=30)
        assert isinstance(solver, ReversibleSolver)
        self.deq = DeepEquilibriumNetwork(_Contraction(4), solver, backward=ReversibleBackward())
        self.head = nn.Linear(4, 10)  # the module's accuracy metric counts 10 classes

    def forward(self, x):
        z, solution = self.deq(self.stem(x))
        return self.head(z), solution


class _Logged(pl.Callback):
    def __init__(self):
        self.rows, self.losses = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.logged_metrics.items()})
        self.losses.append(float(outputs["loss"]))


def test_one_training_step_with_the_reversible_solver_and_backward():
    pl.seed_everything(0)
    model = _ReversibleDEQ(scheduler="none", log_figures=False, optimizer="sgd", lr=0.1, momentum=0.0)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    data = DataLoader(
        TensorDataset(torch.randn(16, 8, generator=g), torch.randint(0, 10, (16,), generator=g)), batch_size=16
    )
    cb = _Logged()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=1, limit_val_batches=0, callbacks=[cb]).fit(model, data)
    assert len(cb.losses) == 1 and torch.isfinite(torch.tensor(cb.losses[0]))
    moved = [k for k, v in model.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert "deq.model.lin.weight" in moved and "stem.weight" in moved  # the reversible backward reached both
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    solver_keys = [k for k in cb.rows[0] if k.startswith("solver/")]
    assert solver_keys, sorted(cb.rows[0])
    assert cb.rows[0]["solver/train_solves_converged"] == 1.0
