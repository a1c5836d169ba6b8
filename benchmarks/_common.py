"""Shared helpers for the benchmark scripts in this folder (``solvers.py``, ``backward.py``, ...).

What lives here:

* :func:`setup_threads` – pin torch's intra-op thread count (benchmarks default to one thread so runs on
  a shared machine are comparable) and report what was actually set.
* :func:`synchronize` / :func:`time_once` / :func:`time_call` / :class:`Timing` – wall-clock timing with
  warm-up and the median of several repeats; CUDA work is synchronised before reading the clock.
* :func:`machine_info` / :func:`machine_header` – platform, CPU model, GPU, package versions, threads and
  date, printed above every results table.
* :func:`peak_bytes` – the peak bytes allocated during one call (torch's profiler on CPU, the CUDA
  allocator's statistics on a GPU).
* :func:`markdown_table` – a plain GitHub-flavoured markdown table.
* :func:`shown_argv` – the command line a report names, without where its output went.
* :func:`update_results_section` – write one named section of ``benchmarks/RESULTS.md`` between
  ``<!-- NAME:start -->`` / ``<!-- NAME:end -->`` markers, leaving every other section as it is, so each
  benchmark script owns its own section of the shared file.

Only the standard library and torch are imported. The per-region breakdowns use deqlab's public hook,
:mod:`deqlab.instrument`; the maps and MNIST images are in ``_workloads.py``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_PATH = BENCH_DIR / "RESULTS.md"
RESULTS_TITLE = "# deqlab benchmark results"
RESULTS_INTRO = (
    "Each section below is written by one script in `benchmarks/` (`make bench` runs them all) and is\n"
    "replaced in place when that script runs again; the other sections are left untouched.\n"
)


# --------------------------------------------------------------------------------------------- threads


def setup_threads(threads: int = 1, interop_threads: Optional[int] = None) -> int:
    """Fix torch's intra-op thread count (and, the first time only, inter-op threads); return it.

    ``threads <= 0`` keeps torch's default. Environment variables such as ``OMP_NUM_THREADS`` are set too
    so that libraries consulted later agree.
    """
    if threads and threads > 0:
        torch.set_num_threads(int(threads))
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        os.environ.setdefault("MKL_NUM_THREADS", str(threads))
        if interop_threads is None:
            interop_threads = threads
    if interop_threads:
        try:
            torch.set_num_interop_threads(int(interop_threads))
        except RuntimeError:  # may only be set once per process, before any parallel work
            pass
    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------------- timing


def synchronize(device: Any = None) -> None:
    """Wait for queued device work (a no-op on CPU)."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev is not None and dev.type == "mps":  # pragma: no cover - not on CI
        torch.mps.synchronize()


def time_once(fn: Callable[[], Any], device: Any = None) -> float:
    """Seconds for one call of ``fn``, synchronising the device before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


@dataclass
class Timing:
    """Repeated wall-clock measurements (seconds) of one callable."""

    samples: List[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.samples.append(float(seconds))

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def min(self) -> float:
        return min(self.samples) if self.samples else float("nan")

    @property
    def iqr(self) -> float:
        """Interquartile range (seconds): a robust spread, 0 for fewer than two samples."""
        if len(self.samples) < 2:
            return 0.0
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q[2] - q[0]

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"Timing(median={fmt_time(self.median)}, min={fmt_time(self.min)}, n={self.n})"


def time_call(
    fn: Callable[[], Any], *, repeats: int = 10, warmup: int = 2, device: Any = None, inner: int = 1
) -> Timing:
    """Time ``fn`` ``repeats`` times after ``warmup`` untimed calls.

    ``inner > 1`` times ``inner`` back-to-back calls per sample and records the mean per call (for
    callables too short for the clock's resolution).
    """
    for _ in range(max(0, warmup)):
        fn()
    synchronize(device)
    timing = Timing()
    for _ in range(max(1, repeats)):
        if inner == 1:
            timing.add(time_once(fn, device))
        else:

            def many() -> None:
                for _ in range(inner):
                    fn()

            timing.add(time_once(many, device) / inner)
    return timing


def time_interleaved(
    fns: Dict[str, Callable[[], Any]], *, repeats: int = 10, warmup: int = 2, device: Any = None
) -> Dict[str, Timing]:
    """Time several callables round-robin (one call of each per round).

    On a machine shared with other processes the load drifts over time; interleaving spreads that drift
    over every contender instead of penalising whichever happened to run during a busy spell.
    """
    for _ in range(max(0, warmup)):
        for fn in fns.values():
            fn()
    synchronize(device)
    out = {name: Timing() for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            out[name].add(time_once(fn, device))
    return out


def fmt_time(seconds: float) -> str:
    """Human-readable duration: ``812 µs``, ``3.41 ms``, ``1.20 s``."""
    if seconds != seconds:  # NaN
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


# ---------------------------------------------------------------------------------------------- memory


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's C++ log lines on fd 2 (kineto prints start/stop and device probes)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except OSError:  # pragma: no cover - no real fd 2
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated during ``fn()`` above what was allocated when it started (torch's CPU
    allocator events replayed in time order from ``torch.profiler``; on CUDA ``max_memory_allocated``)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = []
    stack = list(reversed(prof.profiler.kineto_results.experimental_event_tree()))
    order = 0
    while stack:  # depth-first in recorded order; then a stable sort by time
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == device.type:
            events.append((node.start_time_ns, order, node.extra_fields.alloc_size))
            order += 1
        stack.extend(reversed(node.children))
    events.sort()
    cur = peak = 0
    for _, _, size in events:
        cur += size
        peak = max(peak, cur)
    return int(peak)


# ------------------------------------------------------------------------------------------ machine info


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def package_version(name: str) -> str:
    """Installed version of ``name`` (distribution metadata first, then ``module.__version__``)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        mod = __import__(name)
        return str(getattr(mod, "__version__", "unknown"))
    except Exception:
        return "not installed"


def machine_info(device: Any = "cpu", packages: Iterable[str] = ("torch",), **extra: Any) -> Dict[str, str]:
    """Everything needed to reproduce a timing, as an ordered ``{label: value}`` dict."""
    dev = torch.device(device)
    info: Dict[str, str] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical cores visible)",
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(dev)
        info["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    info["device"] = str(dev)
    for pkg in packages:
        info[pkg] = torch.__version__ if pkg == "torch" else package_version(pkg)
    info["threads"] = f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op"
    try:
        load = os.getloadavg()
        info["load average at start"] = f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min)"
    except (OSError, AttributeError):
        pass
    for key, value in extra.items():
        info[key.replace("_", " ")] = str(value)
    return info


def machine_header(info: Dict[str, str]) -> str:
    """The machine info as a markdown bullet list."""
    return "\n".join(f"- **{k}**: {v}" for k, v in info.items())


# ------------------------------------------------------------------------------------------- markdown


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Optional[str] = None) -> str:
    """A GitHub markdown table. ``align`` is one character per column: ``l``, ``r`` or ``c``."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(3, max(len(r[i]) for r in cells)) for i in range(len(headers))]
    align = (align or "l" * len(headers)).ljust(len(headers), "l")

    def sep(i: int) -> str:
        w = max(3, widths[i])
        return {"l": ":" + "-" * (w - 1), "r": "-" * (w - 1) + ":", "c": ":" + "-" * (w - 2) + ":"}[align[i]]

    def line(row: Sequence[str]) -> str:
        out = []
        for i, c in enumerate(row):
            out.append(c.rjust(widths[i]) if align[i] == "r" else c.ljust(widths[i]))
        return "| " + " | ".join(out) + " |"

    return "\n".join(
        [line(cells[0]), "| " + " | ".join(sep(i) for i in range(len(headers))) + " |"] + [line(r) for r in cells[1:]]
    )


def _markers(name: str):
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"section name must be letters, digits, '_', '-' or '.', got {name!r}")
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def update_results_section(name: str, content: str, path: Path = RESULTS_PATH) -> Path:
    """Replace the section ``name`` of the results file with ``content`` (appending it if absent).

    The section is delimited by ``<!-- name:start -->`` and ``<!-- name:end -->``; text outside every
    marker pair, and other scripts' sections, are preserved. The file is created if missing.
    """
    path = Path(path)
    start, end = _markers(name)
    block = f"{start}\n{content.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else f"{RESULTS_TITLE}\n\n{RESULTS_INTRO}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    if not text.endswith("\n"):
        text += "\n"
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_results_section(name: str, path: Path = RESULTS_PATH) -> Optional[str]:
    """The current content of section ``name`` (without markers), or ``None``."""
    path = Path(path)
    if not path.exists():
        return None
    start, end = _markers(name)
    m = re.search(re.escape(start) + r"\n?(.*?)\n?" + re.escape(end), path.read_text(encoding="utf-8"), re.DOTALL)
    return m.group(1) if m else None


# ----------------------------------------------------------------------------------------- command line


def shown_argv(argv: List[str]) -> List[str]:
    """The command line minus where the output went (``--results PATH``, ``--section NAME``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--results", "--section"):
            skip = True
            continue
        if a.startswith(("--results=", "--section=")):
            continue
        out.append(a)
    return out
