"""A short ``paper_repro/cifar10.py`` run on generated CIFAR-10 pickles: throughput (images/s) and NFE.

Why: CIFAR-10 cannot be downloaded on the development machines, yet the paper's CIFAR-10 script and its
device path (``--gpus 1``) must be exercised and their speed recorded. This writes random images in the
real ``cifar-10-batches-py`` pickle layout, skips torchvision's md5 check for them (the only thing faked:
no random file can match the official checksums), and runs the real script in-process with the given
options. The accuracy is meaningless (random labels); steps, time per step, images/s and NFE are not.

Usage::

    python benchmarks/cifar10_generated.py --gpus 1 --arch small --max-steps 60        # on a GPU
    python benchmarks/cifar10_generated.py --gpus 0 --arch small --max-steps 2 --batch-size 8  # CPU smoke
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_cifar10(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Random uint8 images and labels in the official pickle layout under ``root/cifar-10-batches-py``,
    written by the data tests' own writer (``tests/data/conftest.py``, loaded by path), so the benchmark and
    the tests exercise torchvision's reader on the same format."""
    spec = importlib.util.spec_from_file_location("_data_writers", ROOT / "tests" / "data" / "conftest.py")
    writers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(writers)  # type: ignore[union-attr]
    labels = np.random.default_rng(seed).integers(0, 10, n_train + n_test).tolist()
    writers.write_cifar10(
        root,
        writers.random_images(n_train, (32, 32, 3), seed),
        labels[:n_train],
        writers.random_images(n_test, (32, 32, 3), seed + 1),
        labels[n_train:],
    )
    return root


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=int, default=2560)
    p.add_argument("--n-test", type=int, default=512)
    p.add_argument("--out", type=Path, default=None, help="results folder (default: a temporary one)")
    args, script_args = p.parse_known_args(argv)
    import torchvision.datasets.cifar as tv_cifar

    tv_cifar.check_integrity = lambda fpath, md5=None: Path(fpath).exists()  # generated files: no md5 can match
    from paper_repro import cifar10
    from paper_repro.run import main as run_script

    with tempfile.TemporaryDirectory() as tmp:
        data = write_cifar10(Path(tmp) / "data", args.n_train, args.n_test)
        out = args.out or Path(tmp) / "results"
        run_script(
            cifar10.SPEC,
            [
                *script_args,
                "--data-dir",
                str(data),
                "--results-dir",
                str(out),
                "--log-dir",
                str(Path(tmp) / "tb"),
                "--progress",
                "lines",
            ],
        )
        with open(out / "cifar10.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
    for row in rows:
        per_step = float(row["train_time_per_step_s"])
        batch = int(row["effective_batch_size"])
        print(
            f"cifar10/{row['arch']} {row['model_type']} {row['solver']} on {row['device']} "
            f"(x{row['num_processes']}): {row['steps']} steps, {per_step:.3f} s/step, "
            f"{batch / per_step:.0f} images/s (batch {batch}), train NFE {float(row['train_nfe']):.1f}, "
            f"test NFE {float(row['test_nfe']):.1f}, backward NFE {float(row['backward_nfe']):.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
