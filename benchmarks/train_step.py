"""Training-step benchmark on the paper's models: where one optimizer step's time goes.

One step = forward solve + loss + implicit backward + optimizer step of ``deqlab.models.build_model`` networks
(MNIST dense and the CIFAR-10 small MDEQ; vanilla / skip / skip_reg; discrete and continuous solvers), at the
paper's batch sizes (32 MNIST, 128 CIFAR small; ``--quick`` uses smaller batches and fewer repeats).

Reported per configuration (all measured in the same process, interleaved round-robin):

* median step time and its forward / backward / optimizer split;
* forward NFE, solver steps, backward VJPs (``solution.backward_nfe``);
* the **overhead ratio** = step / (NFE × t_f + VJPs × t_vjp + param VJP + optimizer step), with t_f one
  evaluation of the layer's map at z*, t_vjp one VJP w.r.t. z through a retained graph of f at z*, the
  param VJP one VJP w.r.t. the map's parameters and the injection, the optimizer step timed alone
  (this is the issue-10 definition); and a **full** ratio that also prices what the issue's formula leaves
  out: the graph of f built at z* for the backward, and the stem / head / predictor forward + backward;
* host syncs per forward solve: scalar conversions (``item``, ``__bool__``, ``__float__``, ``__int__``,
  ``__index__``, ``tolist``, ``numpy``) counted during one solve (on CUDA also the syncs that
  ``torch.cuda.set_sync_debug_mode`` reports), next to the solver's steps (target ≤ steps + 2 today, k = 1);
* with ``--compile``: the same step with the DEQ map compiled (``module.compile(fullgraph=True)``; the solver
  loop stays eager), and the speed-up;
* torchdeq 0.1.0 (when installed) beside the vanilla discrete models: the same stem / map / head, its
  ``get_deq(ift=True, f_solver="broyden", b_solver="broyden")`` with our tolerance and budgets.

Run ``python benchmarks/train_step.py --quick`` (a few minutes on one CPU thread); ``--output FILE`` writes
the markdown report; without ``--quick`` (or with ``--write``) the ``train-step`` section of
``benchmarks/RESULTS.md`` is replaced (``train-step-cuda`` on a GPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(1, _ROOT)  # run from a checkout without `pip install -e .`

from _common import (  # noqa: E402
    fmt_time,
    machine_header,
    machine_info,
    markdown_table,
    setup_threads,
    synchronize,
    update_results_section,
)
from _workloads import mnist_images  # noqa: E402

from deqlab.spec import model_kind  # noqa: E402

# name -> (experiment, arch, input shape, paper batch, quick batch)
MODELS = {
    "mnist_dense": ("mnist", "dense", (1, 28, 28), 32, 32),
    "cifar10_small": ("cifar10", "small", (3, 32, 32), 128, 16),
}
MODEL_TYPES = ("vanilla", "skip", "skip_reg")
SOLVERS = ("discrete", "continuous")

SYNC_METHODS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


# ------------------------------------------------------------------------------------------ host syncs


class SyncCounter:
    """Count device→host scalar conversions while active.

    On CPU nothing actually synchronises, but every one of these conversions is a sync on CUDA, so
    counting them on CPU predicts the GPU's syncs. Each Python-level call of a patched ``torch.Tensor``
    method counts once (nested conversions inside one call are not double counted). On CUDA
    ``torch.cuda.set_sync_debug_mode("warn")`` additionally reports the syncs torch itself performs
    (e.g. ``nonzero``, boolean-mask indexing), counted in :attr:`cuda_syncs`.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.count = 0
        self.by_method: Dict[str, int] = {}
        self.cuda_syncs: Optional[int] = None
        self._saved: List[tuple] = []
        self._depth = 0
        self._warn_ctx = None
        self._records = None

    def _wrap(self, name: str, fn: Callable) -> Callable:
        counter = self

        def wrapped(*a, **k):
            if counter._depth == 0:
                counter.count += 1
                counter.by_method[name] = counter.by_method.get(name, 0) + 1
            counter._depth += 1
            try:
                return fn(*a, **k)
            finally:
                counter._depth -= 1

        return wrapped

    def __enter__(self) -> "SyncCounter":
        for name in SYNC_METHODS:
            orig = getattr(torch.Tensor, name, None)
            if orig is None:
                continue
            self._saved.append((name, torch.Tensor.__dict__.get(name, None), orig))
            setattr(torch.Tensor, name, self._wrap(name, orig))
        if self.device.type == "cuda":
            self._warn_ctx = warnings.catch_warnings(record=True)
            self._records = self._warn_ctx.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
            self.cuda_syncs = sum(1 for w in self._records if "synchroniz" in str(w.message).lower())
            self._warn_ctx.__exit__(*exc)
        for name, own, _orig in reversed(self._saved):
            if own is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, own)
        self._saved.clear()


# ---------------------------------------------------------------------------------------------- timing


@dataclass
class Samples:
    values: Dict[str, List[float]] = field(default_factory=dict)

    def add(self, key: str, seconds: float) -> None:
        self.values.setdefault(key, []).append(seconds)

    def med(self, key: str) -> float:
        v = self.values.get(key)
        return statistics.median(v) if v else float("nan")


def _clock(device: torch.device) -> float:
    synchronize(device)
    return time.perf_counter()


def _loss(logits: Tensor, y: Tensor, solution: Any) -> Tensor:
    loss = F.cross_entropy(logits, y)
    skip = getattr(solution, "skip_loss", None)
    if skip is not None and skip.requires_grad:
        loss = loss + skip
    jac = getattr(solution, "jacobian_loss", None)
    if jac is not None and jac.requires_grad:
        loss = loss + jac
    return loss


class StepBench:
    """One model + optimizer + batch, with the pieces of a step timed separately."""

    def __init__(
        self,
        name: str,
        model_type: str,
        solver: str,
        batch: int,
        device: torch.device,
        seed: int,
        compile_map: bool = False,
        compile_solver: bool = False,
    ):
        from deqlab.models import build_model

        exp, arch, shape, _, _ = MODELS[name]
        torch.manual_seed(seed)
        self.name, self.model_type, self.solver_kind, self.batch = name, model_type, solver, batch
        self.device = device
        options = {"compile_solver": True} if compile_solver else {}
        self.model = build_model(exp, arch, model_type=model_type, solver=solver, **options).to(device).train()
        if hasattr(self.model.deq, "reporter"):  # unconverged solves of random weights are expected here
            self.model.deq.reporter.policy = "ignore"
        if compile_map:
            self.model.deq.model.compile(fullgraph=True, dynamic=False)
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn((batch, *shape), generator=g).to(device)
        self.y = torch.randint(0, 10, (batch,), generator=g).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        # every step starts from the same weights, so NFE and VJPs do not drift between repeats
        self._init = [p.detach().clone() for p in self.model.parameters()]
        self.last: Dict[str, Any] = {}

    def _restore(self) -> None:
        with torch.no_grad():
            for p, p0 in zip(self.model.parameters(), self._init):
                p.copy_(p0)

    def step(self, samples: Optional[Samples] = None) -> None:
        self._restore()
        dev = self.device
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = _clock(dev)
            logits, sol = self.model(self.x)
            loss = _loss(logits, self.y, sol)
            t1 = _clock(dev)
            loss.backward()
            t2 = _clock(dev)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            t3 = _clock(dev)
        if samples is not None:
            samples.add("step", t3 - t0)
            samples.add("fwd", t1 - t0)
            samples.add("bwd", t2 - t1)
            samples.add("opt_in_step", t3 - t2)
        res = sol.solver_result
        self.last = dict(
            nfe=int(sol.nfe),
            steps=int(res.steps) if res is not None else 0,
            vjps=int(sol.backward_nfe),
            converged=bool(sol.converged.all()),
            z_star=[t.detach() for t in (sol.z_star if isinstance(sol.z_star, (list, tuple)) else [sol.z_star])],
            is_list=isinstance(sol.z_star, (list, tuple)),
        )

    # ----------------------------------------------------------------------------- component costs
    def components(self, samples: Samples, inner: int = 3) -> None:
        """t_f, t_vjp, param VJP, graph build, optimizer step and the outside-the-DEQ work, once each."""
        from deqlab.nn.layers import equilibrium_session
        from deqlab.state import from_parts

        dev, deq = self.device, self.model.deq
        z_parts = self.last["z_star"]
        is_list = self.last["is_list"]
        with torch.no_grad():
            xs = self.model.stem(self.x)
        params = [p for p in deq.model.parameters() if p.requires_grad]
        with equilibrium_session([deq]):
            z = from_parts(z_parts, is_list)
            with torch.no_grad():
                for _ in range(inner):
                    t0 = _clock(dev)
                    deq.model(z, xs)
                    samples.add("t_f", _clock(dev) - t0)
            zg = [t.clone().requires_grad_() for t in z_parts]
            xg = xs.clone().requires_grad_()
            t0 = _clock(dev)
            fz = deq.model(from_parts(zg, is_list), xg)
            samples.add("t_graph", _clock(dev) - t0)
            fz_parts = list(fz) if isinstance(fz, (list, tuple)) else [fz]
            v = [torch.randn_like(t) for t in fz_parts]
            for _ in range(inner):
                t0 = _clock(dev)
                torch.autograd.grad(fz_parts, zg, v, retain_graph=True)
                samples.add("t_vjp", _clock(dev) - t0)
            t0 = _clock(dev)
            torch.autograd.grad(fz_parts, params + [xg], v, retain_graph=True, allow_unused=True)
            samples.add("t_pvjp", _clock(dev) - t0)
            del fz, fz_parts
        # optimizer step alone (gradients present, as in a real step)
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)
        t0 = _clock(dev)
        self.opt.step()
        samples.add("t_opt", _clock(dev) - t0)
        self.opt.zero_grad(set_to_none=True)
        # outside the DEQ: stem forward, head (+ predictor) forward, their backward
        t0 = _clock(dev)
        xs = self.model.stem(self.x)
        zl = [t.clone().requires_grad_() for t in z_parts]
        logits = self.model.head(from_parts(zl, is_list))
        loss = F.cross_entropy(logits, self.y)
        outs, grads = [loss], [None]
        if model_kind(self.model_type).shortcut:  # the Skip DEQ's learned guess and its skip loss
            u0 = deq.init.shortcut(xs)
            u0 = list(u0) if isinstance(u0, (list, tuple)) else [u0]
            skip = sum((a - b).abs().mean() for a, b in zip(u0, z_parts))
            outs.append(skip)
            grads.append(None)
        torch.autograd.backward(
            outs, grads, inputs=[p for p in self.model.parameters() if p.requires_grad], retain_graph=True
        )
        xs.backward(torch.ones_like(xs))
        samples.add("t_outside", _clock(dev) - t0)
        self.model.zero_grad(set_to_none=True)
        self._restore()

    def count_syncs(self) -> Dict[str, Any]:
        """Host syncs in one forward solve (the solver call) and in the whole layer forward."""
        deq = self.model.deq
        solver = deq.solver
        counts: Dict[str, Any] = {}
        real_call = type(solver).__call__
        own_call = type(solver).__dict__.get("__call__")

        def counted(s, *a, **k):
            with SyncCounter(self.device) as sc:
                out = real_call(s, *a, **k)
            counts["solve"] = sc.count
            counts["solve_by"] = dict(sc.by_method)
            counts["solve_nfe"] = int(out.nfe)
            counts["_sample_steps"] = out.sample_steps.detach()  # read after counting (reads are syncs)
            counts["solve_cuda"] = sc.cuda_syncs
            counts["steps"] = int(out.steps)
            return out

        with torch.no_grad():
            xs = self.model.stem(self.x)
        cls = type(solver)
        cls.__call__ = counted  # the class attribute, so an nn.Module solver stays registered as it is
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with SyncCounter(self.device) as sc:
                    deq(xs)
            counts["layer"] = sc.count
            counts["layer_cuda"] = sc.cuda_syncs
            ss = counts.pop("_sample_steps").float().cpu()
            counts["sample_steps"] = (float(ss.mean()), float(ss.min()), float(ss.max()))
        finally:
            if own_call is None:
                del cls.__call__
            else:
                cls.__call__ = own_call
        return counts


# ----------------------------------------------------------------------------------- region breakdown

# Columns of the region table: the regions deqlab reports to `deqlab.instrument` during one step, each
# exclusive of the others. The forward's f evaluations, termination tests and algorithm/stepper work are
# counted inside the layer's forward only (a fixed-point adjoint solver would report the same regions inside
# the backward); the adjoint solver's own work is `adjoint.solve` without its VJPs.
STEP_REGION_COLUMNS = (
    "fwd f evals",
    "termination",
    "algorithm / stepper",
    "f re-eval",
    "adjoint VJPs",
    "adjoint solver excl. VJPs",
    "param VJP",
)
_FORWARD_COLUMNS = ("fwd f evals", "termination", "algorithm / stepper")


def _step_regions(rec) -> Dict[str, float]:
    fwd = "deq.forward"
    algo = sum(
        rec.seconds(r, within=fwd, excluding=["f", "termination"])
        for r in ("algorithm.init", "algorithm.step", "stepper.init", "stepper.step")
    )
    return {
        "fwd f evals": rec.seconds("f", within=fwd),
        "termination": rec.seconds("termination", within=fwd),
        "algorithm / stepper": algo,
        "f re-eval": rec.seconds("adjoint.linearize"),
        "adjoint VJPs": rec.seconds("adjoint.vjp"),
        "adjoint solver excl. VJPs": rec.seconds("adjoint.solve", excluding=["adjoint.vjp"]),
        "param VJP": rec.seconds("adjoint.vjp_inputs"),
    }


def region_breakdown(bench: "StepBench", repeats: int) -> Dict[str, float]:
    """Median exclusive time per region of deqlab's internals over ``repeats`` steps (a separate pass: the
    recording costs a little per region, so the step times of the main table are measured without it)."""
    from deqlab import instrument

    per: Dict[str, List[float]] = {r: [] for r in STEP_REGION_COLUMNS + ("fwd rest", "bwd rest", "step")}
    sync = bench.device if bench.device.type != "cpu" else False
    for _ in range(repeats):
        s = Samples()
        with instrument.record(sync=sync) as rec:
            bench.step(s)
        regions = _step_regions(rec)
        for r in STEP_REGION_COLUMNS:
            per[r].append(regions[r])
        fwd_in = sum(regions[r] for r in _FORWARD_COLUMNS)
        bwd_in = sum(v for r, v in regions.items() if r not in _FORWARD_COLUMNS)
        per["fwd rest"].append(s.values["fwd"][0] - fwd_in)
        per["bwd rest"].append(s.values["bwd"][0] - bwd_in)
        per["step"].append(s.values["step"][0])
    return {k: statistics.median(v) if v else float("nan") for k, v in per.items()}


# -------------------------------------------------------------------------------------------- torchdeq


class TorchDEQStep:
    """The same stem / map / head as a vanilla discrete deqlab model, with torchdeq's DEQ in between."""

    def __init__(self, ours: StepBench):
        from torchdeq import get_deq

        self.ours = ours
        m = ours.model
        tol = float(m.deq.solver.termination.tol)
        max_steps = int(getattr(m.deq.solver, "max_steps", 50))
        b_steps = int(getattr(m.deq.backward, "max_steps", 15) or 15)
        self.deq = get_deq(
            core="sliced",
            ift=True,
            f_solver="broyden",
            f_max_iter=max_steps,
            f_tol=tol,
            f_stop_mode="rel",
            b_solver="broyden",
            b_max_iter=b_steps,
            b_tol=tol,
            b_stop_mode="rel",
        )
        self.deq.train()
        self.nfe = 0
        self.vjps = 0

    def step(self, samples: Optional[Samples] = None) -> None:
        import torchdeq.grad as tg

        from deqlab.nn.layers import equilibrium_session
        from deqlab.state import flatten, unflatten

        ours = self.ours
        ours._restore()
        m, dev = ours.model, ours.device
        like = ours.last["z_star"]
        is_list = ours.last["is_list"]
        counter = [0, 0]
        real = tg.autograd

        def grad(*a, **k):
            counter[1] += 1
            return real.grad(*a, **k)

        with equilibrium_session([m.deq]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tg.autograd = types.SimpleNamespace(grad=grad, Function=real.Function)
            try:
                t0 = _clock(dev)
                xs = m.stem(ours.x)

                def func(zf: Tensor) -> Tensor:
                    counter[0] += 1
                    z = unflatten(zf, like)
                    out = m.deq.model(z if is_list else z[0], xs)
                    return flatten(out if is_list else [out])

                z0 = torch.zeros(ours.batch, sum(t[0].numel() for t in like), device=dev)
                z_out, _info = self.deq(func, z0)
                zs = unflatten(z_out[-1], like)
                logits = m.head(zs if is_list else zs[0])
                loss = F.cross_entropy(logits, ours.y)
                t1 = _clock(dev)
                n_fwd = counter[0]
                loss.backward()
                t2 = _clock(dev)
                ours.opt.step()
                ours.opt.zero_grad(set_to_none=True)
                t3 = _clock(dev)
            finally:
                tg.autograd = real
        self.nfe, self.vjps = n_fwd, counter[1]
        if samples is not None:
            samples.add("step", t3 - t0)
            samples.add("fwd", t1 - t0)
            samples.add("bwd", t2 - t1)


# ------------------------------------------------------------------------------------------------ runs


@dataclass
class Result:
    label: str
    model: str
    model_type: str
    solver: str
    batch: int
    samples: Samples
    last: Dict[str, Any]
    syncs: Optional[Dict[str, Any]] = None
    compiled: Optional[Samples] = None
    compiled_solver: Optional[Samples] = None
    compile_seconds: Optional[float] = None
    torchdeq: Optional[Samples] = None
    torchdeq_counts: Optional[tuple] = None
    note: str = ""
    regions: Optional[Dict[str, float]] = None

    def ideal(self, s: Optional[Samples] = None) -> float:
        s = s or self.samples
        return self.last["nfe"] * s.med("t_f") + self.last["vjps"] * s.med("t_vjp") + s.med("t_pvjp") + s.med("t_opt")

    def ideal_full(self) -> float:
        s = self.samples
        return self.ideal() + s.med("t_graph") + s.med("t_outside")


def run_config(name: str, model_type: str, solver: str, args, device: torch.device) -> Result:
    batch = MODELS[name][4] if args.quick else MODELS[name][3]
    if args.batch:
        batch = args.batch
    bench = StepBench(name, model_type, solver, batch, device, args.seed)
    comp = StepBench(name, model_type, solver, batch, device, args.seed, compile_map=True) if args.compile else None
    csol = (
        StepBench(name, model_type, solver, batch, device, args.seed, compile_solver=True)
        if args.compile_solver
        else None
    )
    compile_seconds = None
    if csol is not None:  # the first step compiles the solver's step: timed on its own
        t0 = time.perf_counter()
        csol.step()
        compile_seconds = time.perf_counter() - t0
    tdq = None
    kind = model_kind(model_type)
    if args.torchdeq and kind.is_deq and not kind.learns_guess and solver == "discrete":  # vanilla
        try:
            tdq = TorchDEQStep(bench)
        except ImportError:
            tdq = None
    for _ in range(args.warmup):
        bench.step()
        if comp is not None:
            comp.step()
        if csol is not None:
            csol.step()
        if tdq is not None:
            tdq.step()
    samples, csamples, tsamples, ssamples = Samples(), Samples(), Samples(), Samples()
    for _ in range(args.repeats):  # round-robin: load drift on a shared machine hits every contender
        bench.step(samples)
        bench.components(samples)
        if comp is not None:
            comp.step(csamples)
        if csol is not None:
            csol.step(ssamples)
        if tdq is not None:
            tdq.step(tsamples)
    res = Result(f"{name} {model_type} {solver}", name, model_type, solver, batch, samples, dict(bench.last))
    res.syncs = bench.count_syncs()
    if args.breakdown:
        res.regions = region_breakdown(bench, max(2, args.repeats // 2))
    if comp is not None:
        res.compiled = csamples
        res.last["compiled_nfe"] = comp.last["nfe"]
    if csol is not None:
        res.compiled_solver = ssamples
        res.compile_seconds = compile_seconds
        res.last["compiled_solver_nfe"] = csol.last["nfe"]
    if tdq is not None:
        res.torchdeq = tsamples
        res.torchdeq_counts = (tdq.nfe, tdq.vjps)
    return res


# ---------------------------------------------------------------------------------------------- report


def _ftime(seconds: float) -> str:
    """``fmt_time`` that keeps the sign (a remainder can come out negative on a noisy machine)."""
    return ("−" + fmt_time(-seconds)) if seconds < 0 else fmt_time(seconds)


def _ratio(a: float, b: float) -> str:
    return "n/a" if not (b == b and b > 0) else f"{a / b:.2f}"


def main_table(results: Sequence[Result]) -> str:
    headers = [
        "model",
        "type",
        "solver",
        "B",
        "step (median)",
        "fwd",
        "bwd",
        "opt",
        "NFE",
        "steps",
        "VJPs",
        "t_f",
        "t_vjp",
        "param VJP",
        "opt step",
        "overhead",
        "overhead (full)",
        "syncs/solve",
        "sync target",
        "converged",
    ]
    rows = []
    for r in results:
        s, last = r.samples, r.last
        syncs = r.syncs or {}
        n_sync = syncs.get("solve", float("nan"))
        cuda = syncs.get("solve_cuda")
        sync_txt = f"{n_sync}" + (f" ({cuda} CUDA)" if cuda is not None else "")
        target = syncs.get("steps", last["steps"]) + 2
        rows.append(
            [
                r.model,
                r.model_type,
                r.solver,
                r.batch,
                fmt_time(s.med("step")),
                fmt_time(s.med("fwd")),
                fmt_time(s.med("bwd")),
                fmt_time(s.med("opt_in_step")),
                last["nfe"],
                last["steps"],
                last["vjps"],
                fmt_time(s.med("t_f")),
                fmt_time(s.med("t_vjp")),
                fmt_time(s.med("t_pvjp")),
                fmt_time(s.med("t_opt")),
                _ratio(s.med("step"), r.ideal()),
                _ratio(s.med("step"), r.ideal_full()),
                sync_txt,
                f"≤ {target} ({'met' if n_sync <= target else 'not met'})",
                "yes" if last["converged"] else "no",
            ]
        )
    return markdown_table(headers, rows, "lllrrrrrrrrrrrrrrlll")


def breakdown_table(results: Sequence[Result]) -> str:
    headers = [
        "model",
        "type",
        "solver",
        "step",
        "NFE × t_f",
        "VJPs × t_vjp",
        "param VJP",
        "opt step",
        "graph of f at z*",
        "stem/head/predictor fwd+bwd",
        "unaccounted",
    ]
    rows = []
    for r in results:
        s, last = r.samples, r.last
        step = s.med("step")
        parts = [
            last["nfe"] * s.med("t_f"),
            last["vjps"] * s.med("t_vjp"),
            s.med("t_pvjp"),
            s.med("t_opt"),
            s.med("t_graph"),
            s.med("t_outside"),
        ]
        rest = step - sum(parts)
        rows.append(
            [r.model, r.model_type, r.solver, fmt_time(step)]
            + [f"{fmt_time(p)} ({p / step:.0%})" for p in parts]
            + [f"{_ftime(rest)} ({rest / step:.0%})"]
        )
    return markdown_table(headers, rows, "lllrrrrrrrr")


def region_table(results: Sequence[Result]) -> Optional[str]:
    rows = []
    for r in results:
        g = r.regions
        if not g:
            continue
        step = g["step"]
        rows.append(
            [r.model, r.model_type, r.solver, fmt_time(step)]
            + [f"{_ftime(g[c])} ({g[c] / step:.0%})" for c in STEP_REGION_COLUMNS + ("fwd rest", "bwd rest")]
        )
    if not rows:
        return None
    return markdown_table(
        ["model", "type", "solver", "step"]
        + list(STEP_REGION_COLUMNS)
        + ["fwd rest (stem, head, init, layer)", "bwd rest (autograd, stem/head, predictor)"],
        rows,
        "lllr" + "r" * 9,
    )


def sync_table(results: Sequence[Result]) -> str:
    rows = []
    for r in results:
        sy = r.syncs or {}
        by = ", ".join(f"{k} {v}" for k, v in sorted((sy.get("solve_by") or {}).items()))
        ss = sy.get("sample_steps")
        if ss is not None and r.solver == "discrete":
            # a discrete step is one f evaluation per sample; a sample stopping at step s used s + 1 of them
            mean, lo, hi = ss
            saved = 1.0 - (mean + 1.0) / (sy.get("steps", hi) + 1.0)
            ss_txt, saved_txt = f"{mean:.1f} / {lo:.0f} / {hi:.0f}", f"{saved:.0%}"
        else:
            ss_txt = "" if ss is None else f"{ss[0]:.1f} / {ss[1]:.0f} / {ss[2]:.0f}"
            saved_txt = "n/a (adaptive steps)" if ss is not None else ""
        rows.append(
            [
                r.model,
                r.model_type,
                r.solver,
                sy.get("steps", ""),
                sy.get("solve", ""),
                by,
                sy.get("layer", ""),
                "" if sy.get("solve_cuda") is None else sy["solve_cuda"],
                ss_txt,
                saved_txt,
            ]
        )
    return markdown_table(
        [
            "model",
            "type",
            "solver",
            "solver steps",
            "syncs in the solve",
            "by conversion",
            "syncs in the layer forward",
            "CUDA sync-debug count",
            "per-sample steps (mean / min / max)",
            "f work per-sample early exit could save",
        ],
        rows,
        "lllrrlrrrr",
    )


def _beside_eager(r: Result, other: Samples) -> list:
    """The cells both compiled tables start with: the configuration, then the eager and the other step
    (``other``'s samples), the speed-up, and both forwards."""
    e, c = r.samples.med("step"), other.med("step")
    fwd = (fmt_time(r.samples.med("fwd")), fmt_time(other.med("fwd")))
    return [r.model, r.model_type, r.solver, fmt_time(e), fmt_time(c), f"{e / c:.2f}×", *fwd]


def _beside_eager_headers(other: str) -> List[str]:
    return ["model", "type", "solver", "eager step", f"{other} step", "speed-up", "eager fwd", "compiled fwd"]


def compile_table(results: Sequence[Result]) -> Optional[str]:
    rows = [
        _beside_eager(r, r.compiled) + [r.last["nfe"], r.last.get("compiled_nfe", "")]
        for r in results
        if r.compiled is not None
    ]
    if not rows:
        return None
    return markdown_table(_beside_eager_headers("compiled-map") + ["NFE eager", "NFE compiled"], rows, "lllrrrrrrr")


def compiled_solver_table(results: Sequence[Result]) -> Optional[str]:
    """Eager against the compiled solver step (``compile_solver=True``): step, forward, overhead (against the
    eager run's ideal: the same NFE and VJPs), the first step's compile time and the steps it takes to earn
    it back."""
    rows = []
    for r in results:
        if r.compiled_solver is None:
            continue
        e, c = r.samples.med("step"), r.compiled_solver.med("step")
        compile_s = max(0.0, (r.compile_seconds or 0.0) - c)  # ~0 when torch's caches held the graphs
        rows.append(
            _beside_eager(r, r.compiled_solver)
            + [
                f"{e / r.ideal():.2f}",
                f"{c / r.ideal():.2f}",
                f"{r.last['nfe']} / {r.last.get('compiled_solver_nfe', '')}",
                f"{compile_s:.1f} s",
                f"{compile_s / (e - c):.0f}" if e > c and compile_s >= 0.05 else ("at once" if e > c else "never"),
            ]
        )
    if not rows:
        return None
    return markdown_table(
        _beside_eager_headers("compiled-solver")
        + [
            "overhead eager",
            "overhead compiled",
            "NFE eager / compiled",
            "compile time",
            "amortised after (steps)",
        ],
        rows,
        "lllrrrrrrrrrr",
    )


def torchdeq_table(results: Sequence[Result]) -> Optional[str]:
    rows = []
    for r in results:
        if r.torchdeq is None:
            continue
        o, t = r.samples, r.torchdeq
        rows.append(
            [
                r.model,
                fmt_time(o.med("step")),
                fmt_time(t.med("step")),
                f"{o.med('step') / t.med('step'):.2f}×",
                fmt_time(o.med("fwd")),
                fmt_time(t.med("fwd")),
                fmt_time(o.med("bwd")),
                fmt_time(t.med("bwd")),
                f"{r.last['nfe']} / {r.torchdeq_counts[0]}",
                f"{r.last['vjps']} / {r.torchdeq_counts[1]}",
            ]
        )
    if not rows:
        return None
    return markdown_table(
        [
            "model (vanilla, discrete)",
            "deqlab step",
            "torchdeq step",
            "deqlab / torchdeq",
            "deqlab fwd",
            "torchdeq fwd",
            "deqlab bwd",
            "torchdeq bwd",
            "fwd f evals (ours / tdq)",
            "bwd VJPs (ours / tdq)",
        ],
        rows,
        "lrrrrrrrrr",
    )


def build_report(results: Sequence[Result], info: Dict[str, str], args) -> str:
    out = [
        "## Training step of the paper's models (`benchmarks/train_step.py`)",
        "",
        f"Generated by `python benchmarks/train_step.py {' '.join(args.shown_argv)}`.".replace("  ", " "),
        "",
        machine_header(info),
        "",
        "One step = `model(x)` (forward solve) + cross-entropy (+ skip loss) + `loss.backward()` (implicit "
        "GMRES adjoint) + `Adam.step()`, random inputs at the given batch size, weights restored before "
        f"every step. Median of {args.repeats} rounds after {args.warmup} warm-up rounds; each round runs "
        "the step and then every component cost once (t_f: one map evaluation at z*, no graph; t_vjp: one "
        "VJP w.r.t. z through a retained graph of f at z*; param VJP: one VJP w.r.t. the map's parameters "
        "and the injection; opt step: `Adam.step()` alone). **overhead** = step / (NFE × t_f + VJPs × t_vjp "
        "+ param VJP + opt step) (issue 10's definition); **overhead (full)** also adds the graph of f at "
        "z* that the backward builds and the stem / head / predictor forward + backward. **syncs/solve** = "
        "scalar conversions (`item`, `__bool__`, `__float__`, `__int__`, `__index__`, `tolist`, `numpy`) "
        "counted during one forward solve (the solver call); target ≤ ⌈steps / k⌉ + 2 with k = 1 today.",
        "",
        main_table(results),
        "",
        "### Where the step's time goes",
        "",
        "Step minus the component costs above (each measured alone in the same rounds); *unaccounted* is "
        "what the solver loops, the adjoint solver and the layer add around the evaluations of f.",
        "",
        breakdown_table(results),
        "",
    ]
    rt = region_table(results)
    if rt:
        out += [
            "Inside the step (a separate pass recording the regions deqlab reports to `deqlab.instrument`, "
            "each exclusive of the others: fwd f evals = `f` inside `deq.forward`, termination = "
            "`termination` there, algorithm / stepper = `algorithm.init`/`algorithm.step` (discrete) or "
            "`stepper.init`/`stepper.step` (continuous) without their f evals and termination tests, f "
            "re-eval = `adjoint.linearize` (the graph of f at z*), adjoint VJPs = `adjoint.vjp`, adjoint "
            "solver excl. VJPs = `adjoint.solve` without its VJPs, param VJP = `adjoint.vjp_inputs`):",
            "",
            rt,
            "",
        ]
    out += ["### Host syncs per forward solve", "", sync_table(results), ""]
    ct = compile_table(results)
    if ct:
        out += ["### Compiled map (`module.compile(fullgraph=True)` on the DEQ map; solver loop eager)", "", ct, ""]
    st = compiled_solver_table(results)
    if st:
        out += [
            "### Compiled solver step (`compile_solver=True`: each solver iteration / stepper call one "
            "`torch.compile(fullgraph=True)` graph, and each Arnoldi step of the GMRES adjoint; inductor)",
            "",
            st,
            "",
            "Overhead = step / the eager run's ideal (same NFE and VJPs); compile time = the first compiled "
            "step minus the median one (near 0 where an earlier configuration's graphs or torch's on-disk "
            "kernel cache served it); amortised after = compile time / (eager − compiled step).",
            "",
        ]
    tt = torchdeq_table(results)
    if tt:
        out += [
            "### Beside torchdeq 0.1.0 (same stem / map / head; `get_deq(ift=True, f_solver='broyden', "
            "b_solver='broyden')`, our tolerance and budgets, `rel` stop mode)",
            "",
            tt,
            "",
        ]
    return "\n".join(out)


# ------------------------------------------------------------------------------------ prediction time


def _fit_shortcut(model, data: Tensor, steps: int, batch: int) -> float:
    """Train a Skip model's predictor on ``|shortcut(x) - z*|`` (the skip loss alone, the map frozen), so its
    u0 starts near z* as it does after real training; returns the final mean |u0 - z*|."""
    deq = model.deq
    opt = torch.optim.Adam(deq.init.shortcut.parameters(), lr=3e-3)
    loss = torch.zeros(())
    for i in range(steps):
        xb = data[(i * batch) % len(data) :][:batch]
        with torch.no_grad():
            xs = model.stem(xb)
            z, _ = deq(xs)
        loss = (deq.init.shortcut(xs) - z).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss)


def prediction_benchmark(args, device: torch.device) -> str:
    """Time per test batch of each MNIST-dense model type vs its NFE (issue 10: prediction time falls with NFE).

    All model types share the vanilla model's stem / map / head weights (so NFE differences come from the
    initial guess alone); the Skip predictor is fitted to z* first (``--fit-steps``). Bound per type:
    1.2 × (NFE / vanilla NFE) × vanilla time + the predictor's own cost.
    """
    from deqlab.models import build_model

    torch.manual_seed(args.seed)
    x_test, source = mnist_images(args.data_dir, "test", 32 * args.pred_batches, seed=args.seed)
    batches = [b.to(device) for b in x_test.split(32)]
    models = {}
    base = None
    for mt in MODEL_TYPES:
        torch.manual_seed(args.seed)
        m = build_model("mnist", "dense", model_type=mt, solver="discrete").to(device)
        if base is None:
            base = m
        else:  # the same stem / map / head as vanilla
            m.stem.load_state_dict(base.stem.state_dict())
            m.deq.model.load_state_dict(base.deq.model.state_dict())
            m.head.load_state_dict(base.head.state_dict())
        m.deq.reporter.policy = "ignore"
        models[mt] = m
    fit = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.fit_steps > 0:
            x_train, _ = mnist_images(args.data_dir, "train", 32 * 50, seed=args.seed + 7)
            fit = _fit_shortcut(models["skip"], x_train.to(device), args.fit_steps, 32)
    for m in models.values():
        m.eval()
    stats = {mt: dict(times=[], nfe=[], solve=[]) for mt in models}
    parts = Samples()

    def predict(m, xb):
        return m(xb)

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(args.warmup + args.repeats):
            for xb in batches:
                for mt, m in models.items():
                    t0 = _clock(device)
                    _, sol = predict(m, xb)
                    dt = _clock(device) - t0
                    if r >= args.warmup:
                        stats[mt]["times"].append(dt)
                        stats[mt]["nfe"].append(sol.nfe)
                # component costs at this batch (same rounds)
                m = models["vanilla"]
                t0 = _clock(device)
                xs = m.stem(xb)
                t1 = _clock(device)
                z, _ = m.deq(xs)
                t2 = _clock(device)
                m.head(z)
                t3 = _clock(device)
                m.deq.model(z, xs)
                t4 = _clock(device)
                models["skip"].deq.init.shortcut(xs)
                t5 = _clock(device)
                if r >= args.warmup:
                    parts.add("stem", t1 - t0)
                    parts.add("head", t3 - t2)
                    parts.add("t_f", t4 - t3)
                    parts.add("shortcut", t5 - t4)
                    parts.add("layer", t2 - t1)
    t_f, stem, head = parts.med("t_f"), parts.med("stem"), parts.med("head")
    predictor = {"vanilla": 0.0, "skip": parts.med("shortcut"), "skip_reg": t_f}
    v_time = statistics.median(stats["vanilla"]["times"])
    v_nfe = statistics.mean(stats["vanilla"]["nfe"])
    rows = []
    verdicts = []
    for mt, st in stats.items():
        tm = statistics.median(st["times"])
        nfe = statistics.mean(st["nfe"])
        bound = 1.2 * nfe / v_nfe * v_time + predictor[mt]
        ideal = stem + head + predictor[mt] + nfe * t_f
        met = tm <= bound
        verdicts.append((mt, met))
        rows.append(
            [
                mt,
                f"{nfe:.2f}",
                fmt_time(tm),
                f"{tm / v_time:.2f}",
                f"{nfe / v_nfe:.2f}",
                fmt_time(predictor[mt]),
                fmt_time(bound),
                "yes" if met else "**no**",
                fmt_time(nfe * t_f),
                fmt_time(stem + head),
                _ftime(tm - ideal),
                f"{tm / ideal:.2f}",
            ]
        )
    table = markdown_table(
        [
            "model type",
            "test NFE (mean)",
            "time / batch (median)",
            "time / vanilla's",
            "NFE / vanilla's",
            "predictor cost",
            "bound 1.2 × NFE ratio × t_vanilla + predictor",
            "met",
            "NFE × t_f",
            "stem + head",
            "solver overhead (rest)",
            "time / (ideal)",
        ],
        rows,
        "lrrrrrrlrrrr",
    )
    return "\n".join(
        [
            "### Prediction time vs NFE (MNIST dense, discrete solver, batch 32, `model.eval()`, `no_grad`)",
            "",
            f"Inputs: {source}, {len(batches)} batches × {args.repeats} rounds (median per batch). The three model "
            "types share the vanilla model's (untrained) stem, map and head; the Skip predictor was fitted to z* "
            f"for {args.fit_steps} Adam steps on the skip loss alone"
            + (f" (final mean |u0 − z*| = {fit:.3g})" if fit is not None else "")
            + ". "
            f"Costs at the same batches: t_f = {fmt_time(t_f)}, stem = {fmt_time(stem)}, head = {fmt_time(head)}, "
            f"shortcut = {fmt_time(parts.med('shortcut'))}. *ideal* = stem + head + predictor + NFE × t_f.",
            "",
            table,
            "",
        ]
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="smaller CIFAR batch, fewer repeats")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--model-types", default=",".join(MODEL_TYPES))
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--batch", type=int, default=0, help="override every model's batch size")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-breakdown",
        dest="breakdown",
        action="store_false",
        help="skip the per-region timing of deqlab's internals",
    )
    p.add_argument("--compile", action="store_true", help="also time the step with the DEQ map compiled")
    p.add_argument(
        "--compile-solver",
        action="store_true",
        help="also time the step with the solver's iteration compiled (build_model(..., compile_solver=True))",
    )
    p.add_argument("--no-torchdeq", dest="torchdeq", action="store_false")
    p.add_argument("--prediction", action="store_true", help="also run the prediction-time-vs-NFE check")
    p.add_argument("--prediction-only", action="store_true", help="run only the prediction-time check")
    p.add_argument("--pred-batches", type=int, default=10)
    p.add_argument("--fit-steps", type=int, default=300)
    p.add_argument(
        "--data-dir",
        default=os.environ.get("DEQLAB_DATA", "data"),
        help="folder holding MNIST/raw for the prediction check (default $DEQLAB_DATA or ./data; noise when absent)",
    )
    p.add_argument("--output", default=None, help="write the markdown report to this file")
    p.add_argument(
        "--write",
        dest="write",
        action="store_true",
        default=None,
        help="update benchmarks/RESULTS.md (default unless --quick)",
    )
    p.add_argument("--no-write", dest="write", action="store_false")
    p.add_argument("--results", type=Path, default=None, help="results file (default benchmarks/RESULTS.md)")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 10
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.write is None:
        args.write = not args.quick
    shown, skip = [], False
    for a in argv if argv is not None else sys.argv[1:]:  # where the output went is not part of the recipe
        if skip:
            skip = False
            continue
        if a in ("--output", "--results"):
            skip = True
            continue
        if not a.startswith(("--output=", "--results=")):
            shown.append(a)
    args.shown_argv = shown
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA not available", file=sys.stderr)
        return 2
    setup_threads(args.threads)
    pkgs = ["torch", "deqlab"]
    try:
        import torchdeq  # noqa: F401

        pkgs.append("torchdeq")
    except ImportError:
        args.torchdeq = False
    info = machine_info(device, pkgs)
    results = []
    pred = prediction_benchmark(args, device) if (args.prediction or args.prediction_only) else None
    for name in [] if args.prediction_only else args.models.split(","):
        for solver in args.solvers.split(","):
            for mt in args.model_types.split(","):
                t0 = time.perf_counter()
                results.append(run_config(name, mt, solver, args, device))
                print(f"# {name} {mt} {solver}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    report = (
        build_report(results, info, args)
        if results
        else ("## Prediction time (`benchmarks/train_step.py`)\n\n" + machine_header(info) + "\n")
    )
    if pred:
        report += "\n" + pred
    print(report)
    if args.output:
        Path(args.output).write_text(report + "\n", encoding="utf-8")
    if args.write:
        section = "train-step" + ("" if device.type == "cpu" else f"-{device.type}")
        path = update_results_section(section, report, **({"path": args.results} if args.results else {}))
        print(f"\nwrote section '{section}' of {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
