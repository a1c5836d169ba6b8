"""Render the TensorBoard scalars of a real demo run into ``docs/img/tensorboard_scalars.png``.

Reads the event files with TensorBoard's own ``EventAccumulator`` (the data TensorBoard's Scalars tab shows)
and draws them the way the dashboard does: one panel per tag, one colour per run, the raw curve faint and
an exponential-moving-average (smoothing 0.6, TensorBoard's default) on top.

    python -m deqlab.demo --epochs 8 --log-dir runs/docs_demo
    python docs/img/make_tensorboard_figure.py runs/docs_demo docs/img/tensorboard_scalars.png
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TAGS = [
    "train/loss",
    "val/accuracy",
    "solver/train_nfe",
    "solver/train_backward_nfe",
    "solver/train_abs_residual_max",
    "val/explicit_accuracy",
    "time/forward",
    "time/backward",
]
COLORS = {"skip": "#ff7043", "vanilla": "#0077bb", "skip_reg": "#009988"}


def smooth(values, weight=0.6):
    out, last = [], values[0] if values else 0.0
    for v in values:
        last = last * weight + (1 - weight) * v
        out.append(last)
    return out


def main(log_dir: str, out: str) -> None:
    runs = {}
    for version in sorted(Path(log_dir).glob("*/version_*")):
        acc = EventAccumulator(str(version))
        acc.Reload()
        runs[version.parent.name] = acc
    fig, axes = plt.subplots(2, 4, figsize=(14, 5.6))
    for ax, tag in zip(axes.flat, TAGS):
        for name, acc in runs.items():
            if tag not in acc.Tags()["scalars"]:
                continue
            events = acc.Scalars(tag)
            steps = [e.step for e in events]
            values = [e.value for e in events]
            color = COLORS.get(name, None)
            ax.plot(steps, values, color=color, alpha=0.25, lw=1)
            ax.plot(
                steps, smooth(values), color=color, lw=1.8, label=name, marker="o" if len(steps) < 12 else None, ms=3
            )
        ax.set_title(tag, fontsize=10, loc="left")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("step", fontsize=8)
    axes.flat[0].legend(fontsize=8, frameon=False)
    fig.suptitle(
        f"TensorBoard scalars of `python -m deqlab.demo` ({log_dir}): Skip DEQ vs DEQ on 8x8 digits", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(out, dpi=80)


if __name__ == "__main__":
    main(*(sys.argv[1:] or ["runs/docs_demo", "docs/img/tensorboard_scalars.png"]))
