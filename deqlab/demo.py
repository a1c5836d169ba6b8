"""``make demo``: train a Skip DEQ and a vanilla DEQ on the embedded 8×8 digits, then compare them.

Runs offline on a CPU in well under three minutes, logs to TensorBoard (``runs/demo``) and prints a table
of test accuracy, explicit (u0-only) accuracy, forward/backward NFE and time per epoch, followed by the
``tensorboard`` command that opens the logs. ``python -m deqlab.demo --help`` lists the options.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = ["main", "format_table", "run_one"]

DEFAULT_LOG_DIR = "runs/demo"
MODEL_TYPES = ("skip", "vanilla")


def run_one(
    model_type: str,
    *,
    epochs: int,
    log_dir: str,
    seed: int = 0,
    width: int = 64,
    limit_train_batches: Optional[int] = None,
) -> Dict[str, Any]:
    """Train and test one ``DigitsDEQ``; return its row of the comparison table."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from deqlab.data import DigitsDataModule
    from deqlab.zoo import DigitsDEQ

    pl.seed_everything(seed, verbose=False)
    model = DigitsDEQ(model_type=model_type, width=width)  # type: ignore[arg-type]
    data = DigitsDataModule(batch_size=64, seed=seed, flatten=True)
    logger = TensorBoardLogger(log_dir, name=model_type, default_hp_metric=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        limit_train_batches=limit_train_batches,
        logger=logger,
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    fit_time = time.perf_counter() - start
    train_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    test = trainer.test(model, data, verbose=False)[0]
    return {
        "model": {"skip": "Skip DEQ", "vanilla": "DEQ", "skip_reg": "Skip Reg. DEQ"}.get(model_type, model_type),
        "test_accuracy": test.get("test/accuracy"),
        "explicit_accuracy": test.get("test/explicit_accuracy"),
        "test_nfe": test.get("solver/test_nfe"),
        "train_nfe": train_metrics.get("solver/train_nfe_epoch"),
        "backward_nfe": train_metrics.get("solver/train_backward_nfe_epoch"),
        "epoch_time_s": fit_time / max(1, trainer.current_epoch),
        "log_dir": logger.log_dir,
    }


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """A plain-text table of ``rows`` (as returned by `main`)."""
    header = ("model", "test acc", "explicit acc", "fwd NFE (test)", "fwd NFE (train)", "bwd NFE (train)", "s/epoch")
    lines = [header]
    for r in rows:
        lines.append(
            (
                r["model"],
                _fmt(r["test_accuracy"] and 100 * r["test_accuracy"], ".1f")
                + ("%" if r["test_accuracy"] is not None else ""),
                _fmt(r["explicit_accuracy"] and 100 * r["explicit_accuracy"], ".1f")
                + ("%" if r["explicit_accuracy"] is not None else ""),
                _fmt(r["test_nfe"], ".1f"),
                _fmt(r["train_nfe"], ".1f"),
                _fmt(r["backward_nfe"], ".1f"),
                _fmt(r["epoch_time_s"], ".2f"),
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = []
    for j, line in enumerate(lines):
        out.append(
            "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
        )
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(
    epochs: int = 12,
    *,
    log_dir: str = DEFAULT_LOG_DIR,
    model_types: Sequence[str] = MODEL_TYPES,
    seed: int = 0,
    limit_train_batches: Optional[int] = None,
    threads: int = 1,
    verbose: bool = True,
) -> List[Dict[str, Any]]:
    """Train each of ``model_types`` and return the table rows; print the table when ``verbose``.

    ``threads=1`` because the model is tiny: a second intra-op thread costs more in hand-offs than it
    saves, and on a busy machine it can make every step many times slower.
    """
    import pytorch_lightning  # noqa: F401  (sets its loggers to INFO on import; quieten them after)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    quiet = ["pytorch_lightning", "lightning_fabric", "lightning.pytorch"]
    levels = {n: logging.getLogger(n).level for n in quiet}
    for n in quiet:
        logging.getLogger(n).setLevel(logging.ERROR)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r".*(num_workers|does not have many workers|LitLogger|treespec).*"
            )
            rows = [
                run_one(mt, epochs=epochs, log_dir=log_dir, seed=seed, limit_train_batches=limit_train_batches)
                for mt in model_types
            ]
    finally:
        torch.set_num_threads(previous_threads)
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
    if verbose:
        print(
            f"\ndeqlab demo: DEQ vs Skip DEQ on 8x8 digits ({epochs} epochs each, "
            f"{time.perf_counter() - start:.0f} s in total)\n"
        )
        print(format_table(rows))
        print(f"\nTensorBoard logs: {tensorboard_command(log_dir)}")
    return rows


def tensorboard_command(log_dir: str) -> str:
    """The command that opens ``log_dir`` in TensorBoard, runnable as printed: the ``tensorboard`` script of
    the Python running this (``.venv/bin/tensorboard`` after ``make demo``), which need not be on ``PATH``.

    Args:
        log_dir: the TensorBoard log directory.

    Returns:
        ``"<bin>/tensorboard --logdir <log_dir>"``, relative to the working directory when it lies below it.

    Examples:
        >>> from deqlab.demo import tensorboard_command
        >>> tensorboard_command("runs/demo").endswith("tensorboard --logdir runs/demo")
        True
    """
    import os
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "tensorboard"
    shown = str(script)
    try:
        shown = os.path.relpath(script) if not os.path.relpath(script).startswith("..") else shown
    except ValueError:  # another drive (Windows)
        pass
    return f"{shown if script.exists() else 'tensorboard'} --logdir {log_dir}"


def _parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deqlab.demo", description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=12, help="training epochs per model (default: 12)")
    p.add_argument("--log-dir", default=DEFAULT_LOG_DIR, help=f"TensorBoard log directory (default: {DEFAULT_LOG_DIR})")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, split and shuffling (default: 0)")
    p.add_argument(
        "--models",
        nargs="+",
        default=list(MODEL_TYPES),
        choices=["vanilla", "skip", "skip_reg"],
        help="model types to train (default: skip vanilla)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1; the model is tiny)")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = _parse()
    main(args.epochs, log_dir=args.log_dir, model_types=args.models, seed=args.seed, threads=args.threads)
