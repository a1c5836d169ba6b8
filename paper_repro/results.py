"""The results files of the experiment scripts: their columns, how rows are written, and how they are read back.

Why a module of its own, free of torch and Lightning: ``summarize.py`` and ``--grid`` resume read these
files, and neither should pay for a deep-learning import to parse a CSV.

Two places hold the rows of one experiment (``<experiment>`` is ``mnist``, ``svhn``, ...):

* ``<results-dir>/<experiment>.csv`` and ``<experiment>_epochs.csv``: the *shared* tables, appended to by
  single runs and by ``--grid`` (one process at a time: a grid runs its cells in sequence);
* ``<results-dir>/cells/<experiment>/<cell>.csv`` and ``<cell>_epochs.csv``: one pair per grid cell run with
  ``--grid-cell I``. Cells may run at the same time in separate processes, possibly on other machines that
  share the results folder (a SLURM job array), so each writes only its own files, and its run row is
  written whole to a temporary file and renamed into place: a reader sees either no row or the complete
  one, and no lock is needed. (``fcntl`` locks on one shared CSV were the alternative; they are not
  reliable on the network file systems clusters share results over, e.g. NFS without ``lockd`` or Lustre
  mounted without ``flock``.)

Readers (:func:`load_results`, :meth:`ResultFiles.finished`) merge both places and keep one row per run key
(:data:`KEY_COLUMNS`), the one finished last.
"""

from __future__ import annotations

import csv
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
#: Where runs write by default: ``runs/`` is git-ignored, so results never land in the source tree by accident.
DEFAULT_RESULTS_DIR = REPO / "runs" / "paper_repro" / "results"
DEFAULT_LOG_DIR = REPO / "runs" / "paper_repro" / "tensorboard"
#: The folder, under the results folder, of the per-cell files (``cells/<experiment>/<cell>.csv``).
CELLS_DIR = "cells"

#: Columns of ``<experiment>.csv``, in order. ``key`` columns identify a run (what ``--grid`` skips).
KEY_COLUMNS = (
    "experiment",
    "arch",
    "model_type",
    "solver",
    "jac_reg",
    "seed",
    "requested_epochs",
    "requested_max_steps",
    "train_subset",
    "test_subset",
    "batch_size_per_process",
    "world_size",
    "protocol",
    "ode_solver",
)
RESULT_COLUMNS = KEY_COLUMNS + (
    "test_accuracy",
    "test_top5_accuracy",
    "explicit_accuracy",
    "test_loss",
    "train_time_per_step_s",
    "train_time_per_epoch_s",
    "epoch_time_measured",
    "forward_time_s",
    "backward_time_s",
    "optimizer_time_s",
    "prediction_time_s",
    "explicit_time_s",
    "train_nfe",
    "test_nfe",
    "backward_nfe",
    "train_reference_nfe",
    "test_reference_nfe",
    "parameters",
    "steps",
    "epochs",
    "steps_per_epoch",
    "effective_batch_size",
    "train_samples",
    "test_samples",
    "pretrain_steps",
    "fit_time_s",
    "test_time_s",
    "device",
    "accelerator",
    "num_processes",
    "strategy",
    "torch_version",
    "lightning_version",
    "deqlab_version",
    "git_commit",
    "log_dir",
    "finished_at",
)
EPOCH_COLUMNS = (
    "experiment",
    "arch",
    "model_type",
    "solver",
    "jac_reg",
    "seed",
    "stage",
    "epoch",
    "step",
    "train_loss",
    "train_accuracy",
    "train_nfe",
    "train_backward_nfe",
    "train_time_s",
    "eval_accuracy",
    "eval_explicit_accuracy",
    "eval_nfe",
    "eval_loss",
    "protocol",
    "ode_solver",
    "train_reference_nfe",
    "eval_reference_nfe",
)

RunKey = Tuple[str, ...]


# ---------------------------------------------------------------------------------------------- writing
def _check_columns(row: Dict[str, Any], columns: Sequence[str]) -> None:
    extra = set(row) - set(columns)
    if extra:
        raise KeyError(f"columns not in the table: {sorted(extra)}")


def _cells(row: Dict[str, Any], columns: Sequence[str]) -> Dict[str, Any]:
    return {k: ("" if row.get(k) is None else row.get(k)) for k in columns}


def append_row(path: Path, row: Dict[str, Any], columns: Sequence[str]) -> None:
    """Append ``row`` to the CSV at ``path`` (header written on creation); unknown keys raise.

    A table written before columns were added is rewritten once under the current header (its rows keep
    their values, the new columns stay empty), so a row never lands under the wrong column; a table with a
    column this version does not write raises instead of losing it.

    One writer at a time: the shared tables are written by one process (a single run or a sequential
    ``--grid``); concurrent grid cells write their own files (:func:`write_row`).
    """
    _check_columns(row, columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        dropped = set(header) - set(columns)
        if dropped:
            raise KeyError(
                f"{path} has columns this version does not write ({sorted(dropped)}); "
                "append to a new results file (--results-dir) instead of losing them"
            )
        if list(header) != list(columns):
            old = read_rows(path)
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(columns))
                w.writeheader()
                w.writerows(old)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        if new:
            w.writeheader()
        w.writerow(_cells(row, columns))


def write_row(path: Path, row: Dict[str, Any], columns: Sequence[str]) -> None:
    """Write ``path`` as a one-row CSV, atomically: the row goes to a temporary file beside it (``.tmp``,
    named after this host and process, so two writers never share one) that is then renamed over ``path``.

    Why: a grid cell's row is read by other processes (``summarize.py``, other cells deciding what is
    finished) while cells run; a rename is atomic on POSIX file systems, so they see the whole row or none,
    and a job killed while writing leaves no half row behind.
    """
    _check_columns(row, columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        w.writerow(_cells(row, columns))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


#: The columns an epoch row shares with its run (the epoch table has no schedule columns).
EPOCH_IDENTITY = ("experiment", "arch", "model_type", "solver", "jac_reg", "seed", "protocol", "ode_solver")


def drop_unfinished_epoch_rows(path: Path, cfg: Any, from_epoch: int) -> int:
    """Remove from the epoch table at ``path`` the rows of ``cfg``'s unfinished attempt whose epoch is
    ``from_epoch`` or later; returns how many went.

    Why: a run resumed from its checkpoint trains those epochs again (the attempt that was killed wrote
    their rows after its last checkpoint). The unfinished attempt's rows are those of the run's identity
    after its last ``test`` row (a finished attempt ends with one), so rows of an earlier finished run with
    the same identity stay.
    """
    rows = read_rows(path)
    if not rows:
        return 0
    ident = tuple(
        str(v)
        for v in (
            cfg.experiment, cfg.arch, cfg.model_type, cfg.solver, cfg.jacobian_regularization, cfg.seed,
            cfg.protocol, cfg.ode_solver or "",
        )
    )  # fmt: skip

    def mine(row: Dict[str, str]) -> bool:
        return tuple(row.get(c) or "" for c in EPOCH_IDENTITY) == ident

    last_test = max((i for i, r in enumerate(rows) if mine(r) and r.get("stage") == "test"), default=-1)
    keep = [
        r
        for i, r in enumerate(rows)
        if not (i > last_test and mine(r) and r.get("stage") == "train" and int(r.get("epoch") or 0) >= from_epoch)
    ]
    if len(keep) == len(rows):
        return 0
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(keep)
    os.replace(tmp, path)
    return len(rows) - len(keep)


# ---------------------------------------------------------------------------------------------- reading
def read_rows(path: Path) -> List[Dict[str, str]]:
    """The rows of the CSV at ``path`` (none when it does not exist)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def row_key(row: Dict[str, Any]) -> RunKey:
    """The run key of a row (what identifies a run): its :data:`KEY_COLUMNS` as strings; a column an old
    table lacks reads as empty."""
    return tuple("" if row.get(c) is None else str(row.get(c)) for c in KEY_COLUMNS)


def latest_per_key(rows: Iterable[Dict[str, str]]) -> List[Dict[str, str]]:
    """One row per run key: where a run was recorded twice (a cell file and the shared table, or two
    processes that ran the same cell), the one finished last; on a tie, the one read last. The result keeps
    the order in which the keys first appeared."""
    best: Dict[RunKey, Dict[str, str]] = {}
    for row in rows:
        key = row_key(row)
        if key not in best or (row.get("finished_at") or "") >= (best[key].get("finished_at") or ""):
            best[key] = row
    return list(best.values())


def _run_and_epoch_files(folder: Path) -> Tuple[List[Path], List[Path]]:
    runs: List[Path] = []
    epochs: List[Path] = []
    for path in sorted(folder.glob("*.csv")):
        (epochs if path.stem.endswith("_epochs") else runs).append(path)
    return runs, epochs


def load_results(results_dir: Path) -> Tuple[List[Dict[str, str]], List[Dict[str, str]]]:
    """Every run row (one per run key, :func:`latest_per_key`) and every epoch row under ``results_dir``:
    the shared ``<experiment>.csv`` / ``<experiment>_epochs.csv`` and the grid cells' files under
    ``cells/<experiment>/``."""
    results_dir = Path(results_dir)
    run_files, epoch_files = _run_and_epoch_files(results_dir)
    for folder in sorted((results_dir / CELLS_DIR).glob("*")):
        if folder.is_dir():
            r, e = _run_and_epoch_files(folder)
            run_files += r
            epoch_files += e
    runs = latest_per_key(row for path in run_files for row in read_rows(path))
    epochs = [row for path in epoch_files for row in read_rows(path)]
    return runs, epochs


# ---------------------------------------------------------------------------------------------- one experiment
@dataclass(frozen=True)
class ResultFiles:
    """The files one experiment writes under one results folder, and which runs they already hold.

    Args:
        results_dir: the ``--results-dir`` folder.
        experiment: the experiment's name (``mnist``, ...): the stem of its tables.
    """

    results_dir: Path
    experiment: str

    @property
    def runs_csv(self) -> Path:
        """The shared run table, ``<results-dir>/<experiment>.csv``."""
        return Path(self.results_dir) / f"{self.experiment}.csv"

    @property
    def epochs_csv(self) -> Path:
        """The shared epoch table, ``<results-dir>/<experiment>_epochs.csv``."""
        return Path(self.results_dir) / f"{self.experiment}_epochs.csv"

    @property
    def cells_dir(self) -> Path:
        """``<results-dir>/cells/<experiment>``: the grid cells' own files."""
        return Path(self.results_dir) / CELLS_DIR / self.experiment

    def cell_runs_csv(self, cell: str) -> Path:
        """The run row of grid cell ``cell`` (a :meth:`RunConfig.cell_name <paper_repro.plan.RunConfig.cell_name>`)."""
        return self.cells_dir / f"{cell}.csv"

    def cell_epochs_csv(self, cell: str) -> Path:
        """The epoch rows of grid cell ``cell``."""
        return self.cells_dir / f"{cell}_epochs.csv"

    def finished(self) -> Dict[RunKey, Path]:
        """Run key -> the file holding its row, for every finished run of this experiment, shared table and
        cell files alike (what ``--grid`` and ``--grid-cell`` skip)."""
        out: Dict[RunKey, Path] = {}
        paths = [self.runs_csv] + sorted(p for p in self.cells_dir.glob("*.csv") if not p.stem.endswith("_epochs"))
        for path in paths:
            for row in read_rows(path):
                out.setdefault(row_key(row), path)
        return out


# ---------------------------------------------------------------------------------------------- merging
def merge_results(sources: Sequence[Path], into: Path, experiment: str) -> int:
    """Copy the runs recorded under ``sources`` (results folders of grids run apart, e.g. on two machines
    or from two checkouts) into the tables under ``into``; a run already there (same key) is left as it is.
    Each copied run brings its epoch rows (those with its experiment, arch, model type, solver, Jacobian
    regularization, seed and protocol). Returns the number of runs copied.

    Why not concatenate the files: the tables of different versions have different columns, and a run
    present in both would be counted twice by the summaries.
    """
    dest = ResultFiles(into, experiment)
    have = {row_key(r) for r in read_rows(dest.runs_csv)}
    copied = 0
    for source in sources:
        runs, epochs = load_results(Path(source))
        for run in runs:
            if run.get("experiment") != experiment or row_key(run) in have:
                continue
            ident = ("experiment", "arch", "model_type", "solver", "jac_reg", "seed", "protocol", "ode_solver")
            for e in epochs:
                if all((e.get(k) or "") == (run.get(k) or "") for k in ident):
                    append_row(dest.epochs_csv, {k: e.get(k) for k in EPOCH_COLUMNS if k in e}, EPOCH_COLUMNS)
            append_row(dest.runs_csv, {k: run.get(k) for k in RESULT_COLUMNS if k in run}, RESULT_COLUMNS)
            have.add(row_key(run))
            copied += 1
    return copied


# ---------------------------------------------------------------------------------------------- safety
def tracked_by_git(paths: Sequence[Path]) -> List[Path]:
    """Those of ``paths`` that exist and are tracked by git (a committed result table, summary or plot).
    Outside a git checkout, or without git, nothing is tracked."""
    import subprocess

    existing = [Path(p).resolve() for p in paths if Path(p).exists()]
    if not existing:
        return []
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "ls-files", "--", *map(str, existing)], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    listed = {(REPO / line).resolve() for line in out.stdout.splitlines() if line}
    return [p for p in existing if p in listed]


def refuse_tracked(paths: Sequence[Path], *, allowed: bool, flag: str = "--overwrite-tracked") -> None:
    """Stop with one line when a file about to be written is tracked by git, unless ``allowed``.

    Why: the repository's committed results (``paper_repro/results/``) are the measured record; a quick
    1-epoch check run must not silently replace them. Write elsewhere (the defaults are under ``runs/``) or
    say so explicitly with ``flag``.
    """
    tracked = tracked_by_git(paths)
    if tracked and not allowed:
        names = ", ".join(str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in tracked[:4])
        more = f" and {len(tracked) - 4} more" if len(tracked) > 4 else ""
        raise SystemExit(
            f"error: would overwrite files tracked by git: {names}{more}; write somewhere else "
            f"(e.g. the default under runs/) or pass {flag} to replace them on purpose"
        )
