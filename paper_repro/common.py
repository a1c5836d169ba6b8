"""Shared pieces of the paper-reproduction scripts: arguments, Trainer, results table.

Why shared: every experiment of the paper (MNIST dense/conv, SVHN, CIFAR-10, ImageNet) has the same
knobs (model type, seed, devices, epochs, a short-run step limit) and reports the same numbers (test
accuracy, explicit accuracy, forward/backward NFE, wall time), so each script only builds its model and
data module.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "paper_repro" / "results"
#: The paper's seeds (v1): each grid point was trained with each of them.
PAPER_SEEDS = (6171, 3859, 2961)

log = logging.getLogger("paper_repro")


def base_parser(description: str, *, default_epochs: int, default_batch_size: int) -> argparse.ArgumentParser:
    """Arguments every experiment script accepts (the script adds its own)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-type", choices=["vanilla", "skip", "skip_reg"], default="skip",
                   help="DEQ variant: vanilla (u0 = 0), skip (learned shortcut predicts u0), skip_reg (u0 = f(0, x))")
    p.add_argument("--jac-reg", action="store_true", help="add the Hutchinson Jacobian regularization term")
    p.add_argument("--seed", type=int, default=PAPER_SEEDS[0], help=f"random seed (paper: {', '.join(map(str, PAPER_SEEDS))})")
    p.add_argument("--gpus", type=int, default=0,
                   help="GPUs to use; 0 trains on the CPU, N > 1 uses DDP with the batch size per process")
    p.add_argument("--num-nodes", type=int, default=1, help="machines for multi-node DDP (launch one process per GPU)")
    p.add_argument("--epochs", type=int, default=default_epochs, help="training epochs")
    p.add_argument("--max-steps", type=int, default=-1,
                   help="stop after this many optimizer steps (a short run; -1: run all epochs). The cosine "
                        "schedule then spans these steps")
    p.add_argument("--batch-size", type=int, default=default_batch_size, help="samples per batch and process")
    p.add_argument("--data-dir", type=Path, default=REPO / "data", help="dataset root (torchvision layout)")
    p.add_argument("--download", action="store_true", help="download the dataset into --data-dir when missing")
    p.add_argument("--num-workers", type=int, default=2, help="data loader worker processes")
    p.add_argument("--log-dir", type=Path, default=REPO / "runs" / "paper_repro", help="TensorBoard log directory")
    p.add_argument("--limit-val-batches", type=float, default=1.0,
                   help="fraction (<= 1.0) or number (> 1) of validation batches per epoch")
    p.add_argument("--limit-test-batches", type=float, default=1.0,
                   help="fraction (<= 1.0) or number (> 1) of test batches")
    p.add_argument("--results", nargs="?", const=str(RESULTS_DIR), default=None, metavar="DIR",
                   help="append the run's numbers to DIR/<experiment>.json and .md (default DIR: paper_repro/results)")
    return p


def _limit(value: float) -> Any:
    return int(value) if value > 1 else float(value)


def make_trainer(args: argparse.Namespace, experiment: str) -> pl.Trainer:
    """A Trainer for ``args``: CPU for ``--gpus 0``, else GPUs (DDP when more than one or several nodes)."""
    if args.gpus < 0:
        raise SystemExit("--gpus must be >= 0")
    distributed = args.gpus > 1 or args.num_nodes > 1
    logger = TensorBoardLogger(
        str(args.log_dir), name=f"{experiment}_{args.model_type}{'_jac' if args.jac_reg else ''}_s{args.seed}",
        default_hp_metric=False,
    )
    return pl.Trainer(
        accelerator="gpu" if args.gpus > 0 else "cpu",
        devices=args.gpus if args.gpus > 0 else 1,
        num_nodes=args.num_nodes,
        strategy="ddp" if distributed else "auto",
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        limit_val_batches=_limit(args.limit_val_batches),
        limit_test_batches=_limit(args.limit_test_batches),
        logger=logger,
        log_every_n_steps=min(50, args.max_steps) if args.max_steps > 0 else 50,
        enable_checkpointing=args.max_steps < 0,
        enable_progress_bar=False,
    )


def run(model: pl.LightningModule, data: pl.LightningDataModule, args: argparse.Namespace, experiment: str) -> Dict[str, Any]:
    """Fit and test; return one row of the results table (rank zero's view)."""
    pl.seed_everything(args.seed, workers=True)
    trainer = make_trainer(args, experiment)
    start = time.perf_counter()
    trainer.fit(model, data)
    fit_s = time.perf_counter() - start
    train = {k: float(v) for k, v in trainer.callback_metrics.items()}
    test = trainer.test(model, data, verbose=False)[0]
    return {
        "experiment": experiment,
        "model_type": args.model_type,
        "jac_reg": bool(args.jac_reg),
        "seed": args.seed,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "test_accuracy": test.get("test/accuracy"),
        "explicit_accuracy": test.get("test/explicit_accuracy"),
        "test_nfe": test.get("solver/test_nfe"),
        "test_time_per_batch_s": test.get("time/test_forward"),
        "explicit_time_per_batch_s": test.get("test/explicit_time"),
        "train_nfe": train.get("solver/train_nfe_epoch"),
        "train_backward_nfe": train.get("solver/train_backward_nfe_epoch"),
        "fit_time_s": fit_s,
        "devices": trainer.num_devices * trainer.num_nodes,
        "accelerator": "gpu" if args.gpus > 0 else "cpu",
        "log_dir": trainer.logger.log_dir if trainer.logger else None,
    }


def write_results(row: Dict[str, Any], directory: Path, experiment: str) -> List[Path]:
    """Append ``row`` to ``directory/<experiment>.json`` and rewrite the markdown table beside it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{experiment}.json"
    rows: List[Dict[str, Any]] = json.loads(json_path.read_text()) if json_path.exists() else []
    rows.append(row)
    json_path.write_text(json.dumps(rows, indent=2) + "\n")
    md_path = directory / f"{experiment}.md"
    md_path.write_text(markdown_table(rows, title=experiment))
    return [json_path, md_path]


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _num(v: Optional[float], spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(rows: List[Dict[str, Any]], title: str) -> str:
    lines = [
        f"# {title}",
        "",
        "| model | jac reg | seed | steps | test acc | explicit acc | test NFE | train NFE | backward NFE | fit time (s) | devices |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model_type']} | {'yes' if r['jac_reg'] else 'no'} | {r['seed']} | {r['steps']} | "
            f"{_pct(r['test_accuracy'])} | {_pct(r['explicit_accuracy'])} | {_num(r['test_nfe'])} | "
            f"{_num(r['train_nfe'])} | {_num(r['train_backward_nfe'])} | {_num(r['fit_time_s'], '.0f')} | "
            f"{r['devices']} {r['accelerator']} |"
        )
    return "\n".join(lines) + "\n"
