"""Running the plan: :func:`main` (what every script calls) and :func:`run_one` (fit, test, record one run).

Why Lightning is imported inside :func:`run_one` (with ``paper_repro.data``, ``paper_repro.recording`` and
``paper_repro.resume``):
``--help``, ``--dry-run`` and ``--list-grid`` only parse, plan and print, and Lightning's import costs
several seconds; those paths import torch (``deqlab.models``) and nothing of Lightning.

Where rows go: a single run and ``--grid`` append to ``<results-dir>/<experiment>.csv`` (and
``_epochs.csv``); ``--grid-cell I`` writes ``<results-dir>/cells/<experiment>/<cell>.csv`` (and
``_epochs.csv``) so that cells can run at the same time (see ``paper_repro.results``). Both skip a run
whose key is already recorded in either place.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from paper_repro.cli import ExperimentSpec, parse_args
from paper_repro.plan import (
    DevicePlan,
    RunConfig,
    build_network,
    count_parameters,
    describe_plan,
    paper_grid,
    planned_runs,
    resolve_devices,
    steps_per_epoch,
    total_steps,
)
from paper_repro.results import EPOCH_COLUMNS, REPO, RESULT_COLUMNS, ResultFiles, append_row, write_row

__all__ = ["main", "run_one", "list_grid", "build_module"]


def build_module(network: Any, cfg: RunConfig, num_classes: int) -> Any:
    """The LightningModule that trains ``network`` with the run's training settings (``DEQClassifier``)."""
    from deqlab.zoo import DEQClassifier

    kwargs = dict(cfg.training)
    kwargs.setdefault("num_classes", num_classes)
    return DEQClassifier(network, **kwargs)  # the network stays out of the recorded hyperparameters


def _device_name(plan: DevicePlan) -> str:
    if plan.accelerator in ("gpu", "cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _versions() -> Dict[str, str]:
    import pytorch_lightning
    import torch

    import deqlab

    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return dict(
        torch_version=torch.__version__,
        lightning_version=pytorch_lightning.__version__,
        deqlab_version=getattr(deqlab, "__version__", "?"),
        git_commit=commit,
    )


# ---------------------------------------------------------------------------------------------- one run
def run_one(
    spec: ExperimentSpec, cfg: RunConfig, args: argparse.Namespace, plan: DevicePlan, cell: Optional[str] = None
) -> Dict[str, Any]:
    """Fit and test one configuration; record its rows (rank zero) and return its run row.

    Args:
        spec: the script's experiment.
        cfg: the run.
        args: the parsed command line (data, devices, output options).
        plan: the devices.
        cell: the run's grid-cell name (``--grid-cell``): its rows go to that cell's own files, the run row
            written atomically; ``None``: appended to the shared tables.
    """
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from paper_repro.data import PaperData, check_data
    from paper_repro.recording import RunRecorder, as_float, fmt, mean, median
    from paper_repro.resume import RunCheckpoint

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
    files = ResultFiles(Path(args.results_dir), spec.name)
    epochs_csv = files.epochs_csv if cell is None else files.cell_epochs_csv(cell)
    runs_csv = files.runs_csv if cell is None else files.cell_runs_csv(cell)
    recorder = RunRecorder(cfg, epochs_csv, total, progress, max(1, args.log_every))
    ckpt = RunCheckpoint(Path(args.results_dir), cfg.cell_name(plan.world_size)) if args.checkpoints else None
    resume_from = ckpt.resume_from() if ckpt is not None else None
    logger = TensorBoardLogger(
        str(args.log_dir),
        name=cfg.run_name,
        default_hp_metric=False,
        version=ckpt.log_version() if resume_from is not None and ckpt is not None else None,
    )
    callbacks: List[Any] = [recorder]
    if ckpt is not None:
        callbacks.append(ckpt.callback())
    trainer_kwargs: Dict[str, Any] = dict(
        accelerator=plan.accelerator,
        devices=plan.devices,
        num_nodes=plan.num_nodes,
        strategy=plan.strategy,
        max_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        check_val_every_n_epoch=max(1, args.val_every),
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=max(1, min(args.log_every, per_epoch, total)),
        enable_checkpointing=False,  # no ModelCheckpoint in the log folder: the run's own is `ckpt`
        enable_progress_bar=progress == "bar",
        enable_model_summary=False,
    )
    if args.precision:
        trainer_kwargs["precision"] = args.precision
    trainer = pl.Trainer(**trainer_kwargs)
    if trainer.is_global_zero:
        if cell is not None and resume_from is None:
            # An unfinished earlier attempt of this cell (a killed or requeued job) may have left epoch rows:
            # the cell starts over, so its epoch file does too. (Resumed from a checkpoint, the recorder
            # drops only the rows of the epochs it trains again.)
            epochs_csv.unlink(missing_ok=True)
        print(describe_plan(spec, cfg, plan, parameters, train_samples, test_samples), flush=True)
        if ckpt is not None:
            ckpt.remember_log_version(logger.version)
            if resume_from is not None:
                print(f"[{cfg.label}] resuming from {resume_from}", flush=True)
    trainer.fit(module, datamodule=data, ckpt_path=str(resume_from) if resume_from is not None else None)
    fit_s = recorder.fit_seconds()  # every attempt's training, when the run was resumed
    start = time.perf_counter()
    test = trainer.test(module, datamodule=data, verbose=False)[0]  # always evaluated at the end
    test_s = time.perf_counter() - start

    steps = int(trainer.global_step)
    epochs_done = steps / per_epoch if per_epoch else 0.0
    measured = recorder.full_epochs > 0
    step_time = median(recorder.step_times)
    epoch_time = mean(recorder.epoch_times) if measured else (None if step_time is None else step_time * per_epoch)
    last = recorder.last_epoch
    row: Dict[str, Any] = dict(
        experiment=cfg.experiment,
        arch=cfg.arch,
        model_type=cfg.model_type,
        solver=cfg.solver,
        jac_reg=cfg.jacobian_regularization,
        seed=cfg.seed,
        requested_epochs=cfg.epochs,
        requested_max_steps=cfg.max_steps,
        train_subset=cfg.train_subset or "",
        test_subset=cfg.test_subset or "",
        batch_size_per_process=cfg.batch_size,
        world_size=plan.world_size,
        test_accuracy=as_float(test.get("test/accuracy")),
        test_top5_accuracy=as_float(test.get("test/top5_accuracy")),
        explicit_accuracy=as_float(test.get("test/explicit_accuracy")),
        test_loss=as_float(test.get("test/loss")),
        train_time_per_step_s=step_time,
        train_time_per_epoch_s=epoch_time,
        epoch_time_measured=measured,
        forward_time_s=median(recorder.phase["forward"]),
        backward_time_s=median(recorder.phase["backward"]),
        optimizer_time_s=median(recorder.phase["optimizer"]),
        prediction_time_s=as_float(test.get("time/test_forward")),
        explicit_time_s=as_float(test.get("test/explicit_time")),
        train_nfe=last.get("train_nfe"),
        test_nfe=as_float(test.get("solver/test_nfe")),
        backward_nfe=last.get("train_backward_nfe"),
        train_reference_nfe=last.get("train_reference_nfe"),
        test_reference_nfe=as_float(test.get("solver/test_reference_nfe")),
        protocol=cfg.protocol,
        ode_solver=cfg.ode_solver,
        parameters=parameters,
        steps=steps,
        epochs=round(epochs_done, 4),
        steps_per_epoch=per_epoch,
        effective_batch_size=cfg.batch_size * plan.world_size,
        train_samples=train_samples,
        test_samples=test_samples,
        pretrain_steps=cfg.training.get("pretrain_steps", 0),
        fit_time_s=fit_s,
        test_time_s=test_s,
        device=_device_name(plan),
        accelerator=plan.accelerator,
        num_processes=plan.world_size,
        strategy=plan.strategy,
        log_dir=trainer.logger.log_dir if trainer.logger else "",
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **_versions(),
    )
    if trainer.is_global_zero and getattr(args, "save_model", False):
        import torch

        path = Path(args.results_dir) / "models" / f"{cfg.run_name.replace('/', '__')}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "state_dict": network.state_dict(),
                "label": cfg.label,
                "model_type": cfg.model_type,
                "solver": cfg.solver,
                "ode_solver": cfg.ode_solver,
                "jacobian_regularization": cfg.jacobian_regularization,
                "model_options": cfg.model_options,
                "protocol": cfg.protocol,
                "seed": cfg.seed,
            },
            path,
        )
    if trainer.is_global_zero:
        # the epoch rows first: a run row on disk means the run's epoch rows are complete
        append_row(epochs_csv, recorder.test_row(trainer, test), EPOCH_COLUMNS)
        if cell is None:
            append_row(runs_csv, row, RESULT_COLUMNS)
        else:
            write_row(runs_csv, row, RESULT_COLUMNS)
        if ckpt is not None:
            ckpt.remove()  # the run is recorded: starting it again must train afresh, not resume
        print(
            f"[{cfg.label}] done: test accuracy {fmt(row['test_accuracy'])}, explicit "
            f"{fmt(row['explicit_accuracy'])}, test NFE {fmt(row['test_nfe'], '.1f')} "
            f"(paper's count {fmt(row['test_reference_nfe'], '.1f')}), {steps} steps "
            f"({row['epochs']} epochs), {fmt(step_time, '.4f')} s/step, fit {fit_s:.0f} s -> {runs_csv}",
            flush=True,
        )
    return row


# ---------------------------------------------------------------------------------------------- main
def list_grid(spec: ExperimentSpec, args: argparse.Namespace) -> List[RunConfig]:
    """Print the grid's cells on stdout, one a line: ``index<TAB>label``, plus ``<TAB>done`` for a cell
    already recorded; notes and the count (with the ``--array`` range for SLURM) go to stderr, so stdout
    stays one line per cell. Reads no data and imports no Lightning."""
    grid = paper_grid(spec, args)
    plan = resolve_devices(args, check=False)
    done = ResultFiles(Path(args.results_dir), spec.name).finished()
    for note in grid.notes:
        print(note, file=sys.stderr)
    for i, cfg in enumerate(grid.cells):
        print(f"{i}\t{cfg.label}" + ("\tdone" if cfg.key(plan.world_size) in done else ""))
    n = len(grid)
    left = sum(1 for cfg in grid.cells if cfg.key(plan.world_size) not in done)
    print(f"{n} cell(s), {left} not recorded yet; SLURM: #SBATCH --array=0-{max(n - 1, 0)}", file=sys.stderr)
    return list(grid.cells)


def main(spec: ExperimentSpec, argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Parse, plan, and run; or only print the plan (``--dry-run``) or the grid's cells (``--list-grid``).
    Returns the run rows written."""
    args = parse_args(spec, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is an instance of `nn.Module` and is already saved.*")
    if args.list_grid:
        list_grid(spec, args)
        return []
    plan = resolve_devices(args, check=not args.dry_run)
    cell_index = args.grid_cell
    if cell_index is not None:
        grid = paper_grid(spec, args)
        if cell_index >= len(grid):
            raise SystemExit(
                f"error: --grid-cell {cell_index}: the grid has {len(grid)} cell(s), 0 to {len(grid) - 1} "
                "(--list-grid lists them)"
            )
        configs = [grid.cells[cell_index]]
    else:
        grid = planned_runs(spec, args)
        configs = list(grid.cells)
        for note in grid.notes:
            print(note)
    if args.dry_run:
        for cfg in configs:
            network = build_network(spec, cfg)
            train = min(cfg.train_subset or spec.train_size, spec.train_size)
            test = min(cfg.test_subset or spec.test_size, spec.test_size)
            print(describe_plan(spec, cfg, plan, count_parameters(network), train, test))
        print(f"dry run: {len(configs)} run(s) planned, nothing trained")
        return []
    files = ResultFiles(Path(args.results_dir), spec.name)
    done = files.finished()  # read once, before any run, so every DDP rank sees the same list
    rows = []
    for i, cfg in enumerate(configs, 1):
        counter = f"cell {cell_index} of 0-{len(grid) - 1}" if cell_index is not None else f"{i}/{len(configs)}"
        key = cfg.key(plan.world_size)
        if key in done:
            print(f"[{counter}] {cfg.label}: already in {done[key]}, skipped", flush=True)
            continue
        print(f"[{counter}] {cfg.label}", flush=True)
        cell = cfg.cell_name(plan.world_size) if cell_index is not None else None
        rows.append(run_one(spec, cfg, args, plan, cell=cell))
    return rows
