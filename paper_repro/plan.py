"""What will run, decided before anything trains: devices, each run's resolved settings, the grid, the steps.

Why apart from the run: ``--dry-run`` and ``--list-grid`` print this plan without data, GPUs or Lightning,
and every process of a DDP run or of a SLURM job array must derive the same plan from the same flags (a
grid cell is addressed by its index in :func:`paper_grid`).

Importing this module imports torch (``deqlab.models``), never Lightning.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from deqlab.models import MODEL_TYPES, SOLVER_KINDS
from deqlab.spec import model_kind
from paper_repro.cli import PAPER_SEEDS, ExperimentSpec, typed_settings

__all__ = [
    "DevicePlan",
    "resolve_devices",
    "RunConfig",
    "Grid",
    "paper_defaults",
    "make_config",
    "paper_grid",
    "planned_runs",
    "build_network",
    "count_parameters",
    "steps_per_epoch",
    "total_steps",
    "describe_plan",
]


# ---------------------------------------------------------------------------------------------- devices
@dataclass(frozen=True)
class DevicePlan:
    """Lightning's ``accelerator`` / ``devices`` (per node) / ``num_nodes`` / ``strategy`` for a run."""

    accelerator: str
    devices: int
    num_nodes: int
    strategy: str

    @property
    def world_size(self) -> int:
        """Processes in all: devices per node times nodes (a run's key records it: the batch is per process)."""
        return self.devices * self.num_nodes


def resolve_devices(args: argparse.Namespace, *, check: bool = True) -> DevicePlan:
    """Lightning's accelerator/devices/strategy for ``args``; with ``check``, fail in one line when the GPUs
    asked for are not there (instead of a Lightning traceback deep inside ``Trainer``)."""
    if args.accelerator is not None:
        accelerator = args.accelerator
        devices = args.devices if args.devices is not None else 1
    elif args.devices is not None:
        raise SystemExit(
            "error: --devices needs --accelerator (e.g. --accelerator cpu --devices 2); for GPUs pass --gpus N"
        )
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


# ---------------------------------------------------------------------------------------------- run config
@dataclass
class RunConfig:
    """One run of the grid, with the paper's settings resolved and the command-line overrides applied."""

    experiment: str
    arch: str
    model_type: str
    solver: str
    jacobian_regularization: bool
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
    #: what the command line changed from the paper's settings: (flag, key, value), for the printed plan
    changes: Tuple[Tuple[str, str, Any], ...] = field(default_factory=tuple)

    def key(self, world_size: int) -> Tuple[str, ...]:
        """The run's key: the values of ``results.KEY_COLUMNS`` its row will hold (what resume compares)."""
        return tuple(
            str(v)
            for v in (
                self.experiment,
                self.arch,
                self.model_type,
                self.solver,
                self.jacobian_regularization,
                self.seed,
                self.epochs,
                self.max_steps,
                self.train_subset or "",
                self.test_subset or "",
                self.batch_size,
                world_size,
                self.protocol,
                self.ode_solver,
            )
        )

    def cell_name(self, world_size: int) -> str:
        """A file name for the run's grid-cell files: readable (arch, protocol, model, solver, seed) and unique
        per key (a hash of :meth:`key`, which also holds the schedule, subsets, batch and process count)."""
        digest = hashlib.sha1("\x1f".join(self.key(world_size)).encode()).hexdigest()[:10]
        solver = f"{self.solver}-{self.ode_solver}" if self.ode_solver else self.solver
        return (
            f"{self.arch}_{self.protocol}_{self.model_type}_{solver}{'_jac' if self.jacobian_regularization else ''}"
            f"_s{self.seed}_{digest}"
        )

    @property
    def solver_label(self) -> str:
        """``discrete``, or ``continuous`` with its integrator (``continuous/vcab3``)."""
        return f"{self.solver}/{self.ode_solver}" if self.ode_solver else self.solver

    @property
    def run_name(self) -> str:
        """A file-name-safe name of the run (TensorBoard folder, saved model)."""
        solver = f"{self.solver}_{self.ode_solver}" if self.ode_solver else self.solver
        return (
            f"{self.experiment}_{self.arch}_{self.protocol}/{self.model_type}_{solver}"
            f"{'_jac' if self.jacobian_regularization else ''}_s{self.seed}"
        )

    @property
    def label(self) -> str:
        """The run in words, for progress lines and ``--list-grid``."""
        return (
            f"{self.experiment}/{self.arch} {self.model_type} {self.solver_label}{' +jac' if self.jacobian_regularization else ''} "
            f"seed {self.seed} ({self.protocol} protocol)"
        )


def paper_defaults(
    experiment: str,
    arch: str,
    model_type: str,
    solver: str,
    jacobian_regularization: bool = False,
    protocol: str = "paper",
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``deqlab.models.paper_settings`` split into (LightningModule kwargs, run defaults: batch size,
    epochs or max_steps, augment, seeds, normalization, the continuous integrator, the v1 semantics).
    ``num_classes`` comes from the data instead."""
    from deqlab.models import TRAINING_KEYS, paper_settings

    settings = dict(
        paper_settings(
            experiment, arch, model_type, solver, jacobian_regularization=jacobian_regularization, protocol=protocol
        )
    )
    training = {k: v for k, v in settings.items() if k in TRAINING_KEYS and k != "num_classes"}
    run = {k: v for k, v in settings.items() if k not in TRAINING_KEYS}
    return training, run


def make_config(
    spec: ExperimentSpec,
    args: argparse.Namespace,
    model_type: str,
    solver: str,
    seed: Optional[int],
    ode_solver: Optional[str] = None,
) -> RunConfig:
    """One run: the paper's settings for (experiment, arch, model type, solver, protocol), then what the
    command line changes (schedule, ``--override``, ``--model-option``, the typed flags)."""
    from deqlab.models.builder import default_ode_solver

    protocol = getattr(args, "protocol", "paper")
    training, run = paper_defaults(spec.name, args.arch, model_type, solver, bool(args.jac_reg), protocol)
    seeds = tuple(run.get("seeds") or PAPER_SEEDS)
    changes: List[Tuple[str, str, Any]] = [("--override", k, v) for k, v in args.override]
    training.update(dict(args.override))
    for flag, value in typed_settings(args, "training"):
        training[flag.key] = value
        changes.append((flag.flag, flag.key, value))
    training.setdefault("log_figures", bool(args.figures))
    epochs = args.epochs if args.epochs is not None else run.get("epochs")
    max_steps = args.max_steps if args.max_steps is not None else run.get("max_steps")
    if epochs is None and (max_steps is None or max_steps < 0):
        raise SystemExit(
            f"error: paper_settings({spec.name!r}, {args.arch!r}) names neither epochs nor max_steps; pass --epochs or --max-steps"
        )
    if epochs is None:
        epochs = -1  # Lightning: no epoch limit, max_steps decides
    if max_steps is None:
        max_steps = -1
    model_options = dict(run.get("model_options") or {})
    if not model_kind(model_type).is_deq:
        ode = "tsit5"  # the neural-ODE baseline integrates t in [0, 1] with Tsit5 whatever the DEQ rows use
    elif solver == "continuous":
        ode = ode_solver or getattr(args, "ode_solver", None)
        if ode is not None:
            model_options["ode_solver"] = ode
        else:
            ode = default_ode_solver(spec.name, args.arch)
    else:
        ode = ""
    model_options.update(spec.model_options(args) if spec.model_options else {})
    model_options.update(dict(args.model_option))
    changes += [("--model-option", k, v) for k, v in args.model_option]
    for flag, value in typed_settings(args, "model"):
        model_options[flag.key] = value
        changes.append((flag.flag, flag.key, value))
    return RunConfig(
        experiment=spec.name,
        arch=args.arch,
        model_type=model_type,
        solver=solver,
        jacobian_regularization=bool(args.jac_reg),
        seed=seeds[0] if seed is None else int(seed),
        batch_size=int(args.batch_size or run.get("batch_size") or 32),
        epochs=int(epochs),
        max_steps=int(max_steps),
        augment=bool(run.get("augment", False)),
        training=training,
        model_options=model_options,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        seeds=seeds,
        protocol=protocol,
        ode_solver=ode,
        normalize=bool(run.get("normalize", True)),
        changes=tuple(changes),
    )


# ---------------------------------------------------------------------------------------------- grid
@dataclass(frozen=True)
class Grid:
    """Runs in order, and why some combinations were left out (printed with the plan).

    The order is part of the contract: ``--grid-cell I`` runs ``cells[I]`` of the grid built from the same
    flags, in every process of a job array."""

    cells: Tuple[RunConfig, ...]
    notes: Tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.cells)


def paper_grid(spec: ExperimentSpec, args: argparse.Namespace) -> Grid:
    """The paper's grid: seeds x model types x solvers (x integrators of the continuous solver); the neural
    ODE has no DEQ solver and runs once per seed. Narrowed by ``--seeds``, ``--model-types``, ``--solvers``,
    ``--ode-solvers``."""
    model_types = args.model_types or list(MODEL_TYPES)
    solvers = args.solvers or list(SOLVER_KINDS)
    ode_solvers = args.ode_solvers or [args.ode_solver]  # [None]: each experiment's paper integrator
    probe = make_config(spec, args, model_types[0], solvers[0], None)
    seeds = args.seeds or ([args.seed] if args.seed is not None else list(probe.seeds))
    cells: List[RunConfig] = []
    notes: List[str] = []
    for seed in seeds:
        for model_type in model_types:
            deq = model_kind(model_type).is_deq
            if not deq and args.jac_reg:
                notes.append(f"grid: {model_type} skipped with --jac-reg (no fixed point, so no Jacobian term)")
                continue
            if not deq:  # the neural ODE integrates a finite interval: no steady-state solver to vary
                if "continuous" in solvers:
                    cells.append(make_config(spec, args, model_type, "continuous", seed))
                else:
                    notes.append(f"grid: {model_type} skipped: it is an ODE model, listed under --solvers continuous")
                continue
            for solver in solvers:
                for ode in ode_solvers if solver == "continuous" else [None]:
                    cells.append(make_config(spec, args, model_type, solver, seed, ode_solver=ode))
    return Grid(tuple(cells), tuple(dict.fromkeys(notes)))


def planned_runs(spec: ExperimentSpec, args: argparse.Namespace) -> Grid:
    """What the command runs: the grid with ``--grid``, else the one run ``--model-type`` / ``--solver`` /
    ``--seed`` name."""
    if args.grid:
        return paper_grid(spec, args)
    return Grid((make_config(spec, args, args.model_type, args.solver, args.seed),))


# ---------------------------------------------------------------------------------------------- networks
def build_network(spec: ExperimentSpec, cfg: RunConfig, num_classes: Optional[int] = None) -> Any:
    """The run's network (``deqlab.models.build_model``), a plain ``nn.Module``."""
    from deqlab.models import build_model

    return build_model(
        cfg.experiment,
        cfg.arch,
        model_type=cfg.model_type,
        solver=cfg.solver,
        jacobian_regularization=cfg.jacobian_regularization,
        num_classes=num_classes or spec.num_classes,
        **cfg.model_options,
    )


def count_parameters(model: Any) -> int:
    """Trainable parameters, counted as the paper counts them (``deqlab.models.count_parameters``)."""
    from deqlab.models import count_parameters as count

    return int(count(model))


# ---------------------------------------------------------------------------------------------- steps
def steps_per_epoch(train_samples: int, batch_size: int, world_size: int) -> int:
    """Optimizer steps per epoch: Lightning's DistributedSampler gives each rank ceil(N / world) samples."""
    per_rank = math.ceil(train_samples / world_size)
    return math.ceil(per_rank / batch_size)


def total_steps(cfg: RunConfig, per_epoch: int) -> int:
    """Optimizer steps the run will take: the shorter of its epochs and its ``max_steps``."""
    by_epochs = cfg.epochs * per_epoch if cfg.epochs > 0 else None
    if cfg.max_steps > 0:
        return cfg.max_steps if by_epochs is None else min(cfg.max_steps, by_epochs)
    assert by_epochs is not None
    return by_epochs


def describe_plan(
    spec: ExperimentSpec, cfg: RunConfig, plan: DevicePlan, parameters: int, train_samples: int, test_samples: int
) -> str:
    """The plan of one run in lines (printed by ``--dry-run`` and at the start of every run)."""
    from deqlab.models import protocol_summary

    per_epoch = steps_per_epoch(train_samples, cfg.batch_size, plan.world_size)
    steps = total_steps(cfg, per_epoch)
    schedule = f"{cfg.epochs} epochs" if cfg.epochs > 0 else "no epoch limit"
    if cfg.max_steps > 0:
        schedule += f", at most {cfg.max_steps} steps"
    t = cfg.training
    lines = [
        f"plan: {cfg.label}",
        f"  protocol          {protocol_summary(cfg.experiment, cfg.arch, cfg.protocol)}",
        f"  solver            {cfg.solver_label}"
        + (f", model options {cfg.model_options}" if cfg.model_options else ""),
        f"  parameters        {parameters:,}",
        f"  devices           {plan.accelerator} x {plan.devices} per node x {plan.num_nodes} node(s) = {plan.world_size} process(es)",
        f"  strategy          {plan.strategy}",
        f"  batch per process {cfg.batch_size}",
        f"  effective batch   {cfg.batch_size * plan.world_size}",
        f"  data              {train_samples} train / {test_samples} test samples, augment={cfg.augment}, "
        f"{'normalized' if cfg.normalize else 'raw [0, 1] pixels'}",
        f"  schedule          {schedule}: {per_epoch} steps per epoch, {steps} steps in all",
        f"  optimizer         {t.get('optimizer')} lr {t.get('lr')} wd {t.get('weight_decay')}, scheduler {t.get('scheduler')}",
        f"  losses            skip weight {t.get('skip_loss_weight', 0.0)}, "
        f"jacobian weight {t.get('jacobian_loss_weight', 0.0) if cfg.jacobian_regularization else 0.0}",
        f"  pretraining       {t.get('pretrain_steps', 0)} steps at depth {t.get('pretrain_depth', 5)}",
    ]
    if cfg.changes:
        lines.append("  changed           " + ", ".join(f"{k}={v!r} ({flag})" for flag, k, v in cfg.changes))
    return "\n".join(lines)
