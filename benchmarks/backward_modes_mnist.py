#!/usr/bin/env python
"""Backward modes on real MNIST: implicit vs phantom vs Neumann phantom vs reversible, trained side by side.

The paper's MNIST models (``deqlab.models.build_model("mnist", "dense" | "conv", model_type="vanilla",
solver="discrete")``: the dense DEQ and the 2-scale conv MDEQ, their own L-Broyden forward solve) are
trained from the same seed on the same batch sequence, once per backward mode:

* **implicit**: the models' own ``ImplicitBackward()`` (GMRES at the forward tolerance, at most 15 VJPs);
* **phantom**: ``PhantomGradient(steps=5, damping=0.5)`` (backprop through 5 damped applications at z*);
* **neumann**: ``NeumannPhantomGradient(steps=5)`` (the truncated Neumann series of the adjoint);
* **reversible**: the layer's solver swapped for ``ReversibleSolver(beta=0.8, max_steps=6)`` with the
  model's termination mode and tolerances (a ``*_best`` mode becomes ``*_default``: the reversible backward
  inverts the last iterate), and ``ReversibleBackward()`` (the exact gradient of the finite iteration).

Every mode's network is built with the same seed (identical initial weights) and trained with AdamW
(lr 1e-3, the v1 protocol's optimizer, constant rate) on cross-entropy, one step per mode per batch,
round-robin: batch ``i`` is taken by every mode in turn before batch ``i + 1``, so whatever load the machine
carries hits all modes alike. Reported per model and mode:

* test accuracy on the first ``--test-subset`` MNIST test images after training (and the test forward NFE);
* forward NFE and backward NFE per training step (``solution.nfe``, ``solution.backward_nfe``: VJPs for the
  implicit and Neumann modes, unrolled applications for phantom, ``2 N`` evaluations + VJPs for reversible),
  mean over the training steps, and the share of training forward solves that met the tolerance;
* median train-step time (forward + loss + backward + AdamW step) over the steps after ``--warmup``;
* memory of one training step at the trained weights (same batch for every mode), on CPU from the
  ``torch.profiler`` allocator trace (``_common.peak_bytes``: every allocation and free of torch's CPU
  allocator replayed in time order; the running maximum above what was allocated when the call began,
  parameters and the batch excluded, the gradients included): **fwd+bwd peak** (forward, loss and
  ``loss.backward()``) and **backward peak** (``loss.backward()`` alone, above the memory the forward left:
  the backward mode's own working memory plus the parameter gradients, which are the same for every mode);
  and **saved fwd→bwd**, the bytes of the distinct storages autograd saves during the forward (counted with
  ``torch.autograd.graph.saved_tensors_hooks``; what the graph holds until the backward);
* a short memory-against-steps table: the backward peak with phantom at 5 and 20 steps and reversible at
  ``max_steps`` and 4 × ``max_steps`` (tolerance 0, so every step runs) on the trained model, which shows
  phantom's memory growing with its steps and reversible's staying flat.

Usage::

    python benchmarks/backward_modes_mnist.py --data-dir /path/with/MNIST/raw           # writes RESULTS.md
    python benchmarks/backward_modes_mnist.py --quick --data-dir DIR                   # smoke test, no write

Without MNIST under ``--data-dir`` it runs on seeded noise and says so (accuracies are then meaningless).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:
    sys.path.insert(1, str(_HERE.parent))  # run from a checkout without `pip install -e .`

warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from _common import (  # noqa: E402
    Timing,
    fmt_time,
    machine_header,
    machine_info,
    markdown_table,
    peak_bytes,
    setup_threads,
    shown_argv,
    synchronize,
    update_results_section,
)
from _workloads import mnist_labelled  # noqa: E402

SECTION = "backward-modes-mnist"
MODES = ("implicit", "phantom", "neumann", "reversible")
ARCHS = ("dense", "conv")


# ------------------------------------------------------------------------------------------ the modes


def deq_layer(net: nn.Module) -> nn.Module:
    """The network's DEQ layer (``PaperNetwork.deq``), whose ``solver`` / ``backward`` a mode replaces."""
    from deqlab.nn import DeepEquilibriumNetwork

    layer = getattr(net, "deq", None)
    if not isinstance(layer, DeepEquilibriumNetwork):
        raise TypeError(f"expected a PaperNetwork with a DEQ layer, got {type(layer).__name__}")
    return layer


def reversible_solver(template, beta: float, max_steps: int, tol: Optional[float] = None):
    """``ReversibleSolver`` with the termination of the model's own solver (``template``): same mode
    (``*_best`` → ``*_default``) and tolerances, or tolerance ``tol`` when given (0: run every step)."""
    from deqlab.solvers import ReversibleSolver

    term = template.termination
    mode = term.mode[: -len("_best")] + "_default" if term.mode.endswith("_best") else term.mode
    abstol = term.abstol if tol is None else tol
    reltol = term.reltol if tol is None else tol
    return ReversibleSolver(
        beta=beta, mode=mode, abstol_termination=abstol, reltol_termination=reltol, max_steps=max_steps
    )


def set_mode(
    layer: nn.Module,
    mode: str,
    args,
    *,
    own_solver,
    phantom_steps: Optional[int] = None,
    rev_steps: Optional[int] = None,
    rev_tol: Optional[float] = None,
) -> str:
    """Give ``layer`` the solver and backward of ``mode``; returns a description of the pair."""
    from deqlab.nn import ImplicitBackward, NeumannPhantomGradient, PhantomGradient, ReversibleBackward

    if mode == "reversible":
        steps = args.rev_max_steps if rev_steps is None else rev_steps
        layer.solver = reversible_solver(own_solver, args.rev_beta, steps, rev_tol)
        layer.backward = ReversibleBackward()
        return f"`ReversibleSolver(beta={args.rev_beta:g}, max_steps={steps})` + `ReversibleBackward()`"
    layer.solver = own_solver
    if mode == "implicit":
        layer.backward = ImplicitBackward("gmres", max_steps=args.implicit_max_steps)
        return f'`ImplicitBackward("gmres", max_steps={args.implicit_max_steps})` (the models\' default)'
    if mode == "phantom":
        k = args.phantom_steps if phantom_steps is None else phantom_steps
        layer.backward = PhantomGradient(steps=k, damping=args.phantom_damping)
        return f"`PhantomGradient(steps={k}, damping={args.phantom_damping:g})`"
    if mode == "neumann":
        layer.backward = NeumannPhantomGradient(steps=args.neumann_steps)
        return f"`NeumannPhantomGradient(steps={args.neumann_steps})`"
    raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")


# ------------------------------------------------------------------------------------------ measuring


@dataclass
class Run:
    mode: str
    net: nn.Module
    opt: torch.optim.Optimizer
    desc: str = ""
    step: Timing = field(default_factory=Timing)
    fwd_nfe: List[float] = field(default_factory=list)
    bwd_nfe: List[float] = field(default_factory=list)
    converged: List[float] = field(default_factory=list)
    rev_residual: List[float] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)
    accuracy: float = float("nan")
    test_nfe: float = float("nan")
    peak: Optional[int] = None
    bwd_peak: Optional[int] = None
    saved: Optional[int] = None


def train_step(run: Run, x: Tensor, y: Tensor) -> Tuple[float, object]:
    run.opt.zero_grad(set_to_none=True)
    logits, sol = run.net(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    run.opt.step()
    return float(loss.detach()), sol


def record(run: Run, sol, loss: float) -> None:
    run.losses.append(loss)
    run.fwd_nfe.append(float(sol.nfe))
    run.bwd_nfe.append(float(sol.backward_nfe or 0))
    conv = getattr(sol, "converged", None)
    if isinstance(conv, Tensor):
        run.converged.append(float(conv.float().mean()))
    if run.mode == "reversible" and isinstance(sol.backward_residual, Tensor):
        run.rev_residual.append(float(sol.backward_residual.float().max()))


def recalibrate_batch_norm(net: nn.Module, batches: List[Tensor]) -> int:
    """Recompute the running statistics of ``net``'s BatchNorms as plain averages over ``batches``
    (``torch.optim.swa_utils.update_bn``, "precise BN"); returns how many BatchNorms it reset.

    Why: a short run leaves the running statistics dominated by their initial values. With momentum 0.1,
    after 30 steps the running variance still holds 0.9^30 = 4 % of its initial 1, while the conv head's
    batch variances are ~1e-3 this early, so ``eval()`` divided by a 5x too large deviation and scored
    chance (8 %) where the same weights in train mode scored 64 % (measured). Every mode is recalibrated
    on the same batches, so the comparison between backward modes is unchanged.
    """
    from torch.optim.swa_utils import update_bn

    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if bns:
        update_bn(batches, net)
    return len(bns)


@torch.no_grad()
def evaluate(net: nn.Module, x: Tensor, y: Tensor, batch: int) -> Tuple[float, float]:
    """(accuracy, mean forward NFE per batch) on ``x, y``."""
    net.eval()
    correct, nfes = 0, []
    for i in range(0, len(x), batch):
        logits, sol = net(x[i : i + batch])
        correct += int((logits.argmax(1) == y[i : i + batch]).sum())
        nfes.append(float(sol.nfe))
    net.train()
    return correct / len(x), statistics.fmean(nfes)


def saved_bytes(net: nn.Module, x: Tensor) -> int:
    """Bytes of the distinct storages autograd saves during one forward (what the graph holds until the
    backward), not counting storages that existed before (parameters, the batch)."""
    skip = {p.untyped_storage().data_ptr() for p in net.parameters()} | {x.untyped_storage().data_ptr()}
    seen: Dict[int, int] = {}

    def pack(t: Tensor):
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # pragma: no cover - exotic tensors
            return t
        ptr = st.data_ptr()
        if ptr and ptr not in skip:
            seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, _ = net(x)
    del logits
    return int(sum(seen.values()))


def step_memory(net: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> Tuple[int, int, int]:
    """(fwd+bwd peak, backward-only peak, saved fwd→bwd) bytes of one training step (no optimizer step)."""

    def fwd_bwd() -> None:
        logits, _ = net(x)
        F.cross_entropy(logits, y).backward()

    net.zero_grad(set_to_none=True)
    peak = peak_bytes(fwd_bwd, device)
    net.zero_grad(set_to_none=True)
    logits, _ = net(x)
    loss = F.cross_entropy(logits, y)
    bwd = peak_bytes(loss.backward, device)
    del logits, loss
    net.zero_grad(set_to_none=True)
    saved = saved_bytes(net, x)
    return peak, bwd, saved


def fmt_bytes(n: Optional[float]) -> str:
    if n is None or n != n:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if abs(n) < 10 * scale else f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


# ------------------------------------------------------------------------------------------ one model


def run_model(arch: str, args, device: torch.device, data) -> dict:
    from deqlab.models import build_model

    xtr, ytr, xte, yte = data
    steps, batch = (args.dense_steps, args.batch) if arch == "dense" else (args.conv_steps, args.batch)
    n_test = min(args.test_subset if arch == "dense" else args.conv_test_subset, len(xte))
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(xtr), generator=g)
    while len(order) < steps * batch:  # a small training set (quick runs): go round again
        order = torch.cat([order, torch.randperm(len(xtr), generator=g)])
    batches = [order[i * batch : (i + 1) * batch] for i in range(steps)]

    runs: List[Run] = []
    own_solver = None
    for mode in args.modes:
        torch.manual_seed(args.seed)  # the same initial weights for every mode
        net = build_model("mnist", arch, model_type="vanilla", solver="discrete").to(device)
        layer = deq_layer(net)
        own = layer.solver
        own_solver = own if own_solver is None else own_solver
        desc = set_mode(layer, mode, args, own_solver=own)
        opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=2.5e-6)
        runs.append(Run(mode, net, opt, desc))
    first = [p.detach().clone() for p in runs[0].net.parameters()]
    for r in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(first, r.net.parameters())), "different initial weights"

    t0 = time.perf_counter()
    for i, idx in enumerate(batches):
        x, y = xtr[idx].to(device), ytr[idx].to(device)
        for r in runs:  # round-robin: every mode takes batch i before any takes batch i + 1
            synchronize(device)
            t = time.perf_counter()
            loss, sol = train_step(r, x, y)
            synchronize(device)
            if i >= args.warmup:
                r.step.add(time.perf_counter() - t)
            record(r, sol, loss)
        if (i + 1) % max(1, steps // 5) == 0 or i + 1 == steps:
            print(
                f"  [{arch}] step {i + 1}/{steps} ({time.perf_counter() - t0:.0f} s): "
                + ", ".join(f"{r.mode} loss {statistics.fmean(r.losses[-10:]):.3f}" for r in runs),
                flush=True,
            )
    train_s = time.perf_counter() - t0

    xt, yt = xte[:n_test].to(device), yte[:n_test].to(device)
    calib = [xtr[idx].to(device) for idx in batches[: args.bn_batches]]
    for r in runs:
        recalibrate_batch_norm(r.net, calib)
        r.accuracy, r.test_nfe = evaluate(r.net, xt, yt, args.eval_batch)
    print(f"  [{arch}] test accuracy: " + ", ".join(f"{r.mode} {r.accuracy:.2%}" for r in runs), flush=True)

    mx, my = xtr[batches[0]].to(device), ytr[batches[0]].to(device)
    for r in runs:
        r.peak, r.bwd_peak, r.saved = step_memory(r.net, mx, my, device)

    scaling = []
    if args.scaling:
        base = next(r for r in runs if r.mode in ("implicit", "phantom", "neumann"))
        net = base.net
        layer = deq_layer(net)
        k0, n0 = args.phantom_steps, args.rev_max_steps
        for mode, kw, label in (
            ("phantom", dict(phantom_steps=k0), f"phantom, {k0} steps"),
            ("phantom", dict(phantom_steps=4 * k0), f"phantom, {4 * k0} steps"),
            ("reversible", dict(rev_steps=n0, rev_tol=0.0), f"reversible, {n0} steps"),
            ("reversible", dict(rev_steps=4 * n0, rev_tol=0.0), f"reversible, {4 * n0} steps"),
        ):
            set_mode(layer, mode, args, own_solver=own_solver, **kw)
            net.zero_grad(set_to_none=True)
            logits, sol = net(mx)
            loss = F.cross_entropy(logits, my)
            bwd = peak_bytes(loss.backward, device)
            scaling.append((label, int(sol.nfe), int(sol.backward_nfe or 0), bwd))
            del logits, loss, sol
        set_mode(layer, base.mode, args, own_solver=own_solver)
        net.zero_grad(set_to_none=True)
    return dict(arch=arch, runs=runs, steps=steps, batch=batch, n_test=n_test, train_s=train_s, scaling=scaling)


# ------------------------------------------------------------------------------------------ report


def mean(xs: List[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def model_table(res: dict) -> str:
    rows = []
    for r in res["runs"]:
        rows.append(
            [
                r.mode,
                f"{r.accuracy:.2%}",
                f"{mean(r.losses[-10:]):.3f}",
                f"{mean(r.fwd_nfe):.1f}",
                f"{mean(r.bwd_nfe):.1f}",
                f"{mean(r.converged):.0%}" if r.converged else "n/a",
                f"{r.test_nfe:.1f}",
                fmt_time(r.step.median),
                fmt_time(r.step.iqr),
                fmt_bytes(r.peak),
                fmt_bytes(r.bwd_peak),
                fmt_bytes(r.saved),
            ]
        )
    return markdown_table(
        [
            "mode",
            "test acc",
            "train loss",
            "fwd NFE",
            "bwd NFE",
            "fwd converged",
            "test fwd NFE",
            "step (median)",
            "step IQR",
            "fwd+bwd peak",
            "backward peak",
            "saved fwd→bwd",
        ],
        rows,
        "lrrrrrrrrrrr",
    )


def scaling_table(res: dict) -> str:
    rows = [[label, str(fn), str(bn), fmt_bytes(b)] for label, fn, bn, b in res["scaling"]]
    return markdown_table(["backward", "fwd NFE", "bwd NFE", "backward peak"], rows, "lrrr")


def build_report(results: List[dict], info: dict, args, source: str) -> str:
    cmd = "python benchmarks/backward_modes_mnist.py " + " ".join(shown_argv(args.argv))
    parts = [
        "## Backward modes on MNIST (`benchmarks/backward_modes_mnist.py`)",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        machine_header(info),
        "",
        f"Data: {source}. The paper's MNIST models, vanilla DEQ, their own L-Broyden forward "
        '(`build_model("mnist", arch, model_type="vanilla", solver="discrete")`), the same initial weights '
        f"(seed {args.seed}) and batch sequence for every mode, AdamW lr {args.lr:g}, cross-entropy; the modes "
        "take turns on each batch (round-robin). Modes:",
        "",
    ]
    descs = {}
    for res in results:
        for r in res["runs"]:
            descs.setdefault(r.mode, r.desc)
    parts += [f"- **{m}**: {d}" for m, d in descs.items()] + [""]
    parts += [
        "Columns: test accuracy on the first N MNIST test images after training (`net.eval()`; the BatchNorm "
        f"running statistics, in the conv model's stem and head, first recomputed as plain averages over the "
        f"first {args.bn_batches} training batches with `torch.optim.swa_utils.update_bn`, because a short run "
        "leaves them dominated by their initial values); the training cross-entropy, mean of the last "
        "10 steps; fwd / bwd NFE per training "
        "step (`solution.nfe`, `solution.backward_nfe`), mean over all steps; the share of training forward "
        "solves that met the tolerance; the test forward NFE per evaluation batch; the median train step "
        f"(forward + loss + backward + AdamW step) over the steps after the first {args.warmup}, and its IQR; "
        "memory of one training step at the trained weights on the first training batch: the peak bytes "
        "allocated during forward + loss + backward, and during `loss.backward()` alone above what the forward "
        "left (both from the `torch.profiler` allocator trace, parameters and batch excluded, gradients "
        "included), and the bytes autograd saves during the forward (`saved_tensors_hooks`, distinct storages).",
        "",
    ]
    for res in results:
        runs = res["runs"]
        parts += [
            f"### MNIST {res['arch']} ({res['steps']} steps × batch {res['batch']}, test on {res['n_test']} "
            f"images; training took {res['train_s']:.0f} s for all modes)",
            "",
            model_table(res),
            "",
        ]
        rev = next((r for r in runs if r.mode == "reversible"), None)
        if rev is not None and rev.rev_residual:
            parts += [
                f"Reversible reconstruction error (`solution.backward_residual`, max over the batch): "
                f"median {statistics.median(rev.rev_residual):.1e}, max {max(rev.rev_residual):.1e} over "
                "the training steps.",
                "",
            ]
        if res["scaling"]:
            parts += [
                "Backward peak against the backward's steps on the trained model (the "
                f"{runs[0].mode if runs[0].mode != 'reversible' else runs[1].mode} network; reversible at "
                "tolerance 0, so every step runs):",
                "",
                scaling_table(res),
                "",
            ]
    return "\n".join(parts).rstrip() + "\n"


# ------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data-dir",
        default=os.environ.get("DEQLAB_DATA", "data"),
        help="folder holding MNIST/raw (default $DEQLAB_DATA or ./data; seeded noise when absent)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; 0 = torch default)")
    p.add_argument(
        "--quick", action="store_true", help="smoke test: 3 steps of batch 8, 16 test images, no RESULTS.md update"
    )
    p.add_argument("--models", default="dense,conv", help="comma-separated subset of: " + ",".join(ARCHS))
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ",".join(MODES))
    p.add_argument("--dense-steps", type=int, default=None, help="training steps, dense model (default 400)")
    p.add_argument("--conv-steps", type=int, default=None, help="training steps, conv model (default 30)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 32, the paper's dense)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the median (default 3, quick 1)")
    p.add_argument("--test-subset", type=int, default=None, help="test images, dense model (default 2000)")
    p.add_argument("--conv-test-subset", type=int, default=None, help="test images, conv model (default 500)")
    p.add_argument("--eval-batch", type=int, default=250)
    p.add_argument(
        "--bn-batches",
        type=int,
        default=16,
        help="training batches over which BatchNorm running statistics are recomputed before testing (default 16)",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--implicit-max-steps", type=int, default=15, help="GMRES VJP budget (default 15, the models')")
    p.add_argument("--phantom-steps", type=int, default=5)
    p.add_argument("--phantom-damping", type=float, default=0.5)
    p.add_argument("--neumann-steps", type=int, default=5)
    p.add_argument("--rev-beta", type=float, default=0.8, help="ReversibleSolver beta (default 0.8, the paper's)")
    p.add_argument(
        "--rev-max-steps",
        type=int,
        default=6,
        help="ReversibleSolver max_steps (default 6: at most 13 f evaluations, as RevDEQ trains)",
    )
    p.add_argument("--no-scaling", dest="scaling", action="store_false", help="skip the memory-against-steps table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--write",
        dest="write",
        action="store_true",
        default=None,
        help="update benchmarks/RESULTS.md (default unless --quick)",
    )
    p.add_argument("--no-write", dest="write", action="store_false")
    p.add_argument(
        "--write-noise",
        action="store_true",
        help="write RESULTS.md even when MNIST was not found and the run used seeded noise",
    )
    p.add_argument("--results", type=Path, default=None, help="results file (default benchmarks/RESULTS.md)")
    p.add_argument("--section", default=None, help=f"RESULTS.md section name (default '{SECTION}')")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    q = args.quick
    defaults = dict(
        dense_steps=3 if q else 400,
        conv_steps=3 if q else 30,
        batch=8 if q else 32,
        warmup=1 if q else 3,
        test_subset=16 if q else 2000,
        conv_test_subset=16 if q else 500,
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.write is None:
        args.write = not q
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.models:
        if m not in ARCHS:
            p.error(f"unknown model {m!r}; choose from {', '.join(ARCHS)}")
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    setup_threads(args.threads)
    from deqlab.solvers import ConvergenceWarning

    warnings.filterwarnings("ignore", category=ConvergenceWarning)  # the table reports convergence instead
    info = machine_info(device, packages=["torch", "deqlab"])
    print(machine_header(info).replace("**", ""), flush=True)

    n_train = (
        max(args.dense_steps if "dense" in args.models else 0, args.conv_steps if "conv" in args.models else 0)
        * args.batch
    )
    n_test = max(args.test_subset, args.conv_test_subset)
    xtr, ytr, src_tr = mnist_labelled(args.data_dir, "train", n_train, seed=args.seed)
    xte, yte, src_te = mnist_labelled(args.data_dir, "test", n_test, seed=args.seed + 1)
    source = f"{src_tr} (training), {src_te} (test)"
    print(f"data: {source}", flush=True)

    t_start = time.perf_counter()
    results = []
    for arch in args.models:
        print(f"\n[{arch}] training {', '.join(args.modes)} round-robin ...", flush=True)
        results.append(run_model(arch, args, device, (xtr, ytr, xte, yte)))
        print(f"[{arch}] done after {time.perf_counter() - t_start:.0f} s", flush=True)

    report = build_report(results, info, args, source)
    print()
    print(report)
    if args.write and "MNIST not found" in source and not args.write_noise:
        # the committed section holds real-MNIST figures: a run on noise must not replace them silently
        print("not writing RESULTS.md: MNIST was not found (pass --data-dir, or --write-noise to write anyway)")
    elif args.write:
        kw = {"path": args.results} if args.results else {}
        path = update_results_section(args.section or SECTION, report, **kw)
        print(f"wrote section '{args.section or SECTION}' of {path}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
