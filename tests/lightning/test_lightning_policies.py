"""deqlab's policies as callbacks, each on its own: they work for any LightningModule, a Trainer's instance
takes precedence over the module's, their state is checkpointed, and the module's code reads no stack frame
and no private Lightning attribute."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_testkit import REPO, trainer

from deqlab.lightning import (
    BackwardStats,
    ExactResume,
    NonFiniteBatchError,
    NonFiniteBatchWarning,
    NonFiniteGuard,
    PhaseTiming,
    PretrainingSchedule,
    find_deq_layers,
)
from deqlab.lightning.resume import CHECKPOINT_KEY
from deqlab.nn import DeepEquilibriumNetwork, DenseDEQBlock
from deqlab.solvers import DiscreteDEQSolver
from deqlab.zoo import DigitsDEQ


def _loader(nan_batch=None, n_batches: int = 4, features: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8 * n_batches, features, generator=g)
    y = torch.randn(8 * n_batches, 1, generator=g)
    if nan_batch is not None:
        x[8 * nan_batch + 2, 1] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=8)


class Plain(pl.LightningModule):
    """No deqlab base class, no DEQ layer: a regression MLP."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)


# ---------------------------------------------------------------------------------------------- NonFiniteGuard
def test_the_guard_keeps_a_nan_batch_of_any_lightning_module_away_from_weights_optimizer_and_buffers():
    pl.seed_everything(0)
    model, guard = Plain(), NonFiniteGuard()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(NonFiniteBatchWarning, match=r"batch 0 .*loss = nan.*input batch itself has NaN/Inf in 1 sample"):
        tr = trainer(max_steps=1, callbacks=[guard])
        tr.fit(model, _loader(nan_batch=0, n_batches=1))
    for k, v in model.state_dict().items():  # BatchNorm's running statistics included
        assert torch.equal(v, before[k]), k
    assert not tr.optimizers[0].state and guard.skipped_batches == 1


def test_the_guard_raises_when_asked_and_refuses_an_unknown_policy():
    with pytest.raises(NonFiniteBatchError, match=r"non-finite training batch 2 \(epoch 0, global step 2\)"):
        trainer(max_epochs=1, callbacks=[NonFiniteGuard("raise")]).fit(Plain(), _loader(nan_batch=2))
    with pytest.raises(ValueError, match="'skip' or 'raise'"):
        NonFiniteGuard("ignore")


def test_a_guard_given_to_the_trainer_takes_precedence_over_the_modules():
    model = DigitsDEQ(width=8, scheduler="none", log_figures=False)  # on_nonfinite="skip"
    mine = NonFiniteGuard("raise")
    tr = trainer(max_epochs=1, limit_val_batches=0, callbacks=[mine])
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    x[20, 0] = float("nan")
    with pytest.raises(NonFiniteBatchError, match="batch 1 "):
        tr.fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    assert [c for c in tr.callbacks if isinstance(c, NonFiniteGuard)] == [mine]


def test_the_skipped_batch_count_is_checkpointed_and_read_from_an_older_checkpoints_entry(tmp_path):
    def fit(root, ckpt=None):
        guard = NonFiniteGuard()
        tr = trainer(
            max_epochs=2,
            enable_checkpointing=True,
            default_root_dir=root,
            callbacks=[
                guard,
                ExactResume(),
                ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1, filename="{step}"),
            ],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr.fit(Plain(), _loader(nan_batch=1), ckpt_path=ckpt)
        return guard

    assert fit(tmp_path / "a").skipped_batches == 2  # batch 1 of each epoch
    ckpt = torch.load(tmp_path / "a" / "step=2.ckpt", weights_only=True)
    assert ckpt["callbacks"]["NonFiniteGuard"] == {"skipped_batches": 1}
    assert fit(tmp_path / "b", tmp_path / "a" / "step=2.ckpt").skipped_batches == 2
    # a checkpoint of deqlab before the guard kept the count in its own entry
    del ckpt["callbacks"]["NonFiniteGuard"]
    ckpt.setdefault(CHECKPOINT_KEY, {})["skipped_batches"] = 7
    torch.save(ckpt, tmp_path / "old.ckpt")
    assert fit(tmp_path / "c", tmp_path / "old.ckpt").skipped_batches == 8


# ---------------------------------------------------------------------------------------------- PretrainingSchedule
class PlainDEQ(pl.LightningModule):
    """A LightningModule of one's own with a deqlab DEQ layer."""

    def __init__(self):
        super().__init__()
        self.deq = DeepEquilibriumNetwork(DenseDEQBlock(4), DiscreteDEQSolver("anderson", max_steps=20))
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        z, _ = self.deq(x)
        return self.head(z)

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.mse_loss(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _Depths(pl.Callback):
    """Listed after the schedule: its epoch-end hooks run after the schedule's."""

    def __init__(self):
        self.train, self.val_end = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train.append(find_deq_layers(pl_module)[0].fixed_depth)

    def on_validation_epoch_end(self, trainer, pl_module):
        self.val_end.append(find_deq_layers(pl_module)[0].fixed_depth)


def test_the_schedule_drives_any_modules_deq_layers_and_every_evaluation_callback_sees_the_solver():
    depths = _Depths()
    tr = trainer(max_epochs=2, limit_val_batches=1, callbacks=[PretrainingSchedule(steps=6, depth=2), depths])
    model = PlainDEQ()
    tr.fit(model, _loader(), _loader())
    assert depths.train == [2] * 6 + [0] * 2
    assert depths.val_end == [0, 0]  # the solver until on_validation_end (also in epoch 0, while pretraining)
    assert float(tr.logged_metrics["train/pretraining"]) == 0.0


def test_the_schedule_refuses_bad_settings_and_pretraining_without_a_deq_layer():
    with pytest.raises(ValueError, match="steps >= 0 and depth >= 1"):
        PretrainingSchedule(steps=1, depth=0)
    with pytest.raises(RuntimeError, match="Plain has no DEQ layer"):
        trainer(max_steps=1, callbacks=[PretrainingSchedule(steps=1)]).fit(Plain(), _loader())
    trainer(max_steps=1, callbacks=[PretrainingSchedule()]).fit(Plain(), _loader())  # steps=0: nothing to drive


# ---------------------------------------------------------------------------------------------- timing, backward stats
class _Logged(pl.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.logged_metrics.items()})


def test_phase_timing_logs_each_phase_of_any_module_and_removes_its_optimizer_hooks():
    timing, logged = PhaseTiming(), _Logged()
    tr = trainer(max_epochs=1, callbacks=[logged, timing])
    tr.fit(Plain(), _loader())
    assert all({"time/backward", "time/optimizer"} <= set(row) for row in logged.rows)
    assert "time/train_epoch" in tr.logged_metrics
    assert not timing._hooks  # the optimizer's step post-hooks are gone after fit
    before = dict(timing.timer.last)
    tr.optimizers[0].step()  # a step outside training is not timed
    assert timing.timer.last == before


def test_backward_stats_fill_the_record_also_when_not_logging():
    records = []

    class _Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            records.append(outputs["deq"].backward_nfe)

    model = DigitsDEQ(width=8, scheduler="none", log_figures=False, log_solver_stats=False)
    assert any(isinstance(c, BackwardStats) and not c.log_scalars for c in model.configure_callbacks())
    tr = trainer(max_steps=2, limit_val_batches=0, callbacks=[_Record()])
    tr.fit(model, DataLoader(TensorDataset(torch.randn(32, 64), torch.randint(0, 10, (32,))), batch_size=16))
    assert len(records) == 2 and all(r is not None and r >= 1 for r in records)
    assert "solver/train_backward_nfe" not in tr.logged_metrics


# ---------------------------------------------------------------------------------------------- old names, the code
@pytest.mark.parametrize(
    "name, home",
    [
        ("NonFiniteBatchError", "deqlab.lightning.nonfinite"),
        ("NonFiniteBatchWarning", "deqlab.lightning.nonfinite"),
        ("HPARAM_METRICS", "deqlab.lightning.hparams"),
        ("CHECKPOINT_KEY", "deqlab.lightning.resume"),
    ],
)
def test_names_that_left_the_module_warn_naming_their_new_home(name, home):
    import importlib

    import deqlab.lightning.module as module

    with pytest.warns(DeprecationWarning, match=rf"deqlab.lightning.module: {name} is deprecated; use {home}.{name}"):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(home), name)


def _lightning_sources():
    return sorted((REPO / "deqlab" / "lightning").glob("*.py"))


@pytest.mark.parametrize("path", _lightning_sources(), ids=lambda p: p.name)
def test_the_lightning_layer_reads_no_frame_and_no_private_attribute_of_another_object(path: Path):
    tree = ast.parse(path.read_text())
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr in ("currentframe", "_getframe", "getouterframes", "f_back", "f_locals", "f_globals") or (
                node.attr == "stack" and isinstance(node.value, ast.Name) and node.value.id == "inspect"
            ):
                problems.append(f"line {node.lineno}: {ast.unparse(node)} reads a stack frame")
            elif (
                node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                problems.append(f"line {node.lineno}: {ast.unparse(node)} is another object's private attribute")
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("pytorch_lightning", "lightning")):
            problems += [
                f"line {node.lineno}: imports Lightning's private {a.name}"
                for a in node.names
                if a.name.startswith("_")
            ]
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def test_the_module_defines_no_lightning_hook_a_policy_depends_on():
    # a policy in a module hook is lost by an override without super(): the module keeps its step and nothing else
    from deqlab.lightning import DEQLightningModule

    hooks = {
        "on_train_batch_start",
        "on_before_backward",
        "on_after_backward",
        "on_before_optimizer_step",
        "optimizer_step",
        "on_train_epoch_start",
        "on_train_epoch_end",
        "on_validation_start",
        "on_validation_end",
        "on_validation_epoch_start",
        "on_validation_epoch_end",
        "on_test_start",
        "on_test_end",
        "on_test_epoch_start",
        "on_test_epoch_end",
        "on_fit_start",
        "on_train_start",
        "on_save_checkpoint",
        "on_load_checkpoint",
        "setup",
    }
    assert not hooks & set(vars(DEQLightningModule)), sorted(hooks & set(vars(DEQLightningModule)))
    lines = len((REPO / "deqlab" / "lightning" / "module.py").read_text().splitlines())
    # 490 in ruff format's layout (one argument a line in a long call); it was 450 before the code was formatted
    assert lines <= 490, f"module.py has {lines} lines: give a new job its own module (a callback for a policy)"
