"""Relative training / backward / prediction time of the paper's model types, measured round-robin.

Why a separate script: the grid (``mnist.py --grid``) trains one configuration after another, so on a
shared machine each run meets a different load and the per-run times in ``mnist.csv`` cannot be compared
across model types (on the 2-core machine of ``results/README.md`` the load changed several-fold between
runs). Here every configuration is first trained briefly on real MNIST (so its NFE are those of a model that
has learned something, not of random weights), then the configurations take turns, step by step, on the
*same* batches: whatever the machine is doing hits all of them alike, and the ratios are fair.

    python paper_repro/timing.py --data-dir /path/with/MNIST/raw --warm-steps 1000 --rounds 60

Prints a markdown table (median seconds per training step, forward, backward, prediction batch, NFE, test
accuracy on ``--test-subset`` images) and the ratios the paper claims; ``--output`` writes it to a file.
The MNIST dense model and its paper settings come from :mod:`deqlab.models` (the grid's own).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CONFIGS: Tuple[Tuple[str, str], ...] = (
    ("vanilla", "continuous"), ("skip", "continuous"), ("skip_reg", "continuous"),
    ("vanilla", "discrete"), ("skip", "discrete"), ("skip_reg", "discrete"), ("neural_ode", "continuous"),
)


def load_mnist(data_dir: Path) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Real MNIST as normalized flat float tensors (the data module's normalization)."""
    from torchvision.datasets import MNIST

    from deqlab.data import MNIST_MEAN, MNIST_STD

    out = []
    for train in (True, False):
        ds = MNIST(str(data_dir), train=train, download=False)
        x = (ds.data.float() / 255.0 - MNIST_MEAN[0]) / MNIST_STD[0]
        out += [x.reshape(len(ds), -1), ds.targets.clone()]
    return out[0], out[1], out[2], out[3]


class Config:
    """One model type × solver kind: its network, optimizer and loss weights."""

    def __init__(self, model_type: str, solver: str, seed: int):
        from deqlab.models import build_model, paper_settings

        torch.manual_seed(seed)
        self.name = f"{model_type} {solver}"
        self.model_type, self.solver = model_type, solver
        self.net = build_model("mnist", "dense", model_type=model_type, solver=solver)
        s = paper_settings("mnist", "dense", model_type, solver)
        self.skip_weight = float(s["skip_loss_weight"])
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=s["lr"], betas=tuple(s["betas"]),
                                     weight_decay=s["weight_decay"])
        self.times: Dict[str, List[float]] = {k: [] for k in ("step", "forward", "backward", "predict")}
        self.nfe: Dict[str, List[float]] = {"train": [], "test": [], "backward": []}

    def train_step(self, x: torch.Tensor, y: torch.Tensor, record: bool) -> None:
        self.net.train()
        t0 = time.perf_counter()
        logits, sol = self.net(x)
        loss = F.cross_entropy(logits, y) + self.skip_weight * sol.skip_loss
        t1 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        self.opt.step()
        t3 = time.perf_counter()
        if record:
            self.times["forward"].append(t1 - t0)
            self.times["backward"].append(t2 - t1)
            self.times["step"].append(t3 - t0)
            self.nfe["train"].append(float(sol.nfe))
            self.nfe["backward"].append(float(sol.backward_nfe))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, record: bool = True) -> torch.Tensor:
        self.net.eval()
        t0 = time.perf_counter()
        logits, sol = self.net(x)
        if record:
            self.times["predict"].append(time.perf_counter() - t0)
            self.nfe["test"].append(float(sol.nfe))
        return logits


def median(v: List[float]) -> float:
    return statistics.median(v) if v else float("nan")


def main(argv: Any = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, required=True, help="folder containing MNIST/raw")
    p.add_argument("--warm-steps", type=int, default=1000, help="training steps per config before timing")
    p.add_argument("--rounds", type=int, default=60, help="timed training steps and test batches per config")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--test-subset", type=int, default=2000, help="test images for the accuracy column")
    p.add_argument("--seed", type=int, default=6171)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--configs", default=",".join(f"{m}:{s}" for m, s in CONFIGS),
                   help="model_type:solver pairs, comma separated")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    xtr, ytr, xte, yte = load_mnist(args.data_dir)
    g = torch.Generator().manual_seed(args.seed)
    configs = [Config(*c.split(":"), seed=args.seed) for c in args.configs.split(",")]
    B = args.batch_size
    for cfg in configs:  # warm-up training, each on the same batch sequence
        order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(args.seed))
        for i in range(args.warm_steps):
            idx = order[(i * B) % len(xtr):(i * B) % len(xtr) + B]
            cfg.train_step(xtr[idx], ytr[idx], record=False)
        print(f"warmed {cfg.name}", flush=True)
    for r in range(args.rounds):  # round-robin: every config sees the same batch, one after another
        idx = torch.randint(0, len(xtr), (B,), generator=g)
        tidx = torch.randint(0, len(xte), (B,), generator=g)
        for cfg in (configs if r % 2 == 0 else configs[::-1]):
            cfg.train_step(xtr[idx], ytr[idx], record=True)
            cfg.predict(xte[tidx])
    acc = {}
    for cfg in configs:
        correct = 0
        for s in range(0, args.test_subset, 250):
            logits = cfg.predict(xte[s:s + 250], record=False)
            correct += int((logits.argmax(1) == yte[s:s + 250]).sum())
        acc[cfg.name] = correct / args.test_subset
    lines = [f"Round-robin timing on real MNIST: {args.warm_steps} warm-up steps per config (batch {B}), then "
             f"{args.rounds} rounds; medians, seconds; torch {torch.__version__}, {args.threads} thread(s).", "",
             "| model | solver | train step | forward | backward | prediction batch | train NFE | test NFE | "
             "backward NFE | test acc (subset) |", "|---|---|---|---|---|---|---|---|---|---|"]
    row = {}
    for cfg in configs:
        m = {k: median(v) for k, v in cfg.times.items()}
        n = {k: median(v) for k, v in cfg.nfe.items()}
        row[cfg.name] = (m, n)
        lines.append(f"| {cfg.model_type} | {cfg.solver} | {m['step']:.4f} | {m['forward']:.4f} | {m['backward']:.4f} | "
                     f"{m['predict']:.4f} | {n['train']:.1f} | {n['test']:.1f} | {n['backward']:.1f} | "
                     f"{100 * acc[cfg.name]:.2f} % |")
    lines += ["", "| ratio | train step | backward | prediction | test NFE |", "|---|---|---|---|---|"]

    def ratio(a: str, b: str) -> None:
        if a in row and b in row:
            (ma, na), (mb, nb) = row[a], row[b]
            lines.append(f"| {a} / {b} | {ma['step'] / mb['step']:.2f} | {ma['backward'] / mb['backward']:.2f} | "
                         f"{ma['predict'] / mb['predict']:.2f} | {na['test'] / max(nb['test'], 1e-9):.2f} |")

    for solver in ("continuous", "discrete"):
        ratio(f"vanilla {solver}", f"skip {solver}")
        ratio(f"vanilla {solver}", f"skip_reg {solver}")
    ratio("neural_ode continuous", "vanilla continuous")
    ratio("vanilla continuous", "vanilla discrete")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)
    return text


if __name__ == "__main__":
    main()
