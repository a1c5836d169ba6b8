"""Turn the runs' CSVs into markdown tables (mean ± std over seeds, the paper's numbers beside ours), the
ratios the paper claims, and PNG plots.

    python paper_repro/summarize.py --results-dir runs/paper_repro/results          # -> runs/paper_repro/summary

Reads ``<results-dir>/<experiment>.csv`` (one row per run, written by the experiment scripts) and
``<experiment>_epochs.csv`` (one row per epoch), and the grid cells' own files under
``<results-dir>/cells/<experiment>/`` (``--grid-cell``), one row per run key (the one finished last).
Writes ``<out>/summary.md`` and, per experiment and architecture, ``<experiment>_<arch>_figure1.png``
(training and backward time of each model type relative to the vanilla continuous DEQ, the paper's Figure 1)
and ``<experiment>_<arch>_epochs.png`` (test accuracy and NFE per epoch per model type). Nothing is invented:
a cell without measurements reads "-".
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from deqlab.spec import MODEL_TYPES, model_kind
from deqlab.spec.kinds import VANILLA
from paper_repro.paper_reference import ACCURACY_KIND, CLAIMS, PARAMETERS, SOURCE, reference
from paper_repro.results import DEFAULT_RESULTS_DIR, REPO, load_results, refuse_tracked

MODEL_ORDER = MODEL_TYPES
SOLVER_ORDER = ("continuous/tsit5", "continuous/vcab3", "continuous", "discrete")
SOLVER_SHORT = {"continuous/tsit5": "C-tsit5", "continuous/vcab3": "C-vcab3", "continuous": "C", "discrete": "D"}
#: Numeric columns averaged over seeds.
METRICS = (
    "test_accuracy",
    "explicit_accuracy",
    "test_nfe",
    "train_nfe",
    "backward_nfe",
    "test_reference_nfe",
    "train_reference_nfe",
    "train_time_per_step_s",
    "train_time_per_epoch_s",
    "forward_time_s",
    "backward_time_s",
    "prediction_time_s",
    "explicit_time_s",
    "fit_time_s",
    "steps",
    "epochs",
    "parameters",
)
#: The paper's table quantity that matches one of ours.
PAPER_OF = {
    "train_time_per_step_s": "train_time_s",
    "backward_time_s": "backward_time_s",
    "prediction_time_s": "prediction_time_s",
    "test_nfe": "test_nfe",
    "fit_time_s": "train_minutes",
}


# ---------------------------------------------------------------------------------------------- reading
def _num(text: Any) -> Optional[float]:
    if text is None or text == "":
        return None
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _bool(text: Any) -> bool:
    return str(text).strip().lower() in ("true", "1", "yes")


def load(results_dir: Path) -> Tuple[List[Dict[str, str]], List[Dict[str, str]]]:
    """All run rows (one per run key) and all epoch rows under ``results_dir``: the shared tables and the
    grid cells' files (``paper_repro.results.load_results``)."""
    return load_results(results_dir)


# ---------------------------------------------------------------------------------------------- aggregation
#: experiment, arch, jac_reg, protocol, schedule: runs of different protocols or schedules (a 5-epoch run and
#: a 25-epoch one, a subset and the full set) are never averaged together
Group = Tuple[str, str, bool, str, str]
Config = Tuple[str, str]  # model_type, solver label ("discrete", "continuous/tsit5", ...)


def protocol_of(row: Dict[str, str]) -> str:
    """The row's protocol; rows written before protocols were recorded ran the v1 code's settings."""
    return row.get("protocol") or "v1"


def solver_label(row: Dict[str, str]) -> str:
    """``discrete``, or ``continuous/<integrator>`` (rows from before the column: Tsit5, the only one then)."""
    if row.get("solver") != "continuous":
        return row.get("solver", "")
    return f"continuous/{row.get('ode_solver') or 'tsit5'}"


def schedule_of(row: Dict[str, str]) -> str:
    """``25 epochs``, ``20000 steps``, with ``, train subset N`` / ``, test subset N`` when not the full sets."""
    epochs, steps = row.get("requested_epochs", ""), row.get("requested_max_steps", "")
    parts = []
    if epochs not in ("", "-1", None):
        parts.append(f"{epochs} epochs")
    if steps not in ("", "-1", None):
        parts.append(f"at most {steps} steps" if parts else f"{steps} steps")
    for key in ("train_subset", "test_subset"):
        if row.get(key):
            parts.append(f"{key.replace('_', ' ')} {row[key]}")
    return ", ".join(parts) or "unknown schedule"


def _kind(label: str) -> str:
    return label.split("/")[0]


def _order(config: Config) -> Tuple[int, int]:
    m, s = config
    return (MODEL_ORDER.index(m) if m in MODEL_ORDER else 99, SOLVER_ORDER.index(s) if s in SOLVER_ORDER else 99)


def aggregate(rows: Iterable[Dict[str, str]]) -> Dict[Group, Dict[Config, Dict[str, Any]]]:
    """(experiment, arch, jac_reg, protocol, schedule) -> (model_type, solver label) -> {metric: (mean, std,
    n)} plus ``seeds``."""
    buckets: Dict[Group, Dict[Config, List[Dict[str, str]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        group = (r["experiment"], r["arch"], _bool(r.get("jac_reg")), protocol_of(r), schedule_of(r))
        buckets[group][(r["model_type"], solver_label(r))].append(r)
    out: Dict[Group, Dict[Config, Dict[str, Any]]] = {}
    for group, configs in buckets.items():
        out[group] = {}
        for config in sorted(configs, key=_order):
            rs = configs[config]
            stats: Dict[str, Any] = {
                "seeds": sorted({r.get("seed", "") for r in rs}),
                "runs": len(rs),
                "device": sorted({r.get("device", "") for r in rs}),
            }
            for m in METRICS:
                vals = [v for v in (_num(r.get(m)) for r in rs) if v is not None]
                stats[m] = mean_std(vals)
            out[group][config] = stats
    return out


def mean_std(values: Sequence[float]) -> Optional[Tuple[float, float, int]]:
    if not values:
        return None
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std, len(values)


def _mean(stats: Dict[str, Any], metric: str) -> Optional[float]:
    v = stats.get(metric)
    return None if v is None else v[0]


# ---------------------------------------------------------------------------------------------- formatting
def fmt(v: Optional[Tuple[float, float, int]], spec: str = ".3f", scale: float = 1.0) -> str:
    if v is None:
        return "-"
    mean, std, n = v
    if n > 1:
        return f"{format(mean * scale, spec)} ± {format(std * scale, spec)}"
    return format(mean * scale, spec)


def fmt1(v: Optional[float], spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def results_table(group: Group, configs: Dict[Config, Dict[str, Any]]) -> List[str]:
    experiment, arch, jac = group[:3]
    acc_kind = ACCURACY_KIND.get(experiment, "top-1")
    lines = [
        f"| model | solver | seeds | test acc % ({acc_kind}) | paper acc % | explicit acc % | test NFE (every f) | "
        "test NFE (paper's count) | paper test NFE | train NFE (every f) | train NFE (paper's count) | "
        "backward NFE | train s/step | paper train s/batch | backward s | paper backward s | "
        "prediction s/batch | paper prediction s | s/epoch | fit min | paper train min | params | steps | epochs |",
        "|" + "---|" * 24,
    ]
    for (model, solver), s in configs.items():
        ref = reference(experiment, arch, model, _kind(solver), jac) or {}
        lines.append(
            "| "
            + " | ".join(
                [
                    model,
                    solver,
                    str(s["runs"]),
                    fmt(s["test_accuracy"], ".2f", 100),
                    fmt1(ref.get("accuracy"), ".2f"),
                    fmt(s["explicit_accuracy"], ".2f", 100),
                    fmt(s["test_nfe"], ".1f"),
                    fmt(s["test_reference_nfe"], ".1f"),
                    fmt1(ref.get("test_nfe"), ".1f"),
                    fmt(s["train_nfe"], ".1f"),
                    fmt(s["train_reference_nfe"], ".1f"),
                    fmt(s["backward_nfe"], ".1f"),
                    fmt(s["train_time_per_step_s"], ".4f"),
                    fmt1(ref.get("train_time_s")),
                    fmt(s["backward_time_s"], ".4f"),
                    fmt1(ref.get("backward_time_s")),
                    fmt(s["prediction_time_s"], ".4f"),
                    fmt1(ref.get("prediction_time_s")),
                    fmt(s["train_time_per_epoch_s"], ".1f"),
                    fmt(s["fit_time_s"], ".1f", 1 / 60),
                    fmt1(ref.get("train_minutes"), ".2f"),
                    fmt1(_mean(s, "parameters"), ",.0f"),
                    fmt(s["steps"], ".0f"),
                    fmt(s["epochs"], ".2f"),
                ]
            )
            + " |"
        )
    return lines


def _paper_value(group: Group, config: Config, quantity: str) -> Optional[float]:
    ref = reference(group[0], group[1], config[0], _kind(config[1]), group[2]) or {}
    if quantity == "test_reference_nfe":
        quantity = "test_nfe"
    return ref.get(PAPER_OF.get(quantity, quantity))


def ratio_rows(
    group: Group, configs: Dict[Config, Dict[str, Any]]
) -> List[Tuple[str, str, Optional[float], Optional[float]]]:
    """(ratio name, quantity, ours, paper) for every claim the paper makes that the data allows."""
    out: List[Tuple[str, str, Optional[float], Optional[float]]] = []

    def add(name: str, num: Config, den: Config, quantities: Sequence[str]) -> None:
        if num not in configs or den not in configs:
            return
        # two of our configurations that the paper reports as one (the MNIST table beside both solver
        # kinds) have no paper ratio: 1.00 would only compare the paper's numbers with themselves
        same = (
            reference(group[0], group[1], num[0], _kind(num[1]), group[2])
            is reference(group[0], group[1], den[0], _kind(den[1]), group[2])
            is not None
        )
        for q in quantities:
            ours = ratio(_mean(configs[num], q), _mean(configs[den], q))
            paper = None if same else ratio(_paper_value(group, num, q), _paper_value(group, den, q))
            if ours is not None or paper is not None:
                out.append((name, q, ours, paper))

    speed = (
        "train_time_per_step_s",
        "backward_time_s",
        "prediction_time_s",
        "test_nfe",
        "test_reference_nfe",
        "fit_time_s",
    )
    solvers = sorted({s for _, s in configs}, key=lambda s: SOLVER_ORDER.index(s) if s in SOLVER_ORDER else 99)
    continuous = [s for s in solvers if _kind(s) == "continuous"]
    node = next((c for c in configs if c[0] in MODEL_TYPES and not model_kind(c[0]).is_deq), None)
    for solver in solvers:
        for skip in ("skip", "skip_reg"):
            add(f"vanilla / {skip} ({solver})", ("vanilla", solver), (skip, solver), speed)
    for solver in continuous:
        if node is not None:
            add(
                f"neural_ode / vanilla {solver}",
                node,
                ("vanilla", solver),
                ("backward_time_s", "train_time_per_step_s"),
            )
            for skip in ("skip", "skip_reg"):
                add(f"neural_ode / {skip} {solver}", node, (skip, solver), ("train_time_per_step_s",))
        for model in MODEL_ORDER[:3]:
            add(f"{solver} / discrete ({model})", (model, solver), (model, "discrete"), speed)
    if "continuous/tsit5" in solvers and "continuous/vcab3" in solvers:
        for model in MODEL_ORDER[:3]:
            add(
                f"vcab3 / tsit5 ({model})",
                (model, "continuous/vcab3"),
                (model, "continuous/tsit5"),
                ("test_nfe", "train_nfe", "train_time_per_step_s", "prediction_time_s"),
            )
    return out


def render(runs: List[Dict[str, str]], title: str = "Paper reproduction: measured results") -> str:
    agg = aggregate(runs)
    lines = [
        f"# {title}",
        "",
        "Mean ± std over seeds (the seed count is in the `seeds` column). Times in seconds per batch "
        "(train: one optimizer step, median over steps; prediction: one test batch). Paper numbers: "
        f"{SOURCE}; they were measured on the authors' GPUs, so compare ratios, not absolute times.",
        "",
    ]
    for group in sorted(agg):
        experiment, arch, jac, protocol, schedule = group
        configs = agg[group]
        devices = sorted({d for s in configs.values() for d in s["device"] if d})
        lines += [
            f"## {experiment} {arch}{' with Jacobian regularization' if jac else ''}: {protocol} protocol, {schedule}",
            "",
        ]
        if (experiment, arch) in PARAMETERS:
            lines += [f"Paper parameter count: {PARAMETERS[(experiment, arch)]}.", ""]
        if devices:
            lines += [f"Measured on: {', '.join(devices)}.", ""]
        lines += results_table(group, configs) + [""]
        rr = ratio_rows(group, configs)
        if rr:
            lines += [
                "Ratios the paper claims (> 1: the first is slower / needs more):",
                "",
                "| ratio | quantity | ours | paper |",
                "|---|---|---|---|",
            ]
            lines += [f"| {n} | {q} | {fmt1(o, '.2f')} | {fmt1(p, '.2f')} |" for n, q, o, p in rr]
            lines.append("")
    lines += ["## The paper's headline claims", ""] + [f"- {c}" for c in CLAIMS] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure1(group: Group, configs: Dict[Config, Dict[str, Any]], path: Path) -> Optional[Path]:
    """Training and backward time of each model type relative to the vanilla continuous DEQ (ours, and the
    paper's where it has the numbers)."""
    base_key = next((c for c in configs if c[0] == VANILLA.name and _kind(c[1]) == "continuous"), None)
    base = configs.get(base_key) if base_key is not None else None
    if base is None:
        return None
    labels = [f"{m} {SOLVER_SHORT.get(s, s)}" for m, s in configs]
    series = {}
    for q, name in (("train_time_per_step_s", "training"), ("backward_time_s", "backward")):
        series[f"{name} (ours)"] = [ratio(_mean(c, q), _mean(base, q)) for c in configs.values()]
        paper = [ratio(_paper_value(group, k, q), _paper_value(group, base_key, q)) for k in configs]
        if any(p is not None for p in paper):
            series[f"{name} (paper)"] = paper
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4.0))
    width = 0.8 / len(series)
    for i, (name, vals) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(
            xs,
            [v if v is not None else 0.0 for v in vals],
            width,
            label=name,
            hatch="//" if "paper" in name else None,
            alpha=0.6 if "paper" in name else 1.0,
        )
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel("time relative to vanilla continuous DEQ")
    ax.set_title(
        f"{group[0]} {group[1]}{' +JR' if group[2] else ''} ({group[3]}, {group[4]}): training and backward time\n"
        f"relative to vanilla {base_key[1]} (C: continuous, D: discrete)",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def epoch_curves(group: Group, epochs: List[Dict[str, str]], path: Path) -> Optional[Path]:
    """Test accuracy and test NFE per epoch, one line per model type and solver (mean over seeds)."""
    experiment, arch, jac, protocol = group[:4]
    series: Dict[Config, Dict[int, List[Tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in epochs:
        key = (r.get("experiment"), r.get("arch"), _bool(r.get("jac_reg")), protocol_of(r))
        if key != (experiment, arch, jac, protocol) or r.get("stage") != "train":
            continue
        acc, nfe, ep = _num(r.get("eval_accuracy")), _num(r.get("eval_nfe")), _num(r.get("epoch"))
        if acc is None or ep is None:
            continue
        series[(r["model_type"], solver_label(r))][int(ep) + 1].append((acc, nfe if nfe is not None else float("nan")))
    if not series:
        return None
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for config in sorted(series, key=_order):
        pts = sorted(series[config].items())
        xs = [e for e, _ in pts]
        a1.plot(
            xs,
            [100 * statistics.fmean(v[0] for v in vals) for _, vals in pts],
            marker="o",
            label=f"{config[0]} {SOLVER_SHORT.get(config[1], config[1])}",
        )
        a2.plot(
            xs,
            [statistics.fmean(v[1] for v in vals) for _, vals in pts],
            marker="o",
            label=f"{config[0]} {SOLVER_SHORT.get(config[1], config[1])}",
        )
    a1.set_xlabel("epoch")
    a1.set_ylabel("test accuracy %")
    a2.set_xlabel("epoch")
    a2.set_ylabel("test NFE (forward)")
    a1.legend(fontsize=8)
    fig.suptitle(
        f"{experiment} {arch}{' +JR' if jac else ''} ({protocol} protocol, {group[4]}): per epoch (mean over seeds)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- main
def _stems(agg: Dict[Group, Dict[Config, Dict[str, Any]]]) -> List[Tuple[Group, str]]:
    """The file stem of each group's plots: experiment, arch, ``_jac``, protocol, and a counter when one
    protocol has several schedules (a 5-epoch run and a 25-epoch one never share a file)."""
    seen: Dict[str, int] = defaultdict(int)
    out = []
    for group in sorted(agg):
        stem = f"{group[0]}_{group[1]}{'_jac' if group[2] else ''}_{group[3]}"
        seen[stem] += 1
        out.append((group, stem if seen[stem] == 1 else f"{stem}_{seen[stem]}"))
    return out


def summarize(results_dir: Path, out: Path, *, overwrite_tracked: bool = False) -> List[Path]:
    """Write ``summary.md`` and the plots of the runs under ``results_dir`` into ``out``.

    Refuses (``SystemExit``) to replace files tracked by git, such as the committed
    ``paper_repro/results/summary.md``, unless ``overwrite_tracked``: regenerating the record is a
    deliberate act, a check run writes under ``runs/``."""
    runs, epochs = load(results_dir)
    if not runs:
        raise SystemExit(
            f"error: no run CSVs (<experiment>.csv) in {results_dir}; run an experiment script first "
            "or pass --results-dir"
        )
    agg = aggregate(runs)
    stems = _stems(agg)
    planned = [out / "summary.md"] + [out / f"{stem}_{kind}.png" for _, stem in stems for kind in ("figure1", "epochs")]
    refuse_tracked(planned, allowed=overwrite_tracked)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "summary.md"]
    written[0].write_text(render(runs))
    for group, stem in stems:
        configs = agg[group]
        for made in (
            figure1(group, configs, out / f"{stem}_figure1.png"),
            epoch_curves(group, epochs, out / f"{stem}_epochs.png"),
        ):
            if made is not None:
                written.append(made)
    return written


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``summarize.py``."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--results-dir",
        type=Path,
        default=DEFAULT_RESULTS_DIR,
        help="folder with the runs' <experiment>.csv and <experiment>_epochs.csv (and cells/)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=REPO / "runs" / "paper_repro" / "summary",
        help="where summary.md and the PNGs go (files tracked by git are refused without --overwrite-tracked)",
    )
    p.add_argument(
        "--overwrite-tracked",
        action="store_true",
        help="allow replacing files tracked by git (regenerating the committed paper_repro/results/)",
    )
    p.add_argument(
        "--merge-from",
        type=Path,
        nargs="+",
        default=[],
        metavar="DIR",
        help="first copy the runs recorded in these results folders (grids run elsewhere) into "
        "--results-dir; runs already there are kept",
    )
    return p


def main(argv: Optional[Sequence[str]] = None) -> List[Path]:
    p = build_parser()
    args = p.parse_args(argv)
    if args.merge_from:
        from paper_repro.results import merge_results

        refuse_tracked(list(Path(args.results_dir).glob("*.csv")), allowed=args.overwrite_tracked)

        experiments = {
            path.stem for d in args.merge_from for path in Path(d).glob("*.csv") if not path.stem.endswith("_epochs")
        }
        for experiment in sorted(experiments):
            n = merge_results(args.merge_from, args.results_dir, experiment)
            print(f"merged {n} {experiment} run(s) into {args.results_dir}")
    written = summarize(args.results_dir, args.out, overwrite_tracked=args.overwrite_tracked)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
