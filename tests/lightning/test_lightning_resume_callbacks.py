"""deqlab's checkpoint policies as Lightning callbacks (deqlab.lightning.resume): they run whatever a module
overrides, work for any LightningModule, and say so when a resume cannot be exact."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

from lightning_testkit import digits, trainer

from deqlab.lightning import CheckpointIntegrity, ExactResume, PolicyWarning, ResumeWarning
from deqlab.lightning.checkpoint import CheckpointDamagedError
from deqlab.lightning.resume import CHECKPOINT_KEY, CheckedCheckpointIO, _loader_states
from deqlab.zoo import DigitsDEQ


def _digits_model(cls=DigitsDEQ, **kwargs):
    return cls(
        model_type="skip",
        width=10,
        jacobian_regularization=True,
        jacobian_loss_weight=0.2,
        scheduler="cosine",
        log_figures=False,
        **kwargs,
    )


def _fit(root: Path, model, data: dict, ckpt_path=None, every: int = 2, **overrides):
    options = dict(
        max_epochs=2,
        limit_train_batches=4,
        limit_val_batches=0,
        deterministic=True,
        enable_checkpointing=True,
        default_root_dir=root,
        callbacks=[ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1, filename="{step}")],
    )
    options.update(overrides)
    tr = trainer(**options)
    tr.fit(model, **data, ckpt_path=ckpt_path)
    return tr


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---------------------------------------------------------------------------------------------- a plain LightningModule
class Tiny(pl.LightningModule):
    """No deqlab base class: dropout draws from the global RNG, the loader is the user's plain DataLoader."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _tiny_data(**loader_options):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g))
    return {"train_dataloaders": DataLoader(data, batch_size=8, **loader_options)}


def test_exact_resume_works_for_any_lightning_module(tmp_path):
    def run(root, ckpt=None, callbacks=()):
        pl.seed_everything(0)
        model = Tiny()
        _fit(
            root,
            model,
            _tiny_data(shuffle=True),
            ckpt,
            every=3,
            callbacks=[
                ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1, filename="{step}"),
                *callbacks,
            ],
        )
        return model

    straight = run(tmp_path / "a", callbacks=[ExactResume()])
    assert _same(straight, run(tmp_path / "b", tmp_path / "a" / "step=6.ckpt", callbacks=[ExactResume()]))
    # without the callback (no RNG states, the epoch restarts with another shuffle) the same resume drifts
    with pytest.warns(UserWarning):  # Lightning's own "resuming mid-epoch ... unreliable" warning
        assert not _same(straight, run(tmp_path / "c", tmp_path / "a" / "step=6.ckpt"))


def test_checkpoint_integrity_checks_the_file_for_any_lightning_module(tmp_path):
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes(b"PK\x03\x04 half a checkpoint")
    with pytest.raises(CheckpointDamagedError, match=r"cut\.ckpt.*damaged"):
        _fit(tmp_path, Tiny(), _tiny_data(), ckpt_path=bad, callbacks=[CheckpointIntegrity()])


def test_checkpoint_integrity_wraps_the_strategys_plugin_once_and_saves_through_it(tmp_path):
    tr = _fit(tmp_path, Tiny(), _tiny_data(), max_epochs=1, callbacks=[CheckpointIntegrity()])
    io = tr.strategy.checkpoint_io
    assert isinstance(io, CheckedCheckpointIO) and not isinstance(io.inner, CheckedCheckpointIO)
    CheckpointIntegrity().setup(tr, tr.lightning_module, "fit")  # a second fit: not wrapped twice
    assert tr.strategy.checkpoint_io is io
    tr.save_checkpoint(tmp_path / "saved.ckpt")
    assert "state_dict" in torch.load(tmp_path / "saved.ckpt", weights_only=True)


# ---------------------------------------------------------------------------------------------- DEQLightningModule
def test_the_module_attaches_both_policies_and_a_trainer_instance_takes_precedence(tmp_path):
    model = _digits_model()
    mine = ExactResume()
    tr = _fit(tmp_path, model, {"datamodule": digits(batch_size=32, flatten=True)}, max_epochs=1, callbacks=[mine])
    assert [c for c in tr.callbacks if isinstance(c, ExactResume)] == [mine]
    assert sum(isinstance(c, CheckpointIntegrity) for c in tr.callbacks) == 1


class DropsPolicies(DigitsDEQ):
    def configure_callbacks(self):
        return []  # no super(): deqlab's policies are gone


def test_a_configure_callbacks_override_without_super_is_reported(tmp_path):
    with pytest.warns(
        PolicyWarning,
        match=r"DropsPolicies trains without deqlab's .*CheckpointIntegrity and ExactResume "
        r"callback\(s\).*super\(\).configure_callbacks\(\)",
    ):
        _fit(tmp_path, _digits_model(DropsPolicies), {"datamodule": digits(batch_size=32, flatten=True)}, max_epochs=1)


def test_resuming_from_a_checkpoint_without_deqlabs_entry_warns(tmp_path):
    _fit(tmp_path / "a", _digits_model(), {"datamodule": digits(batch_size=32, flatten=True)})
    ckpt = torch.load(tmp_path / "a" / "step=2.ckpt", weights_only=False)
    del ckpt[CHECKPOINT_KEY]
    torch.save(ckpt, tmp_path / "foreign.ckpt")
    with pytest.warns(ResumeWarning, match=r"foreign\.ckpt' has no deqlab entry.*differ from an uninterrupted run"):
        _fit(
            tmp_path / "b",
            _digits_model(),
            {"datamodule": digits(batch_size=32, flatten=True)},
            ckpt_path=tmp_path / "foreign.ckpt",
        )


def test_a_loader_deqlab_cannot_position_is_named_at_resume(tmp_path):
    def data():
        dm = digits(batch_size=32, flatten=True)
        dm.setup("fit")
        sampler = SubsetRandomSampler(range(200), generator=torch.Generator().manual_seed(0))
        return {"train_dataloaders": DataLoader(dm.train_set, batch_size=32, sampler=sampler)}

    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)  # saving warns about nothing
        _fit(tmp_path / "a", _digits_model(), data())
    with pytest.warns(ResumeWarning, match=r"sampler=SubsetRandomSampler.*StatefulDataLoader"):
        _fit(tmp_path / "b", _digits_model(), data(), ckpt_path=tmp_path / "a" / "step=2.ckpt")


def test_a_stateful_loader_shuffled_by_generator_history_warns_at_an_epoch_boundary(tmp_path):
    # torchdata's StatefulDataLoader(shuffle=True): exact mid-epoch (Lightning restores its position), but at an
    # epoch boundary Lightning restores nothing and its generator starts over
    _fit(tmp_path / "a", _digits_model(), _stateful_plain_loader())
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        _fit(tmp_path / "b", _digits_model(), _stateful_plain_loader(), ckpt_path=tmp_path / "a" / "step=2.ckpt")
    with pytest.warns(ResumeWarning, match=r"epoch boundary.*StatefulDataLoader.*EpochSeededSampler"):
        _fit(tmp_path / "c", _digits_model(), _stateful_plain_loader(), ckpt_path=tmp_path / "a" / "step=4.ckpt")


def test_a_stateful_loader_whose_order_needs_set_epoch_warns_when_resumed_after_epoch_0(tmp_path):
    # a StatefulDataLoader makes its iterator (and with it the order of a DistributedSampler, what Lightning puts
    # in under DDP) when Lightning sets the data up, before set_epoch: resumed in epoch 1 it follows epoch 0's order
    from torchdata.stateful_dataloader import StatefulDataLoader

    def data(loader_class=StatefulDataLoader):
        dm = digits(batch_size=32, seed=3, flatten=True)
        dm.setup("fit")
        sampler = torch.utils.data.DistributedSampler(dm.train_set, num_replicas=1, rank=0, seed=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchdata's set_vital deprecation
            return {"train_dataloaders": loader_class(dm.train_set, batch_size=32, sampler=sampler)}

    def run(root, ckpt=None, loader_class=StatefulDataLoader):
        pl.seed_everything(5)
        model = _digits_model()
        _fit(root, model, data(loader_class), ckpt_path=ckpt)
        return model

    straight = run(tmp_path / "a")
    with pytest.warns(ResumeWarning, match=r"in epoch 1.*set_epoch.*ResumableDataLoader"):
        assert not _same(straight, run(tmp_path / "b", tmp_path / "a" / "step=6.ckpt"))
    from deqlab.data import ResumableDataLoader

    straight = run(tmp_path / "c", loader_class=ResumableDataLoader)  # the same loader, iterator made late: exact
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        assert _same(straight, run(tmp_path / "d", tmp_path / "c" / "step=6.ckpt", loader_class=ResumableDataLoader))


def test_a_sampler_lightning_wrapped_for_ddp_warns_at_resume(tmp_path):
    # under DDP Lightning wraps a sampler that is no Random/SequentialSampler in a DistributedSamplerWrapper (here
    # built by hand, one process): the wrapped sampler's generator is in no checkpoint
    from lightning_fabric.utilities.distributed import DistributedSamplerWrapper
    from torchdata.stateful_dataloader import StatefulDataLoader
    from torchdata.stateful_dataloader.sampler import RandomSampler as StatefulRandomSampler

    def data():
        dm = digits(batch_size=32, seed=3, flatten=True)
        dm.setup("fit")
        inner = StatefulRandomSampler(dm.train_set, generator=torch.Generator().manual_seed(0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchdata's set_vital deprecation
            return {
                "train_dataloaders": StatefulDataLoader(
                    dm.train_set, batch_size=32, sampler=DistributedSamplerWrapper(inner, num_replicas=1, rank=0)
                )
            }

    _fit(tmp_path / "a", _digits_model(), data())
    with pytest.warns(ResumeWarning, match=r"wrapped by Lightning for DDP.*EpochSeededSampler"):
        _fit(tmp_path / "b", _digits_model(), data(), ckpt_path=tmp_path / "a" / "step=2.ckpt")


# ---------------------------------------------------------------------------------------------- Lightning issue 20550
class OneCycle(DigitsDEQ):
    """The pattern of Lightning's documentation: the total steps asked in configure_optimizers."""

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-3)
        total = self.trainer.estimated_stepping_batches  # sets the data up before the checkpoint is restored
        return {
            "optimizer": opt,
            "lr_scheduler": {
                "scheduler": torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=total),
                "interval": "step",
            },
        }


def _stateful_plain_loader():
    from torchdata.stateful_dataloader import StatefulDataLoader

    dm = digits(batch_size=32, seed=3, flatten=True)
    dm.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchdata's own set_vital deprecation
        return {
            "train_dataloaders": StatefulDataLoader(
                dm.train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1)
            )
        }


def _one_cycle_run(root: Path, data, ckpt=None):
    pl.seed_everything(5)
    model = _digits_model(OneCycle)
    _fit(root, model, data(), ckpt_path=ckpt)
    return model


def test_early_data_setup_deqlabs_loader_still_gets_its_position(tmp_path):
    data = lambda: {"datamodule": digits(batch_size=32, seed=3, flatten=True)}  # noqa: E731
    straight = _one_cycle_run(tmp_path / "a", data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        assert _same(straight, _one_cycle_run(tmp_path / "b", data, tmp_path / "a" / "step=6.ckpt"))


def test_early_data_setup_drops_a_stateful_loaders_position_in_lightning_2_6_and_deqlab_says_so(tmp_path):
    straight = _one_cycle_run(tmp_path / "a", _stateful_plain_loader)
    with pytest.warns(ResumeWarning, match=r"Lightning did not hand the training loader StatefulDataLoader.*20550"):
        resumed = _one_cycle_run(tmp_path / "b", _stateful_plain_loader, tmp_path / "a" / "step=6.ckpt")
    # If this fails, Lightning now hands the position over after an early setup (issue 20550 fixed): drop the
    # warning in ExactResume._hand_over_position for the fixed Lightning versions.
    assert not _same(straight, resumed), "Lightning now restores the loader position after an early data setup"


def test_lightning_keeps_loader_positions_where_deqlab_reads_them(tmp_path):
    # the one place deqlab reads Lightning's checkpoint layout (resume._loader_states): fails when Lightning moves it
    _fit(tmp_path, _digits_model(), {"datamodule": digits(batch_size=32, flatten=True)}, max_epochs=1)
    states = _loader_states(torch.load(tmp_path / "step=2.ckpt", weights_only=True))
    assert states is not None and len(states) == 1, "Lightning moved the training loader positions in its checkpoint"
    assert states[0]["_sampler_iter_state"]["sampler_state"] == {"yielded": 64, "epoch": 0}
