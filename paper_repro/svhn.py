"""Reproduce the paper's SVHN experiment (Pal, Edelman, Rackauckas, arXiv 2201.12240, v1).

``--arch v1``: the same 2-scale MDEQ as CIFAR-10 v1 (32×32×24, 16×16×24), tolerances 5e-2, 20 solver steps,
λ_skip = 1e-2, AdamW 1e-3, weight decay 2.5e-6, cosine to 1e-6, 50 epochs, batch 64 per process; trained on
the official ``train`` split (not ``extra``).

Examples (the data folder holds SVHN/train_32x32.mat and SVHN/test_32x32.mat):

    python paper_repro/svhn.py --gpus 2 --data-dir data
    python paper_repro/svhn.py --grid --gpus 2 --data-dir data
    python paper_repro/svhn.py --dry-run
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from paper_repro.cli import ExperimentSpec
from paper_repro.run import main


def make_data(args, arch: str, batch_size: int, seed: int, augment: bool, num_workers: int):
    from deqlab.data import SVHNDataModule

    return SVHNDataModule(
        data_dir=args.data_dir,
        download=getattr(args, "download", False),
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        val_fraction=0.0,
        augment=augment,
    )


SPEC = ExperimentSpec(
    name="svhn",
    archs=("v1",),
    make_data=make_data,
    train_size=73_257,
    test_size=26_032,
    num_classes=10,
    description=__doc__.split("\n\n")[0],
)

if __name__ == "__main__":
    main(SPEC)
