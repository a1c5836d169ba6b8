"""The command line every experiment script shares: :class:`ExperimentSpec` (what a script contributes) and
the arguments, typed flags and their checks.

Why one parser: every experiment of the paper has the same knobs (model type, solver, seed, devices,
schedule, subsets, grid), so a script only names its experiment, architectures and data module. The
choices (model types, solver kinds, integrators, protocols, seeds) are read from ``deqlab.models``, the
library that builds the models, so the command line cannot offer a name the library does not know.

Importing this module imports torch (through ``deqlab.models``) but never Lightning: ``--help``,
``--dry-run`` and ``--list-grid`` stay free of Lightning's import.
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from deqlab.models import MODEL_TYPES, PROTOCOLS, SOLVER_KINDS
from deqlab.models._build import ODE_SOLVERS
from deqlab.models.settings import SEEDS as PAPER_SEEDS
from paper_repro.results import DEFAULT_LOG_DIR, DEFAULT_RESULTS_DIR, REPO

__all__ = [
    "ExperimentSpec",
    "TypedFlag",
    "TYPED_FLAGS",
    "build_parser",
    "parse_args",
    "MODEL_TYPES",
    "SOLVERS",
    "ODE_SOLVERS",
    "PROTOCOLS",
    "PAPER_SEEDS",
]

#: the DEQ solver kinds (``--solver``), deqlab.models' ``SOLVER_KINDS``
SOLVERS = SOLVER_KINDS


# ---------------------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class ExperimentSpec:
    """What a script contributes: the experiment's name in ``deqlab.models``, its architectures, its data.

    Args:
        name: the experiment key of ``deqlab.models.build_model`` (``mnist``, ``svhn``, ``cifar10``, ``imagenet``).
        archs: architectures the script accepts; the first is the default.
        make_data: ``make_data(args, arch, batch_size, seed, augment, num_workers, **options) -> data module``
            built with ``val_fraction=0`` (the paper trains on the full training set and evaluates on the
            test set).
        train_size, test_size: sizes of the official splits, for ``--dry-run`` plans made without data.
        num_classes: classes, for building the model before any data is read.
        description: the script's one-line description (``--help``).
        extra_arguments: ``extra_arguments(parser)`` adds the script's own options (ImageNet's ``--image-size``).
        aliases: alternative architecture names -> canonical ones (recorded in the CSV by the canonical name).
        default_workers: data loader workers per process unless ``--num-workers`` says otherwise.
        model_options: ``model_options(args) -> dict``: ``build_model`` keywords that follow from the script's
            own options.
    """

    name: str
    archs: Tuple[str, ...]
    make_data: Callable[..., Any]
    train_size: int
    test_size: int
    num_classes: int = 10
    description: str = ""
    extra_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None
    aliases: Dict[str, str] = field(default_factory=dict)
    default_workers: int = 2
    model_options: Optional[Callable[[argparse.Namespace], Dict[str, Any]]] = None


# ---------------------------------------------------------------------------------------------- typed flags
@dataclass(frozen=True)
class TypedFlag:
    """A typed flag for a setting people change often, standing for one ``--model-option`` or ``--override`` key.

    Why typed: ``--tol 1e-3`` is checked by argparse (a number, listed in ``--help``), where
    ``--model-option tol=1e-3`` is parsed by ``ast.literal_eval`` and only fails deep inside ``build_model``.

    Args:
        flag: the option (``--tol``).
        dest: its attribute on the parsed namespace.
        target: ``model`` (a ``build_model`` keyword, like ``--model-option``) or ``training`` (a
            ``paper_settings`` training setting, like ``--override``).
        key: the keyword or setting it sets.
        kind: ``float`` or ``int``.
        minimum: the bound on the value: ``value >= minimum``, or ``value > minimum`` with ``strict``.
        help: the ``--help`` text.
        strict: the bound excludes ``minimum`` itself (a tolerance of 0 is never met).
    """

    flag: str
    dest: str
    target: str
    key: str
    kind: Callable[[str], Any]
    minimum: float
    help: str
    strict: bool = False

    @property
    def generic(self) -> str:
        """The untyped option that sets the same key: ``--model-option`` or ``--override``."""
        return "--model-option" if self.target == "model" else "--override"

    @property
    def setting(self) -> str:
        """What the flag sets, in words (``build_model's tol``)."""
        return f"build_model's {self.key}" if self.target == "model" else f"the training setting {self.key}"


TYPED_FLAGS: Tuple[TypedFlag, ...] = (
    TypedFlag(
        "--tol",
        "tol",
        "model",
        "tol",
        float,
        0.0,
        "forward solver termination tolerance (abs = rel; also the adjoint's and the ODE stepper's); build_model's tol",
        strict=True,
    ),
    TypedFlag(
        "--max-solver-steps",
        "max_solver_steps",
        "model",
        "max_steps",
        int,
        1,
        "forward solver budget (iterations or ODE steps); build_model's max_steps (not --max-steps, "
        "the optimizer steps)",
    ),
    TypedFlag(
        "--backward-steps",
        "backward_steps",
        "model",
        "backward_max_steps",
        int,
        1,
        "adjoint (GMRES) VJP budget of the implicit backward; build_model's backward_max_steps",
    ),
    TypedFlag(
        "--skip-weight",
        "skip_weight",
        "training",
        "skip_loss_weight",
        float,
        0.0,
        "lambda_skip, the weight of the Skip loss ||u0 - z*||; the training setting skip_loss_weight",
    ),
)


def typed_settings(args: argparse.Namespace, target: str) -> List[Tuple[TypedFlag, Any]]:
    """The typed flags given on the command line for ``target`` (``model`` or ``training``), with their values."""
    return [
        (f, getattr(args, f.dest))
        for f in TYPED_FLAGS
        if f.target == target and getattr(args, f.dest, None) is not None
    ]


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


class _DefaultsOnceFormatter(argparse.HelpFormatter):
    """Shows a default once: appended as ``(default: X)`` unless the help text already says what the
    default is (the paper's settings, which depend on the architecture) or there is nothing to show (a
    flag, an empty list, ``None``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def paper_defaults_text(spec: ExperimentSpec, run_key: str = "", model_key: str = "", training_key: str = "") -> str:
    """``(default: the paper's: dense 25, conv 25)``: a setting's paper value for each architecture of the
    experiment (the paper's protocol), read from deqlab.models, so ``--help`` says what ``None`` means."""
    from deqlab.models import paper_settings
    from deqlab.models.builder import default_config

    values = []
    for arch in (a for a in spec.archs if a not in spec.aliases):
        if model_key:
            value = getattr(default_config(spec.name, arch), model_key, None)
        else:
            settings = paper_settings(spec.name, arch, "skip")
            value = settings.get(run_key or training_key)
        values.append(f"{arch} {'-' if value is None else value}")
    return f"(default: the paper's: {', '.join(values)})"


def build_parser(spec: ExperimentSpec) -> argparse.ArgumentParser:
    """The arguments of every experiment script. Defaults ``None`` mean "the paper's setting"; ``--help``
    says what that is for each architecture, once."""
    p = argparse.ArgumentParser(description=spec.description, formatter_class=_DefaultsOnceFormatter)
    p.add_argument("--arch", choices=list(spec.archs), default=spec.archs[0], help="architecture")
    p.add_argument(
        "--model-type",
        choices=list(MODEL_TYPES),
        default="skip",
        help="vanilla (u0 = 0), skip (learned u0 predictor), skip_reg (u0 = f(0, x)), "
        "neural_ode (finite-time multiscale neural ODE baseline)",
    )
    p.add_argument(
        "--solver",
        choices=list(SOLVERS),
        default="discrete",
        help="continuous: integrate du/dt = f(u) - u to its steady state; discrete: limited-memory Broyden",
    )
    p.add_argument(
        "--ode-solver",
        choices=list(ODE_SOLVERS),
        default=None,
        help="integrator of the continuous solver (default: the paper's for the experiment: tsit5 for "
        "MNIST and the v1 models, vcab3 for CIFAR-10 small/large and ImageNet)",
    )
    p.add_argument(
        "--protocol",
        choices=list(PROTOCOLS),
        default="paper",
        help="paper: the protocol the paper's text states (MNIST dense: Adam 1e-3 constant, "
        "lambda_skip 0.01); v1: the January-2022 reference code's settings and semantics "
        "(AdamW + cosine, lambda_skip 5, batch-wide termination, z* = f(u_T, x), the skip penalty "
        "on vanilla, raw pixels)",
    )
    p.add_argument("--jac-reg", action="store_true", help="add the Hutchinson Jacobian regularization term")
    p.add_argument("--seed", type=int, default=None, help=f"random seed (default: the paper's first, {PAPER_SEEDS[0]})")
    g = p.add_argument_group("schedule (default: the paper's)")
    g.add_argument(
        "--epochs", type=int, default=None, help=f"training epochs {paper_defaults_text(spec, run_key='epochs')}"
    )
    g.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many optimizer steps (the cosine schedule then spans them); -1: no limit "
        f"{paper_defaults_text(spec, run_key='max_steps')}",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"samples per batch and process {paper_defaults_text(spec, run_key='batch_size')}",
    )
    g.add_argument(
        "--val-every", type=int, default=1, help="evaluate on the test set every N epochs (and always at the end)"
    )
    g.add_argument(
        "--override",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change one training setting of paper_settings (e.g. lr=5e-4, pretrain_steps=0)",
    )
    g.add_argument(
        "--model-option",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra keyword for deqlab.models.build_model (e.g. mode='abs')",
    )
    s = p.add_argument_group("solver and loss (default: the paper's; each is one --model-option / --override key)")
    for f in TYPED_FLAGS:
        paper = (
            paper_defaults_text(spec, model_key=f.key)
            if f.target == "model"
            else paper_defaults_text(spec, training_key=f.key)
        )
        s.add_argument(
            f.flag,
            dest=f.dest,
            type=f.kind,
            default=None,
            metavar="N" if f.kind is int else "X",
            help=f"{f.help} {paper}",
        )
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", type=Path, default=REPO / "data", help="dataset root (torchvision layout)")
    if spec.name != "imagenet":  # ImageNet needs registration; its data module refuses to download
        d.add_argument("--download", action="store_true", help="download the dataset into --data-dir when missing")
    d.add_argument(
        "--train-subset", type=int, default=None, metavar="N", help="train on a fixed random N of the training set"
    )
    d.add_argument(
        "--test-subset", type=int, default=None, metavar="N", help="evaluate on a fixed random N of the test set"
    )
    d.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help=f"data loader workers per process (default: {spec.default_workers})",
    )
    h = p.add_argument_group("devices")
    h.add_argument(
        "--gpus", type=int, default=0, help="0: CPU; 1: one GPU; N > 1: DDP over N GPUs (batch size per process)"
    )
    h.add_argument("--accelerator", default=None, help="Lightning accelerator (cpu, gpu, ...); overrides --gpus")
    h.add_argument(
        "--devices",
        type=int,
        default=None,
        help="processes per node with --accelerator (CPU DDP: --accelerator cpu --devices 2)",
    )
    h.add_argument(
        "--num-nodes",
        type=int,
        default=1,
        help="machines for multi-node DDP (under SLURM: launch with srun, --nodes = this, --ntasks-per-node = --gpus)",
    )
    h.add_argument(
        "--strategy", default=None, help="Lightning strategy (default: ddp when more than one process, else auto)"
    )
    h.add_argument("--precision", default=None, help="Lightning precision (default 32-true)")
    r = p.add_argument_group("grid and results")
    r.add_argument(
        "--grid",
        action="store_true",
        help="run the paper's grid (model types x solvers x seeds) in sequence; runs already recorded are skipped",
    )
    r.add_argument(
        "--list-grid",
        action="store_true",
        help="print the grid's cells (index, label, 'done' when recorded) and exit: the indices --grid-cell takes",
    )
    r.add_argument(
        "--grid-cell",
        type=int,
        default=None,
        metavar="I",
        help="run only cell I (0-based) of the grid --grid would run with the same other flags, writing its "
        "row to <results-dir>/cells/<experiment>/ (safe to run cells at once, e.g. a SLURM job array "
        "with --grid-cell $SLURM_ARRAY_TASK_ID)",
    )
    r.add_argument(
        "--model-types",
        type=_csv_list(str),
        default=None,
        help="narrow the grid, e.g. vanilla,skip (default: all four)",
    )
    r.add_argument(
        "--solvers", type=_csv_list(str), default=None, help="narrow the grid, e.g. continuous (default: both)"
    )
    r.add_argument(
        "--ode-solvers",
        type=_csv_list(str),
        default=None,
        help="continuous runs of the grid with each of these integrators, e.g. tsit5,vcab3 "
        "(default: --ode-solver, else the paper's)",
    )
    r.add_argument(
        "--save-model",
        action="store_true",
        help="save each run's trained network (state_dict) as <results-dir>/models/<run>.pt "
        "(what paper_repro/timing.py --models-dir times)",
    )
    r.add_argument(
        "--no-checkpoints",
        dest="checkpoints",
        action="store_false",
        help="do not checkpoint runs (default: each run saves <results-dir>/checkpoints/<run>/last.ckpt at every "
        "epoch's end and resumes from it when started again, so a killed 25-epoch run loses at most one epoch; "
        "the checkpoint is deleted once the run's row is written)",
    )
    r.add_argument("--seeds", type=_csv_list(int), default=None, help="grid seeds (default: the paper's)")
    r.add_argument(
        "--results-dir",
        type=Path,
        default=DEFAULT_RESULTS_DIR,
        help="where <experiment>.csv and <experiment>_epochs.csv go",
    )
    r.add_argument("--log-dir", type=Path, default=DEFAULT_LOG_DIR, help="TensorBoard log directory")
    r.add_argument(
        "--progress",
        choices=["bar", "lines", "none"],
        default=None,
        help="progress display (default: bar on a terminal, periodic lines otherwise)",
    )
    r.add_argument("--log-every", type=int, default=50, help="steps between progress lines and TensorBoard points")
    r.add_argument("--figures", action="store_true", help="also log NFE histograms and convergence figures")
    r.add_argument("--dry-run", action="store_true", help="build the model(s), print the plan and exit without data")
    if spec.extra_arguments is not None:
        spec.extra_arguments(p)
    return p


def _check_typed_flags(args: argparse.Namespace) -> None:
    """Each typed flag in range, and never given twice: a typed flag and the same key through
    ``--model-option`` / ``--override`` would leave the run's setting to argument order, so both at once
    stop with one line naming them."""
    given = {"model": dict(args.model_option), "training": dict(args.override)}
    for f in TYPED_FLAGS:
        value = getattr(args, f.dest)
        if value is None:
            continue
        if value < f.minimum or (f.strict and value == f.minimum):
            raise SystemExit(f"error: {f.flag} must be {'>' if f.strict else '>='} {f.minimum:g}, got {value}")
        if f.key in given[f.target]:
            raise SystemExit(
                f"error: {f.flag} {value} and {f.generic} {f.key}={given[f.target][f.key]!r} both set "
                f"{f.setting}; give one of them"
            )


def parse_args(spec: ExperimentSpec, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` and check what argparse cannot: positive sizes, grid names the library knows, typed
    flags in range and not given twice."""
    args = build_parser(spec).parse_args(argv)
    args.arch = spec.aliases.get(args.arch, args.arch)
    for name in ("train_subset", "test_subset", "batch_size", "epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {value}")
    if args.gpus < 0:
        raise SystemExit(f"error: --gpus must be >= 0, got {args.gpus}")
    if args.grid_cell is not None and args.grid_cell < 0:
        raise SystemExit(f"error: --grid-cell must be >= 0, got {args.grid_cell}")
    for name, allowed in (("model_types", MODEL_TYPES), ("solvers", SOLVERS), ("ode_solvers", ODE_SOLVERS)):
        bad = [v for v in (getattr(args, name) or []) if v not in allowed]
        if bad:
            raise SystemExit(
                f"error: --{name.replace('_', '-')}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}"
            )
    _check_typed_flags(args)
    return args
