"""The one module every paper-reproduction script shares: arguments, devices, plan, runs, grid, CSV rows.

Why shared: every experiment of the paper (MNIST dense/conv, SVHN, CIFAR-10 v1/small/large, ImageNet
small) has the same knobs (model type, solver, seed, devices, epochs or steps, subsets) and reports the
same numbers (accuracy, explicit accuracy, NFE, per-phase wall time), so a script only names its
experiment, its architectures and its data module (an :class:`ExperimentSpec`).

The models and the paper's training defaults come from the library (``deqlab.models.build_model`` and
``deqlab.models.paper_settings``); this module only wires them to Lightning and to the results files:

* ``<results-dir>/<experiment>.csv``: one row per finished run (what ``--grid`` resumes from);
* ``<results-dir>/<experiment>_epochs.csv``: one row per epoch (and one for the final test) per run;
* TensorBoard event files under ``--log-dir``.
"""
from __future__ import annotations

import argparse
import ast
import csv
import logging
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
#: Where runs write by default: ``runs/`` is git-ignored, so results never land in the source tree by accident.
DEFAULT_RESULTS_DIR = REPO / "runs" / "paper_repro" / "results"
DEFAULT_LOG_DIR = REPO / "runs" / "paper_repro" / "tensorboard"
#: The paper's seeds (v1); ``paper_settings`` may name others per experiment.
PAPER_SEEDS = (6171, 3859, 2961)
MODEL_TYPES = ("vanilla", "skip", "skip_reg", "neural_ode")
SOLVERS = ("continuous", "discrete")
#: integrators of the continuous solver (``--ode-solver``); the default is each experiment's paper choice
ODE_SOLVERS = ("tsit5", "vcab3")
PROTOCOLS = ("paper", "v1")

log = logging.getLogger("paper_repro")

#: Columns of ``<experiment>.csv``, in order. ``key`` columns identify a run (what ``--grid`` skips).
KEY_COLUMNS = (
    "experiment", "arch", "model_type", "solver", "jac_reg", "seed",
    "requested_epochs", "requested_max_steps", "train_subset", "test_subset", "batch_size_per_process", "world_size",
    "protocol", "ode_solver",
)
RESULT_COLUMNS = KEY_COLUMNS + (
    "test_accuracy", "test_top5_accuracy", "explicit_accuracy", "test_loss",
    "train_time_per_step_s", "train_time_per_epoch_s", "epoch_time_measured",
    "forward_time_s", "backward_time_s", "optimizer_time_s", "prediction_time_s", "explicit_time_s",
    "train_nfe", "test_nfe", "backward_nfe", "train_reference_nfe", "test_reference_nfe",
    "parameters", "steps", "epochs", "steps_per_epoch", "effective_batch_size", "train_samples", "test_samples",
    "pretrain_steps", "fit_time_s", "test_time_s",
    "device", "accelerator", "num_processes", "strategy",
    "torch_version", "lightning_version", "deqlab_version", "git_commit", "log_dir", "finished_at",
)
EPOCH_COLUMNS = (
    "experiment", "arch", "model_type", "solver", "jac_reg", "seed", "stage", "epoch", "step",
    "train_loss", "train_accuracy", "train_nfe", "train_backward_nfe", "train_time_s",
    "eval_accuracy", "eval_explicit_accuracy", "eval_nfe", "eval_loss",
    "protocol", "ode_solver", "train_reference_nfe", "eval_reference_nfe",
)


# ---------------------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class ExperimentSpec:
    """What a script contributes: the experiment's name in ``deqlab.models``, its architectures, its data.

    Args:
        name: the experiment key of ``deqlab.models.build_model`` (``mnist``, ``svhn``, ``cifar10``, ``imagenet``).
        archs: architectures the script accepts; the first is the default.
        make_data: ``make_data(args, arch, batch_size, seed, augment) -> TorchvisionDataModule`` built with
            ``val_fraction=0`` (the paper trains on the full training set and evaluates on the test set).
        train_size, test_size: sizes of the official splits, for ``--dry-run`` plans made without data.
        num_classes: classes, for building the model before any data is read.
        description: the script's one-line description (``--help``).
    """

    name: str
    archs: Tuple[str, ...]
    make_data: Callable[..., Any]
    train_size: int
    test_size: int
    num_classes: int = 10
    description: str = ""
    #: ``extra_arguments(parser)`` adds the script's own options (e.g. ImageNet's ``--image-size``).
    extra_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None
    #: alternative architecture names -> canonical ones (recorded in the CSV by the canonical name).
    aliases: Dict[str, str] = field(default_factory=dict)
    #: data loader workers per process unless ``--num-workers`` says otherwise.
    default_workers: int = 2
    #: ``model_options(args) -> dict``: keywords for ``build_model`` that follow from the script's own options.
    model_options: Optional[Callable[[argparse.Namespace], Dict[str, Any]]] = None


# ---------------------------------------------------------------------------------------------- arguments
def _csv_list(kind: Callable[[str], Any]) -> Callable[[str], List[Any]]:
    def parse(text: str) -> List[Any]:
        return [kind(t.strip()) for t in text.split(",") if t.strip()]
    return parse


def _key_value(text: str) -> Tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value  # a bare string such as adamw
    return key.strip(), parsed


def build_parser(spec: ExperimentSpec) -> argparse.ArgumentParser:
    """The arguments of every experiment script. Defaults ``None`` mean "the paper's setting"."""
    p = argparse.ArgumentParser(description=spec.description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", choices=list(spec.archs), default=spec.archs[0], help="architecture")
    p.add_argument("--model-type", choices=list(MODEL_TYPES), default="skip",
                   help="vanilla (u0 = 0), skip (learned u0 predictor), skip_reg (u0 = f(0, x)), "
                        "neural_ode (finite-time multiscale neural ODE baseline)")
    p.add_argument("--solver", choices=list(SOLVERS), default="discrete",
                   help="continuous: integrate du/dt = f(u) - u to its steady state; discrete: limited-memory Broyden")
    p.add_argument("--ode-solver", choices=list(ODE_SOLVERS), default=None,
                   help="integrator of the continuous solver (default: the paper's for the experiment: tsit5 for "
                        "MNIST and the v1 models, vcab3 for CIFAR-10 small/large and ImageNet)")
    p.add_argument("--protocol", choices=list(PROTOCOLS), default="paper",
                   help="paper: the protocol the paper's text states (MNIST dense: Adam 1e-3 constant, "
                        "lambda_skip 0.01); v1: the January-2022 reference code's settings and semantics "
                        "(AdamW + cosine, lambda_skip 5, batch-wide termination, z* = f(u_T, x), the skip penalty "
                        "on vanilla, raw pixels)")
    p.add_argument("--jac-reg", action="store_true", help="add the Hutchinson Jacobian regularization term")
    p.add_argument("--seed", type=int, default=None, help=f"random seed (default: the paper's first, {PAPER_SEEDS[0]})")
    g = p.add_argument_group("schedule (default: the paper's)")
    g.add_argument("--epochs", type=int, default=None, help="training epochs")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (the cosine schedule then spans them); -1: no limit")
    g.add_argument("--batch-size", type=int, default=None, help="samples per batch and process")
    g.add_argument("--val-every", type=int, default=1, help="evaluate on the test set every N epochs (and always at the end)")
    g.add_argument("--override", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="change one training setting of paper_settings (e.g. lr=5e-4, pretrain_steps=0)")
    g.add_argument("--model-option", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword for deqlab.models.build_model (e.g. max_steps=30)")
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", type=Path, default=REPO / "data", help="dataset root (torchvision layout)")
    if spec.name != "imagenet":  # ImageNet needs registration; its data module refuses to download
        d.add_argument("--download", action="store_true", help="download the dataset into --data-dir when missing")
    d.add_argument("--train-subset", type=int, default=None, metavar="N", help="train on a fixed random N of the training set")
    d.add_argument("--test-subset", type=int, default=None, metavar="N", help="evaluate on a fixed random N of the test set")
    d.add_argument("--num-workers", type=int, default=None, help=f"data loader workers per process (default: {spec.default_workers})")
    h = p.add_argument_group("devices")
    h.add_argument("--gpus", type=int, default=0, help="0: CPU; 1: one GPU; N > 1: DDP over N GPUs (batch size per process)")
    h.add_argument("--accelerator", default=None, help="Lightning accelerator (cpu, gpu, ...); overrides --gpus")
    h.add_argument("--devices", type=int, default=None, help="processes per node with --accelerator (CPU DDP: --accelerator cpu --devices 2)")
    h.add_argument("--num-nodes", type=int, default=1, help="machines for multi-node DDP")
    h.add_argument("--strategy", default=None, help="Lightning strategy (default: ddp when more than one process, else auto)")
    h.add_argument("--precision", default=None, help="Lightning precision (default 32-true)")
    r = p.add_argument_group("grid and results")
    r.add_argument("--grid", action="store_true",
                   help="run the paper's grid (model types x solvers x seeds) in sequence; runs already in the CSV are skipped")
    r.add_argument("--model-types", type=_csv_list(str), default=None, help="narrow the grid, e.g. vanilla,skip")
    r.add_argument("--solvers", type=_csv_list(str), default=None, help="narrow the grid, e.g. continuous")
    r.add_argument("--ode-solvers", type=_csv_list(str), default=None,
                   help="continuous runs of the grid with each of these integrators, e.g. tsit5,vcab3 "
                        "(default: --ode-solver, else the paper's)")
    r.add_argument("--save-model", action="store_true",
                   help="save each run's trained network (state_dict) as <results-dir>/models/<run>.pt "
                        "(what paper_repro/timing.py --models-dir times)")
    r.add_argument("--seeds", type=_csv_list(int), default=None, help="grid seeds (default: the paper's)")
    r.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR, help="where <experiment>.csv and <experiment>_epochs.csv go")
    r.add_argument("--log-dir", type=Path, default=DEFAULT_LOG_DIR, help="TensorBoard log directory")
    r.add_argument("--progress", choices=["bar", "lines", "none"], default=None,
                   help="progress display (default: bar on a terminal, periodic lines otherwise)")
    r.add_argument("--log-every", type=int, default=50, help="steps between progress lines and TensorBoard points")
    r.add_argument("--figures", action="store_true", help="also log NFE histograms and convergence figures")
    r.add_argument("--dry-run", action="store_true", help="build the model(s), print the plan and exit without data")
    if spec.extra_arguments is not None:
        spec.extra_arguments(p)
    return p


def parse_args(spec: ExperimentSpec, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser(spec).parse_args(argv)
    args.arch = spec.aliases.get(args.arch, args.arch)
    for name in ("train_subset", "test_subset", "batch_size", "epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {value}")
    if args.gpus < 0:
        raise SystemExit(f"error: --gpus must be >= 0, got {args.gpus}")
    for name, allowed in (("model_types", MODEL_TYPES), ("solvers", SOLVERS), ("ode_solvers", ODE_SOLVERS)):
        bad = [v for v in (getattr(args, name) or []) if v not in allowed]
        if bad:
            raise SystemExit(f"error: --{name.replace('_', '-')}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return args


# ---------------------------------------------------------------------------------------------- devices
@dataclass(frozen=True)
class DevicePlan:
    accelerator: str
    devices: int
    num_nodes: int
    strategy: str

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def resolve_devices(args: argparse.Namespace, *, check: bool = True) -> DevicePlan:
    """Lightning's accelerator/devices/strategy for ``args``; with ``check``, fail in one line when the GPUs
    asked for are not there (instead of a Lightning traceback deep inside ``Trainer``)."""
    if args.accelerator is not None:
        accelerator = args.accelerator
        devices = args.devices if args.devices is not None else 1
    elif args.devices is not None:
        raise SystemExit("error: --devices needs --accelerator (e.g. --accelerator cpu --devices 2); for GPUs pass --gpus N")
    elif args.gpus > 0:
        accelerator, devices = "gpu", args.gpus
    else:
        accelerator, devices = "cpu", 1
    if devices < 1 or args.num_nodes < 1:
        raise SystemExit(f"error: --devices and --num-nodes must be >= 1, got {devices} and {args.num_nodes}")
    strategy = args.strategy or ("ddp" if devices * args.num_nodes > 1 else "auto")
    if check and accelerator in ("gpu", "cuda"):
        import torch

        found = torch.cuda.device_count()
        if devices > found:
            instead = f"--gpus {found}" if found else "--gpus 0 (CPU), or --accelerator cpu --devices N for CPU DDP"
            raise SystemExit(
                f"error: asked for {devices} GPU{'s' if devices != 1 else ''} but found {found} "
                f"(torch.cuda.device_count() = {found}); pass {instead}"
            )
    return DevicePlan(accelerator, devices, args.num_nodes, strategy)


def _device_name(plan: DevicePlan) -> str:
    if plan.accelerator in ("gpu", "cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# ---------------------------------------------------------------------------------------------- run config
@dataclass
class RunConfig:
    """One run of the grid, with the paper's settings resolved and the command-line overrides applied."""

    experiment: str
    arch: str
    model_type: str
    solver: str
    jac_reg: bool
    seed: int
    batch_size: int
    epochs: int
    max_steps: int
    augment: bool
    training: Dict[str, Any]
    model_options: Dict[str, Any]
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    seeds: Tuple[int, ...] = PAPER_SEEDS
    protocol: str = "paper"
    #: the continuous solver's integrator ("" for discrete runs)
    ode_solver: str = ""
    #: the v1 protocol's data option: raw [0, 1] pixels instead of normalized ones
    normalize: bool = True

    def key(self, world_size: int) -> Tuple[str, ...]:
        return tuple(str(v) for v in (
            self.experiment, self.arch, self.model_type, self.solver, self.jac_reg, self.seed,
            self.epochs, self.max_steps, self.train_subset or "", self.test_subset or "", self.batch_size, world_size,
            self.protocol, self.ode_solver,
        ))

    @property
    def solver_label(self) -> str:
        """``discrete``, or ``continuous`` with its integrator (``continuous/vcab3``)."""
        return f"{self.solver}/{self.ode_solver}" if self.ode_solver else self.solver

    @property
    def run_name(self) -> str:
        """A file-name-safe name of the run (TensorBoard folder, saved model)."""
        solver = f"{self.solver}_{self.ode_solver}" if self.ode_solver else self.solver
        return (f"{self.experiment}_{self.arch}_{self.protocol}/{self.model_type}_{solver}"
                f"{'_jac' if self.jac_reg else ''}_s{self.seed}")

    @property
    def label(self) -> str:
        return (f"{self.experiment}/{self.arch} {self.model_type} {self.solver_label}{' +jac' if self.jac_reg else ''} "
                f"seed {self.seed} ({self.protocol} protocol)")


def paper_defaults(experiment: str, arch: str, model_type: str, solver: str,
                   jac_reg: bool = False, protocol: str = "paper") -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``deqlab.models.paper_settings`` split into (LightningModule kwargs, run defaults: batch size,
    epochs or max_steps, augment, seeds, normalization, the continuous integrator, the v1 semantics).
    ``num_classes`` comes from the data instead."""
    from deqlab.models import TRAINING_KEYS, paper_settings

    settings = dict(paper_settings(experiment, arch, model_type, solver, jac_reg=jac_reg, protocol=protocol))
    training = {k: v for k, v in settings.items() if k in TRAINING_KEYS and k != "num_classes"}
    run = {k: v for k, v in settings.items() if k not in TRAINING_KEYS}
    return training, run


def make_config(spec: ExperimentSpec, args: argparse.Namespace, model_type: str, solver: str, seed: Optional[int],
                ode_solver: Optional[str] = None) -> RunConfig:
    protocol = getattr(args, "protocol", "paper")
    training, run = paper_defaults(spec.name, args.arch, model_type, solver, bool(args.jac_reg), protocol)
    seeds = tuple(run.get("seeds") or PAPER_SEEDS)
    training.update(dict(args.override))
    training.setdefault("log_figures", bool(args.figures))
    epochs = args.epochs if args.epochs is not None else run.get("epochs")
    max_steps = args.max_steps if args.max_steps is not None else run.get("max_steps")
    if epochs is None and (max_steps is None or max_steps < 0):
        raise SystemExit(f"error: paper_settings({spec.name!r}, {args.arch!r}) names neither epochs nor max_steps; pass --epochs or --max-steps")
    if epochs is None:
        epochs = -1  # Lightning: no epoch limit, max_steps decides
    if max_steps is None:
        max_steps = -1
    model_options = dict(run.get("model_options") or {})
    if model_type == "neural_ode":
        ode = "tsit5"  # the baseline integrates t in [0, 1] with Tsit5 whatever the DEQ rows use
    elif solver == "continuous":
        from deqlab.models.builder import default_ode_solver

        ode = ode_solver or getattr(args, "ode_solver", None)
        if ode is not None:
            model_options["ode_solver"] = ode
        else:
            ode = default_ode_solver(spec.name, args.arch)
    else:
        ode = ""
    return RunConfig(
        experiment=spec.name, arch=args.arch, model_type=model_type, solver=solver, jac_reg=bool(args.jac_reg),
        seed=seeds[0] if seed is None else int(seed),
        batch_size=int(args.batch_size or run.get("batch_size") or 32),
        epochs=int(epochs), max_steps=int(max_steps), augment=bool(run.get("augment", False)),
        training=training,
        model_options={**model_options, **(spec.model_options(args) if spec.model_options else {}),
                       **dict(args.model_option)},
        train_subset=args.train_subset, test_subset=args.test_subset, seeds=seeds, protocol=protocol,
        ode_solver=ode, normalize=bool(run.get("normalize", True)),
    )


def build_network(spec: ExperimentSpec, cfg: RunConfig, num_classes: Optional[int] = None) -> Any:
    from deqlab.models import build_model

    return build_model(cfg.experiment, cfg.arch, model_type=cfg.model_type, solver=cfg.solver, jac_reg=cfg.jac_reg,
                       num_classes=num_classes or spec.num_classes, **cfg.model_options)


def build_module(network: Any, cfg: RunConfig, num_classes: int) -> Any:
    from deqlab.zoo import DEQClassifier

    kwargs = dict(cfg.training)
    kwargs.setdefault("num_classes", num_classes)
    module = DEQClassifier(network, **kwargs)  # the network stays out of the recorded hyperparameters
    return module


def count_parameters(model: Any) -> int:
    try:
        from deqlab.models import count_parameters as count
        return int(count(model))
    except ImportError:  # pragma: no cover - deqlab.models always has it
        return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------- plan
def steps_per_epoch(train_samples: int, batch_size: int, world_size: int) -> int:
    """Optimizer steps per epoch: Lightning's DistributedSampler gives each rank ceil(N / world) samples."""
    per_rank = math.ceil(train_samples / world_size)
    return math.ceil(per_rank / batch_size)


def total_steps(cfg: RunConfig, per_epoch: int) -> int:
    by_epochs = cfg.epochs * per_epoch if cfg.epochs > 0 else None
    if cfg.max_steps > 0:
        return cfg.max_steps if by_epochs is None else min(cfg.max_steps, by_epochs)
    assert by_epochs is not None
    return by_epochs


def describe_plan(spec: ExperimentSpec, cfg: RunConfig, plan: DevicePlan, parameters: int, train_samples: int,
                  test_samples: int) -> str:
    per_epoch = steps_per_epoch(train_samples, cfg.batch_size, plan.world_size)
    steps = total_steps(cfg, per_epoch)
    schedule = f"{cfg.epochs} epochs" if cfg.epochs > 0 else "no epoch limit"
    if cfg.max_steps > 0:
        schedule += f", at most {cfg.max_steps} steps"
    t = cfg.training
    from deqlab.models import protocol_summary

    lines = [
        f"plan: {cfg.label}",
        f"  protocol          {protocol_summary(cfg.experiment, cfg.arch, cfg.protocol)}",
        f"  solver            {cfg.solver_label}" + (f", model options {cfg.model_options}" if cfg.model_options else ""),
        f"  parameters        {parameters:,}",
        f"  devices           {plan.accelerator} x {plan.devices} per node x {plan.num_nodes} node(s) = {plan.world_size} process(es)",
        f"  strategy          {plan.strategy}",
        f"  batch per process {cfg.batch_size}",
        f"  effective batch   {cfg.batch_size * plan.world_size}",
        f"  data              {train_samples} train / {test_samples} test samples, augment={cfg.augment}, "
        f"{'normalized' if cfg.normalize else 'raw [0, 1] pixels'}",
        f"  schedule          {schedule}: {per_epoch} steps per epoch, {steps} steps in all",
        f"  optimizer         {t.get('optimizer')} lr {t.get('lr')} wd {t.get('weight_decay')}, scheduler {t.get('scheduler')}",
        f"  losses            skip weight {t.get('skip_loss_weight', 0.0)}, jacobian weight {t.get('jacobian_loss_weight', 0.0) if cfg.jac_reg else 0.0}",
        f"  pretraining       {t.get('pretrain_steps', 0)} steps at depth {t.get('pretrain_depth', 5)}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- data
class PaperData:
    """Wraps a deqlab data module: optional fixed subsets, and the test set as the per-epoch evaluation set
    (the paper reports test accuracy and NFE per epoch; its training set is the full official one).

    Built lazily as a LightningDataModule subclass so that importing this module stays cheap."""

    def __new__(cls, inner: Any, train_subset: Optional[int], test_subset: Optional[int]) -> Any:
        import pytorch_lightning as pl
        import torch
        from torch.utils.data import Subset

        class _PaperData(pl.LightningDataModule):
            def __init__(self) -> None:
                super().__init__()
                self.inner = inner
                self._subsetted = {"train": False, "test": False}

            @staticmethod
            def _subset(dataset: Any, n: Optional[int]) -> Any:
                if n is None or n >= len(dataset):
                    return dataset
                # A fixed subset (seed 0), the same for every run and seed, so runs stay comparable.
                idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n].tolist()
                return Subset(dataset, sorted(idx))

            def prepare_data(self) -> None:
                self.inner.prepare_data()

            def setup(self, stage: Optional[str] = None) -> None:
                if stage in (None, "fit", "validate"):
                    self.inner.setup("fit")
                    if not self._subsetted["train"]:
                        self.inner.train_set = self._subset(self.inner.train_set, train_subset)
                        self._subsetted["train"] = True
                self.inner.setup("test")
                if not self._subsetted["test"]:
                    self.inner.test_set = self._subset(self.inner.test_set, test_subset)
                    self._subsetted["test"] = True

            def train_dataloader(self) -> Any:
                return self.inner.train_dataloader()

            def val_dataloader(self) -> Any:
                return self.inner.test_dataloader()

            def test_dataloader(self) -> Any:
                return self.inner.test_dataloader()

        return _PaperData()


def check_data(data: Any, args: argparse.Namespace) -> None:
    missing = [] if getattr(args, "download", False) else data.missing_paths()
    if missing:
        raise SystemExit(
            f"error: {data.name} not found under {data.data_dir}: missing {', '.join(str(m) for m in missing)}. "
            f"{data.layout_hint()} Pass --data-dir to the folder that holds it, or --download where possible."
        )


# ---------------------------------------------------------------------------------------------- callbacks
def _float(value: Any) -> Optional[float]:
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _median(values: Sequence[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def _mean(values: Sequence[float]) -> Optional[float]:
    return statistics.fmean(values) if values else None


class RunRecorder:
    """Lightning callback (built lazily): per-step wall time and the module's logged step values, per-epoch
    rows for ``<experiment>_epochs.csv`` (written by rank zero), and progress lines with an ETA."""

    def __new__(cls, cfg: RunConfig, epochs_csv: Optional[Path], total: int, progress: str, log_every: int) -> Any:
        import pytorch_lightning as pl
        import torch

        def sync(module: Any) -> None:
            if module.device.type == "cuda":
                torch.cuda.synchronize(module.device)

        class _Recorder(pl.Callback):
            def __init__(self) -> None:
                self.step_times: List[float] = []
                self.phase: Dict[str, List[float]] = {"forward": [], "backward": [], "optimizer": []}
                self.epoch_times: List[float] = []
                self.full_epochs = 0
                self.last_epoch: Dict[str, Any] = {}
                self._epoch: Dict[str, List[float]] = {}
                self._t0 = 0.0
                self._epoch_t0 = 0.0
                self._val_t0 = 0.0
                self._val_s = 0.0
                self._validated = False
                self._fit_t0 = 0.0

            # --- steps
            def on_train_start(self, trainer: Any, pl_module: Any) -> None:
                self._fit_t0 = time.perf_counter()

            def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
                self._epoch = {"loss": [], "accuracy": [], "nfe": [], "backward_nfe": [], "reference_nfe": []}
                self._epoch_t0 = time.perf_counter()
                self._val_s = 0.0
                self._validated = False

            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                sync(pl_module)
                self._t0 = time.perf_counter()

            def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
                sync(pl_module)
                self.step_times.append(time.perf_counter() - self._t0)
                m = trainer.callback_metrics
                for name in self.phase:
                    v = _float(m.get(f"time/{name}"))
                    if v is not None:
                        self.phase[name].append(v)
                for key, metric in (("loss", "train/loss"), ("accuracy", "train/batch_accuracy"),
                                    ("nfe", "solver/train_nfe"), ("backward_nfe", "solver/train_backward_nfe"),
                                    ("reference_nfe", "solver/train_reference_nfe")):
                    v = _float(m.get(metric))
                    if v is not None:
                        self._epoch[key].append(v)
                step = trainer.global_step
                if progress == "lines" and trainer.is_global_zero and (step % log_every == 0 or step == total):
                    elapsed = time.perf_counter() - self._fit_t0
                    eta = elapsed / max(step, 1) * max(total - step, 0)
                    print(f"[{cfg.label}] step {step}/{total} epoch {trainer.current_epoch} "
                          f"loss {_fmt(_float(m.get('train/loss')))} acc {_fmt(_float(m.get('train/batch_accuracy')))} "
                          f"nfe {_fmt(_float(m.get('solver/train_nfe')), '.1f')} "
                          f"(paper's count {_fmt(_float(m.get('solver/train_reference_nfe')), '.1f')}) "
                          f"bnfe {_fmt(_float(m.get('solver/train_backward_nfe')), '.1f')} "
                          f"elapsed {_hms(elapsed)} eta {_hms(eta)}", flush=True)

            # --- validation (the test set, per epoch)
            def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
                self._val_t0 = time.perf_counter()

            def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
                if trainer.sanity_checking:
                    return
                self._val_s += time.perf_counter() - self._val_t0
                self._validated = True
                if progress == "lines" and trainer.is_global_zero:
                    m = trainer.callback_metrics
                    print(f"[{cfg.label}] epoch {trainer.current_epoch} test accuracy "
                          f"{_fmt(_float(m.get('val/accuracy')))} nfe {_fmt(_float(m.get('solver/val_nfe')), '.1f')}", flush=True)

            def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
                seconds = time.perf_counter() - self._epoch_t0 - self._val_s
                n = len(self._epoch["loss"]) or len(self.step_times)
                if n >= trainer.num_training_batches and trainer.num_training_batches > 0:
                    self.epoch_times.append(seconds)
                    self.full_epochs += 1
                m = trainer.callback_metrics
                row = self._row(trainer, "train", seconds)
                if self._validated:
                    row.update(eval_accuracy=_float(m.get("val/accuracy")),
                               eval_explicit_accuracy=_float(m.get("val/explicit_accuracy")),
                               eval_nfe=_float(m.get("solver/val_nfe")), eval_loss=_float(m.get("val/loss")),
                               eval_reference_nfe=_float(m.get("solver/val_reference_nfe")))
                self.last_epoch = row
                if trainer.is_global_zero and epochs_csv is not None:
                    append_row(epochs_csv, row, EPOCH_COLUMNS)

            def _row(self, trainer: Any, stage: str, seconds: Optional[float]) -> Dict[str, Any]:
                e = self._epoch
                return dict(
                    experiment=cfg.experiment, arch=cfg.arch, model_type=cfg.model_type, solver=cfg.solver,
                    jac_reg=cfg.jac_reg, seed=cfg.seed, stage=stage, epoch=trainer.current_epoch,
                    step=trainer.global_step, train_loss=_mean(e.get("loss", [])),
                    train_accuracy=_mean(e.get("accuracy", [])), train_nfe=_mean(e.get("nfe", [])),
                    train_backward_nfe=_mean(e.get("backward_nfe", [])), train_time_s=seconds,
                    protocol=cfg.protocol, ode_solver=cfg.ode_solver,
                    train_reference_nfe=_mean(e.get("reference_nfe", [])),
                )

            def test_row(self, trainer: Any, metrics: Dict[str, Any]) -> Dict[str, Any]:
                row = self._row(trainer, "test", None)
                row["epoch"] = self.last_epoch.get("epoch", trainer.current_epoch)  # the epoch trained last
                row.update(eval_accuracy=_float(metrics.get("test/accuracy")),
                           eval_explicit_accuracy=_float(metrics.get("test/explicit_accuracy")),
                           eval_nfe=_float(metrics.get("solver/test_nfe")), eval_loss=_float(metrics.get("test/loss")),
                           eval_reference_nfe=_float(metrics.get("solver/test_reference_nfe")))
                return row

        return _Recorder()


def _fmt(v: Optional[float], spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------------------------------------- CSV
def append_row(path: Path, row: Dict[str, Any], columns: Sequence[str]) -> None:
    """Append ``row`` to the CSV at ``path`` (header written on creation); unknown keys raise."""
    extra = set(row) - set(columns)
    if extra:
        raise KeyError(f"columns not in the table: {sorted(extra)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        dropped = set(header) - set(columns)
        if dropped:
            raise KeyError(f"{path} has columns this version does not write ({sorted(dropped)}); "
                           "append to a new results file (--results-dir) instead of losing them")
        if list(header) != list(columns):
            # A table written before columns were added: rewrite it once under the current header (old rows
            # keep their values; the new columns stay empty), so rows never land under the wrong column.
            old = read_rows(path)
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(columns))
                w.writeheader()
                w.writerows(old)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        if new:
            w.writeheader()
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})


def read_rows(path: Path) -> List[Dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def finished_keys(path: Path) -> set:
    return {tuple(r.get(c, "") for c in KEY_COLUMNS) for r in read_rows(path)}


def _versions() -> Dict[str, str]:
    import pytorch_lightning
    import torch

    try:
        import deqlab
        deq_version = getattr(deqlab, "__version__", "?")
    except ImportError:  # pragma: no cover
        deq_version = "?"
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return dict(torch_version=torch.__version__, lightning_version=pytorch_lightning.__version__,
                deqlab_version=deq_version, git_commit=commit)


# ---------------------------------------------------------------------------------------------- one run
def run_one(spec: ExperimentSpec, cfg: RunConfig, args: argparse.Namespace, plan: DevicePlan) -> Dict[str, Any]:
    """Fit and test one configuration; append its row (rank zero) and return it."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    workers = args.num_workers if args.num_workers is not None else spec.default_workers
    data_options = {} if cfg.normalize else {"normalize": False}  # only the v1 protocol's MNIST asks for raw pixels
    inner = spec.make_data(args, cfg.arch, cfg.batch_size, cfg.seed, cfg.augment, workers, **data_options)
    check_data(inner, args)
    data = PaperData(inner, cfg.train_subset, cfg.test_subset)
    data.prepare_data()
    data.setup("fit")
    train_samples, test_samples = len(inner.train_set), len(inner.test_set)
    num_classes = int(getattr(inner, "num_classes", spec.num_classes))
    network = build_network(spec, cfg, num_classes)
    module = build_module(network, cfg, num_classes)
    parameters = count_parameters(network)
    per_epoch = steps_per_epoch(train_samples, cfg.batch_size, plan.world_size)
    total = total_steps(cfg, per_epoch)

    progress = args.progress or ("bar" if sys.stdout.isatty() else "lines")
    results_dir = Path(args.results_dir)
    recorder = RunRecorder(cfg, results_dir / f"{spec.name}_epochs.csv", total, progress, max(1, args.log_every))
    logger = TensorBoardLogger(str(args.log_dir), name=cfg.run_name, default_hp_metric=False)
    trainer_kwargs: Dict[str, Any] = dict(
        accelerator=plan.accelerator, devices=plan.devices, num_nodes=plan.num_nodes, strategy=plan.strategy,
        max_epochs=cfg.epochs, max_steps=cfg.max_steps, check_val_every_n_epoch=max(1, args.val_every),
        num_sanity_val_steps=0, logger=logger, callbacks=[recorder],
        log_every_n_steps=max(1, min(args.log_every, per_epoch, total)), enable_checkpointing=False,
        enable_progress_bar=progress == "bar", enable_model_summary=False,
    )
    if args.precision:
        trainer_kwargs["precision"] = args.precision
    trainer = pl.Trainer(**trainer_kwargs)
    if trainer.is_global_zero:
        print(describe_plan(spec, cfg, plan, parameters, train_samples, test_samples), flush=True)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    test = trainer.test(module, datamodule=data, verbose=False)[0]  # always evaluated at the end
    test_s = time.perf_counter() - start

    steps = int(trainer.global_step)
    epochs_done = steps / per_epoch if per_epoch else 0.0
    measured = recorder.full_epochs > 0
    step_time = _median(recorder.step_times)
    epoch_time = _mean(recorder.epoch_times) if measured else (None if step_time is None else step_time * per_epoch)
    last = recorder.last_epoch
    row: Dict[str, Any] = dict(
        experiment=cfg.experiment, arch=cfg.arch, model_type=cfg.model_type, solver=cfg.solver, jac_reg=cfg.jac_reg,
        seed=cfg.seed, requested_epochs=cfg.epochs, requested_max_steps=cfg.max_steps,
        train_subset=cfg.train_subset or "", test_subset=cfg.test_subset or "",
        batch_size_per_process=cfg.batch_size, world_size=plan.world_size,
        test_accuracy=_float(test.get("test/accuracy")), test_top5_accuracy=_float(test.get("test/top5_accuracy")),
        explicit_accuracy=_float(test.get("test/explicit_accuracy")), test_loss=_float(test.get("test/loss")),
        train_time_per_step_s=step_time, train_time_per_epoch_s=epoch_time, epoch_time_measured=measured,
        forward_time_s=_median(recorder.phase["forward"]), backward_time_s=_median(recorder.phase["backward"]),
        optimizer_time_s=_median(recorder.phase["optimizer"]),
        prediction_time_s=_float(test.get("time/test_forward")), explicit_time_s=_float(test.get("test/explicit_time")),
        train_nfe=last.get("train_nfe"), test_nfe=_float(test.get("solver/test_nfe")),
        backward_nfe=last.get("train_backward_nfe"), train_reference_nfe=last.get("train_reference_nfe"),
        test_reference_nfe=_float(test.get("solver/test_reference_nfe")), protocol=cfg.protocol,
        ode_solver=cfg.ode_solver,
        parameters=parameters, steps=steps, epochs=round(epochs_done, 4), steps_per_epoch=per_epoch,
        effective_batch_size=cfg.batch_size * plan.world_size, train_samples=train_samples, test_samples=test_samples,
        pretrain_steps=cfg.training.get("pretrain_steps", 0), fit_time_s=fit_s, test_time_s=test_s,
        device=_device_name(plan), accelerator=plan.accelerator, num_processes=plan.world_size, strategy=plan.strategy,
        log_dir=trainer.logger.log_dir if trainer.logger else "", finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **_versions(),
    )
    if trainer.is_global_zero and getattr(args, "save_model", False):
        import torch

        path = results_dir / "models" / f"{cfg.run_name.replace('/', '__')}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": network.state_dict(), "label": cfg.label, "model_type": cfg.model_type,
                    "solver": cfg.solver, "ode_solver": cfg.ode_solver, "jac_reg": cfg.jac_reg,
                    "model_options": cfg.model_options, "protocol": cfg.protocol, "seed": cfg.seed}, path)
    if trainer.is_global_zero:
        append_row(results_dir / f"{spec.name}_epochs.csv", recorder.test_row(trainer, test), EPOCH_COLUMNS)
        append_row(results_dir / f"{spec.name}.csv", row, RESULT_COLUMNS)
        print(f"[{cfg.label}] done: test accuracy {_fmt(row['test_accuracy'])}, explicit "
              f"{_fmt(row['explicit_accuracy'])}, test NFE {_fmt(row['test_nfe'], '.1f')} "
              f"(paper's count {_fmt(row['test_reference_nfe'], '.1f')}), {steps} steps "
              f"({row['epochs']} epochs), {_fmt(step_time, '.4f')} s/step, fit {fit_s:.0f} s -> "
              f"{results_dir / (spec.name + '.csv')}", flush=True)
    return row


# ---------------------------------------------------------------------------------------------- grid & main
def grid_configs(spec: ExperimentSpec, args: argparse.Namespace) -> List[RunConfig]:
    """The paper's grid: model types x solvers x seeds; the neural ODE has no DEQ solver and runs once per seed."""
    if not args.grid:
        return [make_config(spec, args, args.model_type, args.solver, args.seed)]
    model_types = args.model_types or list(MODEL_TYPES)
    solvers = args.solvers or list(SOLVERS)
    ode_solvers = args.ode_solvers or [args.ode_solver]  # [None]: each experiment's paper integrator
    probe = make_config(spec, args, model_types[0], solvers[0], None)
    seeds = args.seeds or ([args.seed] if args.seed is not None else list(probe.seeds))
    configs = []
    for seed in seeds:
        for model_type in model_types:
            if model_type == "neural_ode" and args.jac_reg:
                print("grid: neural_ode skipped with --jac-reg (no fixed point, so no Jacobian term)")
                continue
            if model_type == "neural_ode":  # integrates a finite interval: no steady-state solver to vary
                if "continuous" in solvers:
                    configs.append(make_config(spec, args, model_type, "continuous", seed))
                else:
                    print("grid: neural_ode skipped: it is an ODE model, listed under --solvers continuous")
                continue
            for solver in solvers:
                for ode in (ode_solvers if solver == "continuous" else [None]):
                    configs.append(make_config(spec, args, model_type, solver, seed, ode_solver=ode))
    return configs


def main(spec: ExperimentSpec, argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Parse, plan, and run (or only print the plan with ``--dry-run``); returns the rows written."""
    args = parse_args(spec, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is an instance of `nn.Module` and is already saved.*")
    plan = resolve_devices(args, check=not args.dry_run)
    configs = grid_configs(spec, args)
    if args.dry_run:
        for cfg in configs:
            network = build_network(spec, cfg)
            train = min(cfg.train_subset or spec.train_size, spec.train_size)
            test = min(cfg.test_subset or spec.test_size, spec.test_size)
            print(describe_plan(spec, cfg, plan, count_parameters(network), train, test))
        print(f"dry run: {len(configs)} run(s) planned, nothing trained")
        return []
    csv_path = Path(args.results_dir) / f"{spec.name}.csv"
    done = finished_keys(csv_path)  # read once, before any run, so every DDP rank sees the same list
    rows = []
    for i, cfg in enumerate(configs, 1):
        if cfg.key(plan.world_size) in done:
            print(f"[{i}/{len(configs)}] {cfg.label}: already in {csv_path}, skipped", flush=True)
            continue
        print(f"[{i}/{len(configs)}] {cfg.label}", flush=True)
        rows.append(run_one(spec, cfg, args, plan))
    return rows
