"""Accuracy of a DEQ trained in low precision versus float32, on a real model and real data.

Trains a DEQ classifier with Lightning's ``precision="32-true"`` and ``"bf16-mixed"`` (CPU autocast; add
``"16-mixed"`` on a CUDA machine) from the same seed, and reports test accuracy, explicit accuracy, test
NFE, backward NFE and the fraction of converged samples, so a user knows what low precision costs before
using it on a large model. Two models:

* ``--data digits`` (default): ``deqlab.zoo.DigitsDEQ`` (vanilla and Skip, L-Broyden forward, GMRES implicit
  backward) on the embedded 8x8 digits; ``python benchmarks/precision.py --epochs 8`` (about a minute per
  run on a CPU);
* ``--data mnist``: the paper's MNIST dense model (``deqlab.zoo.MNISTDenseDEQ``, batch 32) on real MNIST
  from ``--data-dir`` (torchvision's raw layout), ``--limit-train-batches`` steps per epoch, tested on the
  full 10k test set.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Union

import torch


def build(data: str, model_type: str, seed: int, data_dir: Path):
    """The (model, data module) pair of one benchmark dataset."""
    if data == "digits":
        from deqlab.data import DigitsDataModule
        from deqlab.zoo import DigitsDEQ

        return (
            DigitsDEQ(model_type=model_type, log_figures=False),
            DigitsDataModule(batch_size=64, seed=seed, flatten=True),
        )
    if data == "mnist":
        from deqlab.data import MNISTDataModule
        from deqlab.zoo import MNISTDenseDEQ

        return (
            MNISTDenseDEQ(model_type=model_type, log_figures=False),
            MNISTDataModule(data_dir, flatten=True, batch_size=32, seed=seed),
        )
    raise SystemExit(f"unknown --data {data!r}; valid: digits, mnist")


def run(
    model_type: str,
    precision: str,
    epochs: int,
    seed: int,
    data: str = "digits",
    data_dir: Path = Path("data"),
    limit_train_batches: Union[int, float] = 1.0,
) -> Dict[str, Any]:
    import pytorch_lightning as pl

    pl.seed_everything(seed, verbose=False)
    model, datamodule = build(data, model_type, seed, data_dir)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=limit_train_batches,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    fit_s = time.perf_counter() - start
    train = {k: float(v) for k, v in trainer.callback_metrics.items()}
    test = trainer.test(model, datamodule, verbose=False)[0]
    return {
        "model": model_type,
        "precision": precision,
        "test_accuracy": test.get("test/accuracy"),
        "explicit_accuracy": test.get("test/explicit_accuracy"),
        "test_nfe": test.get("solver/test_nfe"),
        "test_converged": test.get("solver/test_samples_converged"),
        "backward_nfe": train.get("solver/train_backward_nfe_epoch"),
        "fit_s": fit_s,
    }


def table(rows: List[Dict[str, Any]]) -> str:
    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.1f} %"

    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = [
        "| model | precision | test accuracy | explicit accuracy | test NFE | converged | backward NFE | fit s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['precision']} | {pct(r['test_accuracy'])} | {pct(r['explicit_accuracy'])} | "
            f"{num(r['test_nfe'])} | {pct(r['test_converged'])} | {num(r['backward_nfe'])} | {r['fit_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precisions", default="32-true,bf16-mixed" + (",16-mixed" if torch.cuda.is_available() else ""))
    p.add_argument("--models", default="vanilla,skip")
    p.add_argument("--data", choices=("digits", "mnist"), default="digits")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared" / "data",
        help="root holding MNIST/raw (for --data mnist)",
    )
    p.add_argument(
        "--limit-train-batches",
        type=float,
        default=1.0,
        help="training batches per epoch: a fraction, or a count when > 1",
    )
    args = p.parse_args()
    limit = int(args.limit_train_batches) if args.limit_train_batches > 1 else args.limit_train_batches
    torch.set_num_threads(1)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mt in args.models.split(","):
            for prec in args.precisions.split(","):
                rows.append(run(mt, prec, args.epochs, args.seed, args.data, args.data_dir, limit))
    print(table(rows))


if __name__ == "__main__":
    main()
