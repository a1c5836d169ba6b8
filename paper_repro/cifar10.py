"""Reproduce the paper's CIFAR-10 experiments (Pal, Edelman, Rackauckas, arXiv 2201.12240).

``--arch v1``: the v1 2-scale MDEQ (32×32×24, 16×16×24), tolerances 5e-2, 20 solver steps, λ_skip = 1e-2,
AdamW 1e-3, 50 epochs, batch 32 (discrete) / 64 (continuous) per process.
``--arch small`` (alias ``tiny``, ≈164K parameters): Adam 1e-3, weight decay 2.5e-5, cosine over 20000 steps,
batch 128, 3000 pretraining steps at depth 5, no augmentation; paper: ≈81 % test accuracy.
``--arch large`` (≈10.6M parameters): 4 scales, Adam 1e-3, cosine over 90000 steps, batch 128, flip + crop;
paper: ≈89-90 %.

Examples (the data folder holds cifar-10-batches-py/):

    python paper_repro/cifar10.py --arch small --gpus 4 --data-dir data          # DDP, batch 128 per GPU
    python paper_repro/cifar10.py --arch small --gpus 4 --grid --data-dir data   # the paper's grid
    python paper_repro/cifar10.py --arch large --gpus 4 --dry-run                # the plan, no data needed
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from paper_repro.cli import ExperimentSpec
from paper_repro.run import main


def make_data(args, arch: str, batch_size: int, seed: int, augment: bool, num_workers: int):
    from deqlab.data import CIFAR10DataModule

    return CIFAR10DataModule(
        data_dir=args.data_dir,
        download=getattr(args, "download", False),
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        val_fraction=0.0,
        augment=augment,
    )


SPEC = ExperimentSpec(
    name="cifar10",
    archs=("small", "large", "v1", "tiny"),
    make_data=make_data,
    train_size=50_000,
    test_size=10_000,
    num_classes=10,
    description=__doc__.split("\n\n")[0],
    aliases={"tiny": "small"},
)

if __name__ == "__main__":
    main(SPEC)
