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
from typing import Any, Dict, List, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
import torch.nn.functional as F

from deqlab.spec import model_kind

#: The solver behind the paper's MNIST NFE column (docs/paper_repro.md, "How the paper counted"): the
#: January-2022 ``mnist_fc.jl`` ran L-Broyden with one relative-norm test over the whole batch, not Tsit5.
REFERENCE_SOLVER: Dict[str, Any] = {"mode": "rel_norm", "batch_wide": True}  # the discrete default: L-Broyden

CONFIGS: Tuple[Tuple[str, str], ...] = (
    ("vanilla", "continuous"),
    ("skip", "continuous"),
    ("skip_reg", "continuous"),
    ("vanilla", "discrete"),
    ("skip", "discrete"),
    ("skip_reg", "discrete"),
    ("neural_ode", "continuous"),
)


def load_mnist(data_dir: Path) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Real MNIST as normalized flat float tensors: ``(x_train, y_train, x_test, y_test)``, read by deqlab's one
    MNIST loader (the data module's normalization, the same pixels as the benchmarks)."""
    from deqlab.data import load_mnist_tensors

    xtr, ytr = load_mnist_tensors(data_dir, "train", flatten=True)
    xte, yte = load_mnist_tensors(data_dir, "test", flatten=True)
    return xtr, ytr, xte, yte


class Config:
    """One model (model type × solver × Jacobian regularization): its network, optimizer and loss weights.

    Built untrained (``seed``), or from a network the grid trained and saved (``payload``, see
    ``mnist.py --save-model``); ``ode_solver`` re-solves a continuous model with another integrator (the
    same weights, so the two integrators are compared on one trained model); ``reference_solver`` re-solves
    any trained DEQ with the solver that produced the paper's MNIST NFE column (`REFERENCE_SOLVER`)."""

    def __init__(
        self,
        model_type: str,
        solver: str,
        seed: int,
        *,
        jacobian_regularization: bool = False,
        ode_solver: str = "",
        reference_solver: bool = False,
        payload: Any = None,
        protocol: str = "paper",
        compile_solver: bool = False,
    ):
        from deqlab.models import build_model, paper_settings

        torch.manual_seed(seed)
        options = dict(payload.get("model_options") or {}) if payload else {}
        # every configuration of a timing runs the same way, eager or compiled, whatever its training used
        options.pop("compile_solver", None)
        if compile_solver:
            options["compile_solver"] = True
        trained_ode = (payload or {}).get("ode_solver", "")
        trained_as = f"{solver}/{trained_ode}" if trained_ode else solver
        if reference_solver:
            solver = "discrete"
            options.pop("ode_solver", None)
            options.update(REFERENCE_SOLVER)
        if solver == "continuous" and model_kind(model_type).is_deq:
            options["ode_solver"] = ode_solver or trained_ode or options.get("ode_solver", "tsit5")
        jr = self.jacobian_regularization = bool(jacobian_regularization)
        self.model_type, self.solver = model_type, solver
        label = f"{solver}/{options['ode_solver']}" if "ode_solver" in options else solver
        resolved = f" (trained with {trained_ode})" if trained_ode and options.get("ode_solver") != trained_ode else ""
        if reference_solver:
            label, resolved = "reference L-Broyden", f" (trained {trained_as})"
        self.solver_label = label + resolved
        self.name = f"{model_type} {self.solver_label}{' +JR' if jr else ''}"
        self.net = build_model(
            "mnist", "dense", model_type=model_type, solver=solver, jacobian_regularization=jr, **options
        )
        if payload is not None:
            self.net.load_state_dict(payload["state_dict"])
        s = paper_settings("mnist", "dense", model_type, solver, jacobian_regularization=jr, protocol=protocol)
        self.skip_weight = float(s["skip_loss_weight"])
        self.jac_weight = float(s["jacobian_loss_weight"])
        from deqlab.lightning._optim import build_optimizer

        self.opt = build_optimizer(
            self.net.parameters(), s["optimizer"], lr=s["lr"], weight_decay=s["weight_decay"], betas=tuple(s["betas"])
        )
        self.times: Dict[str, List[float]] = {k: [] for k in ("step", "forward", "backward", "predict")}
        self.nfe: Dict[str, List[float]] = {"train": [], "test": [], "backward": [], "test_reference": []}

    def train_step(self, x: torch.Tensor, y: torch.Tensor, record: bool) -> None:
        self.net.train()
        t0 = time.perf_counter()
        logits, sol = self.net(x)
        loss = F.cross_entropy(logits, y) + self.skip_weight * sol.skip_loss + self.jac_weight * sol.jacobian_loss
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
            if sol.reference_nfe is not None:
                self.nfe["test_reference"].append(float(sol.reference_nfe))
        return logits


def load_trained(
    models_dir: Path, also_ode: Sequence[str], seed: int, reference_solver: bool = False, compile_solver: bool = False
) -> List[Config]:
    """Every network ``mnist.py --save-model`` saved under ``models_dir`` (one `Config` each), plus, for each
    continuous DEQ, the same weights solved with each integrator of ``also_ode``, and with
    ``reference_solver``, every DEQ's weights solved with `REFERENCE_SOLVER`."""
    configs = []
    for path in sorted(Path(models_dir).glob("*.pt")):
        payload = torch.load(path, map_location="cpu", weights_only=False)
        jr = bool(payload.get("jacobian_regularization", payload.get("jac_reg")))  # (the grid's first runs: jac_reg)
        common = dict(
            jacobian_regularization=jr,
            payload=payload,
            protocol=payload.get("protocol", "paper"),
            compile_solver=compile_solver,
        )
        configs.append(Config(payload["model_type"], payload["solver"], seed, **common))
        if payload["solver"] == "continuous" and model_kind(payload["model_type"]).is_deq:
            for ode in also_ode:
                if ode != payload.get("ode_solver"):
                    configs.append(Config(payload["model_type"], "continuous", seed, ode_solver=ode, **common))
        if reference_solver and model_kind(payload["model_type"]).is_deq:
            configs.append(Config(payload["model_type"], payload["solver"], seed, reference_solver=True, **common))
    if not configs:
        raise SystemExit(
            f"error: no saved networks (*.pt) in {models_dir}; train them with "
            "paper_repro/mnist.py --grid --save-model (they go to <results-dir>/models)"
        )
    return configs


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
    p.add_argument(
        "--configs",
        default=",".join(f"{m}:{s}" for m, s in CONFIGS),
        help="model_type:solver pairs, comma separated (untrained networks, warmed up here)",
    )
    p.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="time the networks the grid trained and saved here (mnist.py --save-model) instead of "
        "warming up --configs",
    )
    p.add_argument(
        "--also-ode",
        default="",
        help="with --models-dir: also solve each trained continuous DEQ with these integrators "
        "(e.g. vcab3), same weights",
    )
    p.add_argument(
        "--reference-solver",
        action="store_true",
        help="with --models-dir: also solve each trained DEQ with the solver behind the paper's MNIST "
        "NFE column (L-Broyden, one rel_norm test over the whole batch), same weights",
    )
    p.add_argument(
        "--compile-solver",
        action="store_true",
        help="time every configuration with its solver's iteration compiled (compile_solver=True); default: "
        "every one eager, whatever the saved network was trained with",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="also write the table here (a file tracked by git is refused without --overwrite-tracked)",
    )
    p.add_argument(
        "--overwrite-tracked",
        action="store_true",
        help="allow --output to replace a file tracked by git (the committed paper_repro/results/)",
    )
    args = p.parse_args(argv)
    if args.output is not None:
        from paper_repro.results import refuse_tracked

        refuse_tracked([args.output], allowed=args.overwrite_tracked)  # before hours of timing, not after
    torch.set_num_threads(args.threads)
    xtr, ytr, xte, yte = load_mnist(args.data_dir)
    g = torch.Generator().manual_seed(args.seed)
    B = args.batch_size
    if args.models_dir is not None:
        configs = load_trained(
            args.models_dir,
            [o for o in args.also_ode.split(",") if o],
            args.seed,
            reference_solver=args.reference_solver,
            compile_solver=args.compile_solver,
        )
        warm_steps = 0  # trained already
    else:
        configs = [
            Config(*c.split(":"), seed=args.seed, compile_solver=args.compile_solver) for c in args.configs.split(",")
        ]
        warm_steps = args.warm_steps
    for cfg in configs if warm_steps else []:  # warm-up training, each on the same batch sequence
        order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(args.seed))
        for i in range(warm_steps):
            idx = order[(i * B) % len(xtr) : (i * B) % len(xtr) + B]
            cfg.train_step(xtr[idx], ytr[idx], record=False)
        print(f"warmed {cfg.name}", flush=True)
    acc = {}
    for cfg in configs:  # accuracy measured before the timed training steps change the weights
        correct = 0
        for s in range(0, args.test_subset, 250):
            logits = cfg.predict(xte[s : s + 250], record=False)
            correct += int((logits.argmax(1) == yte[s : s + 250]).sum())
        acc[cfg.name] = correct / args.test_subset
    for r in range(args.rounds):  # round-robin: every config sees the same batch, one after another
        idx = torch.randint(0, len(xtr), (B,), generator=g)
        tidx = torch.randint(0, len(xte), (B,), generator=g)
        for cfg in configs if r % 2 == 0 else configs[::-1]:
            cfg.train_step(xtr[idx], ytr[idx], record=True)
            cfg.predict(xte[tidx])
    source = (
        f"the networks trained by the grid ({args.models_dir})"
        if args.models_dir is not None
        else f"{args.warm_steps} warm-up steps per config"
    )
    lines = [
        f"Round-robin timing on real MNIST: {source} (batch {B}), then {args.rounds} rounds; medians, "
        f"seconds; torch {torch.__version__}, {args.threads} thread(s).",
        "",
        "| model | solver | train step | forward | backward | prediction batch | train NFE | test NFE | "
        "test NFE (paper's count) | backward NFE | test acc (subset) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    row = {}
    for cfg in configs:
        m = {k: median(v) for k, v in cfg.times.items()}
        n = {k: median(v) for k, v in cfg.nfe.items()}
        row[cfg.name] = (m, n)
        model = cfg.model_type + (" +JR" if cfg.jacobian_regularization else "")
        lines.append(
            f"| {model} | {cfg.solver_label} | {m['step']:.4f} | {m['forward']:.4f} | {m['backward']:.4f} | "
            f"{m['predict']:.4f} | {n['train']:.1f} | {n['test']:.1f} | {n['test_reference']:.1f} | "
            f"{n['backward']:.1f} | {100 * acc[cfg.name]:.2f} % |"
        )
    lines += ["", "| ratio | train step | backward | prediction | test NFE |", "|---|---|---|---|---|"]

    done = set()

    def ratio(a: str, b: str) -> None:
        if a in row and b in row and (a, b) not in done:  # a pair reached by two routes is shown once
            done.add((a, b))
            (ma, na), (mb, nb) = row[a], row[b]
            lines.append(
                f"| {a} / {b} | {ma['step'] / mb['step']:.2f} | {ma['backward'] / mb['backward']:.2f} | "
                f"{ma['predict'] / mb['predict']:.2f} | {na['test'] / max(nb['test'], 1e-9):.2f} |"
            )

    labels = sorted({c.solver_label for c in configs})
    for jr in ("", " +JR"):
        for solver in labels:
            ratio(f"vanilla {solver}{jr}", f"skip {solver}{jr}")
            ratio(f"vanilla {solver}{jr}", f"skip_reg {solver}{jr}")
        for solver in labels:
            if solver.startswith("continuous"):
                ratio(f"vanilla {solver}{jr}", f"vanilla discrete{jr}")
                ratio("neural_ode continuous", f"vanilla {solver}{jr}")
                for other in labels:  # VCAB3 against Tsit5, on the same trained weights where re-solved
                    if solver.startswith("continuous/tsit5") and other.startswith("continuous/vcab3"):
                        for model in ("vanilla", "skip", "skip_reg"):
                            ratio(f"{model} {other}{jr}", f"{model} {solver}{jr}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)
    return text


if __name__ == "__main__":
    main()
