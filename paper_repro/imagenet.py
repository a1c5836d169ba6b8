"""Reproduce the paper's ImageNet experiment (Pal, Edelman, Rackauckas, arXiv 2201.12240, v2+ configs).

``--arch small`` (≈17.9M parameters): 4-scale MDEQ, the stem downsamples 2×, 224² inputs; SGD Nesterov 0.9,
lr 0.05, weight decay 1e-6, ×0.1 at 100k/150k/250k steps, 500000 steps, batch 64 per process, standard
augmentation (random resized crop + flip). Paper: ≈81.3-81.8 % top-5.

Examples (the data folder holds train/<class>/*.JPEG and val/<class>/*.JPEG):

    python paper_repro/imagenet.py --gpus 8 --data-dir /data/imagenet
    python paper_repro/imagenet.py --gpus 8 --dry-run
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from paper_repro.cli import ExperimentSpec
from paper_repro.run import main


def make_data(args, arch: str, batch_size: int, seed: int, augment: bool, num_workers: int):
    from deqlab.data import ImageNetDataModule

    return ImageNetDataModule(
        data_dir=args.data_dir,
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        val_fraction=0.0,
        augment=augment,
        image_size=args.image_size,
    )


def extra_arguments(parser) -> None:
    parser.add_argument("--image-size", type=int, default=224, help="side of the square network input")


def model_options(args) -> dict:
    # the model's zero initial guess and head are sized for the input, so it follows --image-size
    return {} if args.image_size == 224 else {"image_size": args.image_size}


SPEC = ExperimentSpec(
    name="imagenet",
    archs=("small",),
    make_data=make_data,
    train_size=1_281_167,
    test_size=50_000,
    num_classes=1000,
    description=__doc__.split("\n\n")[0],
    extra_arguments=extra_arguments,
    default_workers=8,
    model_options=model_options,
)  # JPEG decoding

if __name__ == "__main__":
    main(SPEC)
