"""Failed solves are never silent in training: a non-finite batch never reaches the weights (skip policy,
counted and warned about once with batch index and solver status; or raise), the input is blamed for a
NaN that came from the input, and solver statuses / unconverged fractions are logged."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_testkit import trainer

from deqlab.lightning import DEQLightningModule, NonFiniteBatchError, NonFiniteBatchWarning, NonFiniteGuard
from deqlab.nn import DeepEquilibriumNetwork, ImplicitBackward
from deqlab.solvers import DiscreteDEQSolver
from deqlab.zoo import DigitsDEQ


def _skipped(model) -> int:
    """The skipped-batch count of the guard that trained ``model``."""
    return NonFiniteGuard.of(model.trainer).skipped_batches


def _loader(nan_batch: int = 1, batch_size: int = 16, n_batches: int = 4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size * n_batches, 64, generator=g)
    y = torch.randint(0, 10, (batch_size * n_batches,), generator=g)
    if nan_batch is not None:
        x[nan_batch * batch_size + 4, 3] = float("nan")  # one pixel of one sample of one batch
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class _Logged(pl.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        row = {k: float(v) for k, v in trainer.logged_metrics.items()}
        row["skipped"] = outputs["deq"].skipped
        self.rows.append(row)


@pytest.mark.parametrize("model_type", ["vanilla", "skip"])
def test_one_nan_pixel_skips_that_batch_and_never_poisons_the_weights(model_type):
    pl.seed_everything(0)
    model = DigitsDEQ(model_type=model_type, width=8, scheduler="none", log_figures=False)
    cb = _Logged()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=1, limit_val_batches=0, callbacks=[cb]).fit(model, _loader(nan_batch=1))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), "NaN reached the weights"
    assert [r["skipped"] for r in cb.rows] == [False, True, False, False]
    assert [r["train/skipped_batches"] for r in cb.rows] == [0.0, 1.0, 1.0, 1.0]
    ours = [w for w in caught if issubclass(w.category, NonFiniteBatchWarning)]
    assert len(ours) == 1
    text = str(ours[0].message)
    assert "batch 1" in text and "solver status" in text and "input batch itself" in text
    assert "shortcut" not in text and "initial guess" not in text  # the data is blamed, not the Skip predictor


def test_skipped_batch_leaves_weights_and_optimizer_state_untouched():
    pl.seed_everything(0)
    model = DigitsDEQ(model_type="vanilla", width=8, scheduler="none", log_figures=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = trainer(max_steps=1, limit_val_batches=0)
        tr.fit(model, _loader(nan_batch=0, n_batches=1))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not tr.optimizers[0].state  # AdamW never saw a gradient


def test_raise_policy_stops_at_once_with_the_same_information():
    pl.seed_everything(0)
    model = DigitsDEQ(model_type="vanilla", width=8, scheduler="none", on_nonfinite="raise", log_figures=False)
    with pytest.raises(NonFiniteBatchError) as err:
        trainer(max_epochs=1, limit_val_batches=0).fit(model, _loader(nan_batch=2))
    text = str(err.value)
    assert "batch 2" in text and "solver status: " in text and "input batch itself" in text
    assert model.global_step == 2 and all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_a_nan_made_by_the_model_is_skipped_and_not_blamed_on_the_input():
    class _NaNLoss(DigitsDEQ):
        def extra_losses(self, batch, output, solutions, stage):
            bad = stage == "train" and self.global_step == 1
            return {"probe": output.mean() * (float("nan") if bad else 0.0)}

    pl.seed_everything(0)
    model = _NaNLoss(model_type="vanilla", width=8, scheduler="none", log_figures=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=1, limit_val_batches=0).fit(model, _loader(nan_batch=None))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert _skipped(model) == 1
    text = str(next(w for w in caught if issubclass(w.category, NonFiniteBatchWarning)).message)
    assert "batch 1" in text and "loss = nan" in text and "input, u0 and z* are finite" in text


class _Affine(nn.Module):
    """f(z, x) = a·z + x with a learnable scalar a (a = 2: a fixed point exists, the iteration diverges)."""

    def __init__(self, a: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, z, x):
        return self.a * z + x


class _AffineDEQ(DEQLightningModule):
    def __init__(self, a: float = 2.0, max_steps: int = 20, **kwargs):
        super().__init__(**kwargs)
        self.stem = nn.Linear(64, 4)
        solver = DiscreteDEQSolver(
            "fixed_point", mode="abs_norm", abstol_termination=1e-6, reltol_termination=1e-6, max_steps=max_steps
        )
        self.deq = DeepEquilibriumNetwork(_Affine(a), solver, backward=ImplicitBackward(tol=1e-6, max_steps=5))
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        z, solution = self.deq(self.stem(x))
        return self.head(z), solution


def test_solver_status_counts_and_unconverged_fractions_are_logged():
    pl.seed_everything(0)
    model = _AffineDEQ(a=2.0, scheduler="none", log_figures=False, optimizer="sgd", lr=0.0, momentum=0.0)
    cb = _Logged()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=1, limit_val_batches=0, callbacks=[cb]).fit(model, _loader(nan_batch=None, n_batches=1))
    row = cb.rows[0]
    counts = {s: row[f"solver/train_solves_{s}"] for s in ("converged", "max_steps", "diverged", "nonfinite")}
    assert sum(counts.values()) == 1.0
    assert counts["converged"] == 0.0  # f = 2z + x never converges under fixed-point iteration
    assert row["solver/train_samples_unconverged"] == 1.0
    # a map that runs away is logged as diverged, not as an exhausted step budget
    assert counts["diverged"] == 1.0 and counts["max_steps"] == 0.0


def test_stalled_samples_are_logged_as_stalled_not_converged():
    # f = 0.995 z + x under fixed-point iteration in rel_deq_default: the patience rule stops every sample
    # at ~3e-3 for a tolerance of 1e-3. Old: solver/train_samples_converged 1.0 and status_converged 1.
    class _Stalling(_AffineDEQ):
        def __init__(self, **kwargs):
            super().__init__(a=0.995, **kwargs)
            solver = DiscreteDEQSolver("fixed_point", mode="rel_deq_default", reltol_termination=1e-3, max_steps=1000)
            self.deq = DeepEquilibriumNetwork(_Affine(0.995), solver, backward=ImplicitBackward(tol=1e-6))

    pl.seed_everything(0)
    model = _Stalling(scheduler="none", log_figures=False, optimizer="sgd", lr=0.0, momentum=0.0)
    cb = _Logged()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=1, limit_val_batches=0, callbacks=[cb]).fit(model, _loader(nan_batch=None, n_batches=1))
    row = cb.rows[0]
    assert row["solver/train_samples_converged"] == 0.0 and row["solver/train_samples_stalled"] == 1.0
    assert row["solver/train_samples_unconverged"] == 1.0  # stalled samples are among the unconverged
    assert row["solver/train_solves_stalled"] == 1.0 and row["solver/train_solves_converged"] == 0.0


@pytest.mark.parametrize("a", [0.5, 2.0])
def test_sample_and_solve_counters_agree_on_one_run(a):
    # a = 0.5 converges (0.5^80 leaves no residual), a = 2 runs away: whichever, the counters that describe one
    # solve must tell one story
    pl.seed_everything(0)
    model = _AffineDEQ(a=a, max_steps=80, scheduler="none", log_figures=False, optimizer="sgd", lr=0.0, momentum=0.0)
    cb = _Logged()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=1, limit_val_batches=0, callbacks=[cb]).fit(model, _loader(nan_batch=None, n_batches=1))
    row = cb.rows[0]
    solves = [row[f"solver/train_solves_{s}"] for s in ("converged", "stalled", "max_steps", "diverged", "nonfinite")]
    assert sum(solves) == pytest.approx(1.0)
    all_converged = row["solver/train_samples_converged"] == 1.0
    assert all_converged == (row["solver/train_solves_converged"] == 1.0) == (a == 0.5)
    assert row["solver/train_samples_converged"] + row["solver/train_samples_unconverged"] == pytest.approx(1.0)
    # the objective the stopping test used sits below its tolerance exactly when every sample converged
    assert (row["solver/train_objective_max"] <= row["solver/train_tolerance"]) == all_converged


@pytest.mark.parametrize("a, expected", [(0.5, 0.0), (1.0, 1.0)])
def test_backward_unconverged_fraction_is_logged_from_the_record(a, expected):
    # a = 0.5: a contraction, the adjoint converges; a = 1: (1 - a) g = v is singular, it cannot
    pl.seed_everything(0)
    model = _AffineDEQ(a=a, scheduler="none", log_figures=False, optimizer="sgd", lr=0.0, momentum=0.0)
    cb = _Logged()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=1, limit_val_batches=0, callbacks=[cb]).fit(model, _loader(nan_batch=None, n_batches=1))
    assert cb.rows[0]["solver/train_backward_samples_unconverged"] == expected


# ---------------------------------------------------------------- gradient accumulation, buffers, logs
def _fit_quiet(model, loader, **overrides):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=1, limit_val_batches=0, **overrides).fit(model, loader)
    return [str(w.message) for w in caught if issubclass(w.category, NonFiniteBatchWarning)]


def _digits(**kwargs):
    return DigitsDEQ(model_type="vanilla", width=8, scheduler="none", log_figures=False, **kwargs)


@pytest.mark.parametrize("nan_batch", [0, 1])
def test_accumulation_drops_the_whole_window_of_a_nan_micro_batch(nan_batch):
    # batches 0-1 form the first accumulation window; batch 0 does not step: its NaN must not go unseen
    pl.seed_everything(0)
    model = _digits()
    messages = _fit_quiet(model, _loader(nan_batch=nan_batch), accumulate_grad_batches=2)
    assert _skipped(model) == 1
    assert len(messages) == 1
    text = messages[0]
    assert f"batch {nan_batch} " in text and "solver status" in text and "input batch itself" in text
    assert "batches 0-1" in text and f"non-finite batches: batch {nan_batch} (solver status: " in text
    # oracle: the dropped window leaves the model as if only the second window (batches 2-3) had been trained
    pl.seed_everything(0)
    oracle = _digits()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 64, generator=g), torch.randint(0, 10, (64,), generator=g)
    _fit_quiet(oracle, DataLoader(TensorDataset(x[32:], y[32:]), batch_size=16), accumulate_grad_batches=2)
    for (name, a), b in zip(model.named_parameters(), oracle.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-7), f"{name}: max |dw| = {(a - b).abs().max()}"


def test_accumulation_raise_policy_stops_at_the_micro_batch_that_does_not_step():
    pl.seed_everything(0)
    model = _digits(on_nonfinite="raise")
    with pytest.raises(NonFiniteBatchError, match=r"batch 0 .*solver status: .*input batch itself"):
        trainer(max_epochs=1, limit_val_batches=0, accumulate_grad_batches=2).fit(model, _loader(nan_batch=0))
    assert model.global_step == 0


class _ManualDigits(DigitsDEQ):
    """Manual optimisation: the non-finite policy runs after each manual_backward."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        out = super().training_step(batch, batch_idx)
        self.manual_backward(out["loss"])
        opt.step()
        return out


class _NaNAtStep1(DigitsDEQ):
    """A NaN made by the model (not the data) in the loss of the batch at global step 1."""

    def extra_losses(self, batch, output, solutions, stage):
        bad = stage == "train" and self.global_step == 1
        return {"probe": output.mean() * (float("nan") if bad else 0.0)}


def test_manual_optimisation_is_guarded_too():
    pl.seed_everything(0)
    model = _ManualDigits(model_type="vanilla", width=8, scheduler="none", log_figures=False)
    messages = _fit_quiet(model, _loader(nan_batch=1))
    assert _skipped(model) == 1 and len(messages) == 1 and "batch 1 " in messages[0]

    class _ManualNaN(_ManualDigits, _NaNAtStep1):
        pass

    pl.seed_everything(0)
    model = _ManualNaN(model_type="vanilla", width=8, scheduler="none", log_figures=False)
    messages = _fit_quiet(model, _loader(nan_batch=None))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), "manual optimisation trained on NaN"
    assert _skipped(model) == 1 and "loss = nan" in messages[0]


class _BatchNormDEQ(DEQLightningModule):
    """A BatchNorm before the DEQ; at global step 1 the stem overflows (a model-made Inf)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stem = nn.Linear(64, 8)
        self.bn = nn.BatchNorm1d(8)
        self.deq = DeepEquilibriumNetwork(_Affine(0.5), DiscreteDEQSolver("fixed_point", max_steps=30))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        h = self.stem(x)
        if self.training and self.global_step == 1:
            h = h * float("inf")
        z, solution = self.deq(self.bn(h))
        return self.head(z), solution


def test_a_skipped_batch_leaves_the_batchnorm_statistics_as_they_were():
    seen = {}

    class _Buffers(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[("before", batch_idx)] = {k: v.clone() for k, v in pl_module.named_buffers()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[("after", batch_idx)] = {k: v.clone() for k, v in pl_module.named_buffers()}

    pl.seed_everything(0)
    model = _BatchNormDEQ(scheduler="none", log_figures=False)
    _fit_quiet(model, _loader(nan_batch=None), callbacks=[_Buffers()])
    assert _skipped(model) == 1
    before, after = seen[("before", 1)], seen[("after", 1)]
    assert set(before) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    for name in before:
        assert torch.equal(before[name], after[name]), f"the skipped batch changed {name}"
    assert not torch.equal(seen[("before", 2)]["bn.running_mean"], seen[("after", 2)]["bn.running_mean"])
    assert all(bool(torch.isfinite(b).all()) for b in model.buffers())


class _Recorder(pl.loggers.Logger):
    """Every ``log_metrics`` call, by step."""

    def __init__(self):
        super().__init__()
        self.steps = []

    name = "recorder"
    version = "0"

    def log_metrics(self, metrics, step=None):
        self.steps.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_a_skipped_batch_logs_no_loss_and_stays_out_of_the_epoch_metrics():
    pl.seed_everything(0)
    model = _NaNAtStep1(model_type="vanilla", width=8, scheduler="none", log_figures=False)
    rec = _Recorder()
    _fit_quiet(model, _loader(nan_batch=None), logger=rec)
    assert _skipped(model) == 1
    per_step = [m for m in rec.steps if "train/skipped_batches" in m]
    assert [m["train/skipped_batches"] for m in per_step] == [0.0, 1.0, 1.0, 1.0]
    # the skipped step logs no loss of its own (Lightning's row repeats the last logged value, if any)
    for name in ("train/loss", "train/task_loss", "train/probe", "train/batch_accuracy"):
        assert per_step[1].get(name, per_step[0][name]) == per_step[0][name], name
    epoch = next(m for m in rec.steps if "train/loss_epoch" in m)
    good = [per_step[i] for i in (0, 2, 3)]  # equal batch sizes: the epoch mean is the plain mean
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for m in good)
    assert epoch["train/loss_epoch"] == pytest.approx(sum(m["train/loss"] for m in good) / 3, rel=1e-6)
    assert epoch["train/accuracy"] == pytest.approx(sum(m["train/batch_accuracy"] for m in good) / 3, rel=1e-6)


def test_a_loss_scalers_overflow_is_left_to_the_scaler_not_counted_as_a_skipped_batch():
    # 16-mixed: with a huge loss scale the scaled fp16 gradients overflow; that is the scaler's signal to skip
    # the step and halve its scale. Clearing those gradients as a "non-finite batch" hid the overflow from the
    # scaler (its scale never fell, every later batch overflowed and was skipped too).
    from pytorch_lightning.plugins.precision import MixedPrecision

    pl.seed_everything(0)
    model = DigitsDEQ(model_type="vanilla", width=8, scheduler="none", log_figures=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    cb = _Logged()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(
            max_epochs=1,
            limit_val_batches=0,
            callbacks=[cb],
            accelerator="cpu",
            plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        ).fit(model, _loader(nan_batch=None))
    assert scaler.get_scale() < 2.0**40  # the scaler saw its overflow and lowered the scale
    assert [r["train/skipped_batches"] for r in cb.rows] == [0.0] * 4
    assert not [w for w in caught if issubclass(w.category, NonFiniteBatchWarning)]
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_under_a_loss_scaler_a_nan_input_is_still_skipped():
    from pytorch_lightning.plugins.precision import MixedPrecision

    pl.seed_everything(0)
    model = DigitsDEQ(model_type="vanilla", width=8, scheduler="none", log_figures=False)
    cb = _Logged()
    trainer(
        max_epochs=1,
        limit_val_batches=0,
        callbacks=[cb],
        accelerator="cpu",
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))],
    ).fit(model, _loader(1))
    assert [r["skipped"] for r in cb.rows] == [False, True, False, False]
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_under_a_loss_scaler_manual_optimisation_skips_a_nan_input_too():
    from pytorch_lightning.plugins.precision import MixedPrecision

    pl.seed_everything(0)
    model = _ManualDigits(model_type="vanilla", width=8, scheduler="none", log_figures=False)
    scaler = torch.amp.GradScaler("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(
            max_epochs=1,
            limit_val_batches=0,
            accelerator="cpu",
            plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        ).fit(model, _loader(1))
    assert _skipped(model) == 1
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    # the NaN came from the data, not from an overflow: the scale stays (before: gradients set to inf, scale halved)
    assert scaler.get_scale() == 2.0**16
