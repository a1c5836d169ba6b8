"""Reproduce the paper's MNIST experiments (Pal, Edelman, Rackauckas, arXiv 2201.12240).

``--arch dense``: Dense(784→128, relu) → DEQ with f(z, x) = relu(W1 z) + relu(W2 x) → Dense(128→10);
abstol = reltol = 5e-3, 50 solver steps; 25 epochs, batch 32 per process; λ_jac = 1.0 with --jac-reg.
``--protocol paper`` (default, the paper's text): continuous solver Tsit5, λ_skip = 0.01, Adam at a
constant 1e-3. ``--protocol v1`` (the January-2022 code): λ_skip = 5.0, AdamW 1e-3, weight decay 2.5e-6,
cosine to 1e-6, batch-wide termination, z* = f(u_T, x), the skip penalty on vanilla, raw pixels.
``--arch conv``: the 2-scale MDEQ (28×28×8 and 14×14×16), tolerances 1e-2, λ_skip = 1.0, batch 64, 25 epochs.

Examples (the data folder holds MNIST/raw):

    python paper_repro/mnist.py --arch dense --model-type skip --solver continuous --data-dir data
    python paper_repro/mnist.py --arch dense --grid --seeds 6171,3859 --data-dir data --results-dir runs/mnist
    python paper_repro/mnist.py --arch dense --max-steps 20 --train-subset 2000 --test-subset 500 --data-dir data
    python paper_repro/mnist.py --arch conv --gpus 4 --dry-run
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from paper_repro.cli import ExperimentSpec
from paper_repro.run import main


def make_data(args, arch: str, batch_size: int, seed: int, augment: bool, num_workers: int, normalize: bool = True):
    from deqlab.data import MNISTDataModule

    return MNISTDataModule(
        data_dir=args.data_dir,
        download=getattr(args, "download", False),
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        val_fraction=0.0,
        augment=augment,
        flatten=arch == "dense",
        normalize=normalize,
    )


SPEC = ExperimentSpec(
    name="mnist",
    archs=("dense", "conv"),
    make_data=make_data,
    train_size=60_000,
    test_size=10_000,
    num_classes=10,
    description=__doc__.split("\n\n")[0],
    default_workers=0,
)  # in memory, cheap transforms: workers would only compete for the cores

if __name__ == "__main__":
    main(SPEC)
