"""Reproduce the paper's MNIST dense experiment (Pal, Edelman, Rackauckas, v1).

Dense(784→128, relu) → DEQ with f(z, x) = relu(W1 z) + relu(W2 x) → Dense(128→10); limited-memory Broyden
(abstol = reltol = 5e-3, 50 steps); λ_skip = 5.0; λ_jac = 1.0 with --jac-reg; AdamW 1e-3, weight decay
2.5e-6, cosine to 1e-6; 25 epochs, batch 32 per process. Examples:

    python paper_repro/mnist.py --model-type skip --gpus 1 --epochs 25 --data-dir /data --seed 6171 --results
    python paper_repro/mnist.py --model-type vanilla --data-dir /data --max-steps 20     # a quick CPU check

The 2-scale conv model (--arch conv) is not built yet.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from paper_repro.common import base_parser, run, write_results  # noqa: E402

EXPERIMENT = "mnist_dense"


def parse_args(argv=None):
    p = base_parser(__doc__.split("\n\n")[0], default_epochs=25, default_batch_size=32)
    p.add_argument("--arch", choices=["dense"], default="dense", help="architecture (the conv MDEQ comes later)")
    p.add_argument("--solver", choices=["lbroyden", "broyden", "anderson", "fixed_point", "tsit5"], default="lbroyden",
                   help="forward solver (tsit5: continuous DEQ)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from deqlab.data import MNISTDataModule
    from deqlab.zoo import MNISTDenseDEQ

    data = MNISTDataModule(data_dir=args.data_dir, download=args.download, batch_size=args.batch_size,
                           num_workers=args.num_workers, seed=args.seed, flatten=True)
    missing = [] if args.download else data.missing_paths()
    if missing:
        raise SystemExit(
            f"error: MNIST not found under {args.data_dir}: missing {', '.join(str(m) for m in missing)}. "
            f"{data.layout_hint()} Pass --data-dir to the folder that contains MNIST/raw, or --download."
        )
    model = MNISTDenseDEQ(
        model_type=args.model_type,
        solver=args.solver,
        jacobian_regularization=args.jac_reg,
        scheduler_steps=args.max_steps if args.max_steps > 0 else None,
    )
    row = run(model, data, args, EXPERIMENT)
    if args.results:
        paths = write_results(row, Path(args.results), EXPERIMENT)
        print(f"results appended to {', '.join(str(p) for p in paths)}")
    print(
        f"{EXPERIMENT} {args.model_type}{' +jac' if args.jac_reg else ''} seed {args.seed}: "
        f"test accuracy {row['test_accuracy']:.4f}, explicit accuracy "
        f"{'-' if row['explicit_accuracy'] is None else format(row['explicit_accuracy'], '.4f')}, "
        f"test NFE {row['test_nfe']:.1f}, steps {row['steps']}, fit {row['fit_time_s']:.0f} s"
    )
    return row


if __name__ == "__main__":
    main()
