"""TensorBoard output: scalars by group, NFE histograms, the convergence figure, the HParams tab."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_testkit import digits, trainer

from deqlab.zoo import DigitsDEQ


def _events(log_dir):
    files = sorted(log_dir.rglob("events.out.tfevents*"))
    assert files, f"no event files under {log_dir}"
    accs = []
    for f in files:
        ea = EventAccumulator(str(f), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
        ea.Reload()
        accs.append(ea)
    return accs


def test_training_writes_scalars_histograms_figures_and_hparams(tmp_path):
    pl.seed_everything(0)
    model = DigitsDEQ(model_type="skip", width=16, scheduler="none", pretrain_steps=2)
    logger = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    tr = trainer(logger=logger, max_epochs=2, limit_train_batches=3, limit_val_batches=2)
    tr.fit(model, digits(batch_size=32, flatten=True))

    accs = _events(tmp_path / "tb")
    scalars = set().union(*(a.Tags()["scalars"] for a in accs))
    histograms = set().union(*(a.Tags()["histograms"] for a in accs))
    images = set().union(*(a.Tags()["images"] for a in accs))
    for tag in (
        "train/loss",
        "train/task_loss",
        "train/skip_loss",
        "train/jacobian_loss",
        "train/accuracy",
        "train/pretraining",
        "val/loss",
        "val/accuracy",
        "val/explicit_accuracy",
        "val/explicit_time",
        "solver/train_nfe",
        "solver/train_backward_nfe",
        "solver/val_nfe",
        "solver/val_abs_residual_mean",
        "solver/train_reference_nfe",
        "solver/val_reference_nfe",
        "solver/val_abs_residual_max",
        "solver/val_samples_converged",
        "time/forward",
        "time/backward",
        "time/optimizer",
        "time/val_forward",
        "time/train_epoch",
        "hp/val_accuracy",
        "hp/val_nfe",
    ):
        assert tag in scalars, tag
    assert {"solver/nfe_hist", "solver/val_nfe_hist"} <= histograms
    assert {"solver/convergence", "solver/fixed_point"} <= images
    assert any(a.PluginTagToContent("hparams") for a in accs), "no HParams summary written"
    # pretraining flag: 1 for the first two steps, then 0
    flags = [
        e.value for a in accs if "train/pretraining" in a.Tags()["scalars"] for e in a.Scalars("train/pretraining")
    ]
    assert flags[:2] == [1.0, 1.0] and flags[2:] and set(flags[2:]) == {0.0}
    # the NFE histogram holds one value per training batch of the epoch
    hist = [h for a in accs if "solver/nfe_hist" in a.Tags()["histograms"] for h in a.Histograms("solver/nfe_hist")]
    assert hist and hist[0].histogram_value.num == 3

    def values(tag):
        return [e.value for a in accs if tag in a.Tags()["scalars"] for e in a.Scalars(tag)]

    # the paper's count beside ours: an L-Broyden solve of k iterations is k + 1 evaluations, k + 2 as
    # DeepEquilibriumNetworks.jl counted (deqlab.solvers.counting); pretraining steps are exactly the depth
    ours, paper = values("solver/val_nfe"), values("solver/val_reference_nfe")
    assert ours and len(ours) == len(paper) and all(p > o for o, p in zip(ours, paper))
    trained, counted = values("solver/train_nfe"), values("solver/train_reference_nfe")
    assert trained[:2] == counted[:2] == [5.0, 5.0]


def test_figures_can_be_switched_off(tmp_path):
    pl.seed_everything(0)
    model = DigitsDEQ(model_type="vanilla", width=8, scheduler="none", log_figures=False)
    # deqlab's policies, no figure callbacks
    names = [type(c).__name__ for c in model.configure_callbacks()]
    assert "CheckpointIntegrity" in names and "ExactResume" in names
    assert "NFEHistogram" not in names and "ConvergenceFigure" not in names
    logger = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    trainer(logger=logger, max_epochs=1, limit_train_batches=2, limit_val_batches=1).fit(model, digits(batch_size=32))
    accs = _events(tmp_path / "tb")
    assert not set().union(*(a.Tags()["images"] for a in accs))


def test_the_figures_are_readable_pictures(tmp_path):
    # what a user opens in TensorBoard's image tab: rendered large, with axes, a colour bar, the tolerance
    import io

    import numpy as np
    import torch
    from PIL import Image

    from deqlab.lightning.callbacks import convergence_figure, fixed_point_figure

    def rendered(fig):
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        img = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        (tmp_path / f"fig{len(list(tmp_path.iterdir()))}.png").write_bytes(buf.getvalue())
        return img

    trace = torch.logspace(0, -4, 30)[:, None] * torch.linspace(1, 3, 8)[None]
    fig = convergence_figure(trace, title="epoch 3", tol=5e-3, objective="relative residual ||f(z) - z|| / ||f(z)||")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and "relative residual" in ax.get_ylabel()
    assert any(line.get_label().startswith("tolerance 0.005") for line in ax.get_lines())
    img = rendered(fig)
    assert img.shape[0] >= 380 and img.shape[1] >= 600 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50
    for z, shape_min in ((torch.randn(16, 128), (240, 590)), (torch.randn(4, 8, 14, 14), (270, 390))):
        fig = fixed_point_figure(z, title="z*")
        labels = [a.get_xlabel() or a.get_ylabel() for a in fig.axes]
        assert any(labels) and any(a.get_label() == "<colorbar>" for a in fig.axes)
        img = rendered(fig)
        assert img.shape[0] >= shape_min[0] and img.shape[1] >= shape_min[1], img.shape
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # a heat map, not a flat grey square


def test_spectral_radius_reaches_tensorboard_when_a_layer_estimates_it(tmp_path):
    # the user's switch is on the layer (spectral_radius="eval", as torchdeq's sradius_mode): the module
    # logs solver/val_spectral_radius_mean/max from a real fit, and nothing for training batches
    pl.seed_everything(0)
    model = DigitsDEQ(model_type="vanilla", width=8, scheduler="none", log_figures=False)
    model.deq.spectral_radius_mode, model.deq.spectral_radius_iters = "eval", 5
    logger = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    trainer(logger=logger, max_epochs=1, limit_train_batches=2, limit_val_batches=2).fit(model, digits(batch_size=32))
    accs = _events(tmp_path / "tb")
    scalars = set().union(*(a.Tags()["scalars"] for a in accs))
    assert {"solver/val_spectral_radius_mean", "solver/val_spectral_radius_max"} <= scalars
    assert not any(t.startswith("solver/train_spectral_radius") for t in scalars)
    mean = [e.value for a in accs if "solver/val_spectral_radius_mean" in a.Tags()["scalars"]
            for e in a.Scalars("solver/val_spectral_radius_mean")]  # fmt: skip
    top = [e.value for a in accs if "solver/val_spectral_radius_max" in a.Tags()["scalars"]
           for e in a.Scalars("solver/val_spectral_radius_max")]  # fmt: skip
    # a converging dense DEQ: a contraction at z*, the max over the batches at least their mean
    assert mean and top and all(0.0 < m <= t < 1.5 for m, t in zip(mean, top))
