"""The habits that keep the code base as it is: ruff (lint and format) and mypy are clean, and the package
builds into a wheel and an sdist that pass ``twine check`` and install and import on their own.

The tools come with the ``dev`` extra (``make test`` installs it); without one, its test is skipped and says
which. The configuration is in ``pyproject.toml`` ([tool.ruff], [tool.mypy]); docs/development.md says how
to run the same checks by hand.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a copy of the checkout for the build leaves out: at its top, version control, environments, build
# outputs, downloaded data and run outputs (the .gitignore's folders); anywhere, caches and checkpoints.
TOP_LEVEL_OUT = {".git", ".venv", "build", "dist", "site", "data", "datasets", "runs", "lightning_logs", "tb_logs"}
ANYWHERE_OUT = shutil.ignore_patterns("__pycache__", "*.egg-info", ".*_cache", ".hypothesis", "checkpoints", "*.ckpt")


def _not_sources(folder: str, names: list) -> set:
    top = TOP_LEVEL_OUT.intersection(names) if Path(folder).resolve() == ROOT else set()
    return top | ANYWHERE_OUT(folder, names)


def _tool(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (it comes with the dev extra: pip install -e '.[dev]')")


def _run(args, *, cwd: Path = ROOT, timeout: int = 300, env=None) -> subprocess.CompletedProcess:
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, f"{' '.join(map(str, args))} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


def test_ruff_finds_nothing_to_fix_and_nothing_to_reformat():
    _tool("ruff")
    _run([sys.executable, "-m", "ruff", "check", "--no-cache", "."])
    _run([sys.executable, "-m", "ruff", "format", "--check", "--no-cache", "."])


def test_ruff_covers_the_code_but_not_the_generated_tutorial_scripts():
    _tool("ruff")
    files = _run([sys.executable, "-m", "ruff", "check", "--show-files", "--no-cache", "."]).stdout
    names = {Path(line.strip()).resolve().relative_to(ROOT).as_posix() for line in files.splitlines() if line.strip()}
    for part in ("deqlab/", "tests/", "paper_repro/", "benchmarks/", "docs/"):
        assert any(name.startswith(part) for name in names), f"ruff checks nothing under {part}"
    assert not [n for n in names if n.startswith("docs/tutorials/")], "docs/tutorials/*.py are generated"


@pytest.mark.slow
def test_mypy_finds_no_type_error_in_the_package():
    _tool("mypy")
    # the incremental cache (.mypy_cache, git-ignored) makes a second run take seconds
    out = _run([sys.executable, "-m", "mypy"], timeout=600)
    assert "Success: no issues found" in out.stdout


@pytest.mark.slow
def test_the_wheel_and_the_sdist_pass_twine_and_the_wheel_installs_and_imports_on_its_own(tmp_path):
    _tool("build")
    _tool("twine")
    src, dist = tmp_path / "src", tmp_path / "dist"
    shutil.copytree(ROOT, src, ignore=_not_sources)  # a clean tree: no stale egg-info or build/ is packed
    # --no-isolation: the venv's setuptools builds it, with no download
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)])
    import deqlab

    version = deqlab.__version__  # written in deqlab/__init__.py only; setup.cfg reads it from there
    wheel, sdist = dist / f"deqlab-{version}-py3-none-any.whl", dist / f"deqlab-{version}.tar.gz"
    assert wheel.exists() and sdist.exists(), sorted(p.name for p in dist.iterdir())
    _run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)])

    with tarfile.open(sdist) as tar:
        members = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for needed in ("setup.cfg", "pyproject.toml", "README.md", "deqlab/__init__.py"):
        assert needed in members, f"the sdist lacks {needed}"
    stray = sorted(m for m in members if m.split("/")[0] in ("tests", "data", "datasets", "runs", "lightning_logs"))
    assert not stray, f"the sdist holds files that are not the package: {stray[:10]}"
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "deqlab").rglob("*.py")}
    with zipfile.ZipFile(wheel) as zf:
        in_wheel = {name for name in zf.namelist() if name.endswith(".py")}
    assert in_wheel == sources, f"missing from the wheel: {sorted(sources - in_wheel)}"

    # A fresh venv with the wheel installed (no index, no dependencies: pip installs into it from here);
    # the dependencies (torch, ...) come from this venv's site-packages through a path file. Path files of
    # that folder are not read (this venv's deqlab-checkout.pth and editable finder point at the checkout),
    # and the import runs outside the checkout, so the deqlab that imports is the wheel's.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # outside the checkout and without PYTHONPATH: pip must not take a deqlab.egg-info it sees for an install
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    install = ["install", "-q", "--no-deps", "--no-index", "--ignore-installed", "--no-compile"]
    _run([sys.executable, "-m", "pip", "--python", str(python), *install, str(wheel)], cwd=tmp_path, env=env)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    fresh = Path(_run([str(python), "-c", purelib], cwd=tmp_path, env=env).stdout.strip())
    here = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))  # this venv's, in order
    (fresh / "_deqlab_test_dependencies.pth").write_text("".join(f"{path}\n" for path in here))
    code = (
        "import importlib.metadata, deqlab; from deqlab import DeepEquilibriumNetwork, DiscreteDEQSolver; "
        "print(deqlab.__file__); print(deqlab.__version__); print(importlib.metadata.version('deqlab'))"
    )
    out = _run([str(python), "-c", code], cwd=tmp_path, env=env).stdout.split()
    assert Path(out[0]).resolve().is_relative_to(venv.resolve()), f"deqlab imported from {out[0]}, not the wheel"
    assert out[1:] == [version, version]
    scripts = venv / ("Scripts" if os.name == "nt" else "bin")
    assert any(p.name.startswith("deqlab") for p in scripts.iterdir()), "the deqlab console script is missing"
