"""Accuracy of a DEQ trained in low precision versus float32, on a real model and real data.

Trains the embedded-digits models (``deqlab.zoo.DigitsDEQ``: vanilla and Skip, L-Broyden forward, GMRES
implicit backward) with Lightning's ``precision="32-true"`` and ``"bf16-mixed"`` (CPU autocast; add
``"16-mixed"`` on a CUDA machine) from the same seed, and reports test accuracy, explicit accuracy, test
NFE, backward NFE and the fraction of converged samples, so a user knows what low precision costs before
using it on a large model. ``python benchmarks/precision.py --epochs 8`` (about a minute per run on a CPU).
"""
from __future__ import annotations

import argparse
import time
import warnings
from typing import Any, Dict, List

import torch


def run(model_type: str, precision: str, epochs: int, seed: int) -> Dict[str, Any]:
    import pytorch_lightning as pl

    from deqlab.data import DigitsDataModule
    from deqlab.zoo import DigitsDEQ

    pl.seed_everything(seed, verbose=False)
    model = DigitsDEQ(model_type=model_type, log_figures=False)
    data = DigitsDataModule(batch_size=64, seed=seed, flatten=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, precision=precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(model, data)
    fit_s = time.perf_counter() - start
    train = {k: float(v) for k, v in trainer.callback_metrics.items()}
    test = trainer.test(model, data, verbose=False)[0]
    return {"model": model_type, "precision": precision, "test_accuracy": test.get("test/accuracy"),
            "explicit_accuracy": test.get("test/explicit_accuracy"), "test_nfe": test.get("solver/test_nfe"),
            "test_converged": test.get("solver/test_converged"),
            "backward_nfe": train.get("solver/train_backward_nfe_epoch"), "fit_s": fit_s}


def table(rows: List[Dict[str, Any]]) -> str:
    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.1f} %"

    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = ["| model | precision | test accuracy | explicit accuracy | test NFE | converged | backward NFE | fit s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['precision']} | {pct(r['test_accuracy'])} | {pct(r['explicit_accuracy'])} | "
                     f"{num(r['test_nfe'])} | {pct(r['test_converged'])} | {num(r['backward_nfe'])} | {r['fit_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precisions", default="32-true,bf16-mixed" + (",16-mixed" if torch.cuda.is_available() else ""))
    p.add_argument("--models", default="vanilla,skip")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mt in args.models.split(","):
            for prec in args.precisions.split(","):
                rows.append(run(mt, prec, args.epochs, args.seed))
    print(table(rows))


if __name__ == "__main__":
    main()
