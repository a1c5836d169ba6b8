"""The benchmark scripts use deqlab's public API only, import no other benchmark script, and every script has
a smoke test.

Why: the breakdown tables used to wrap deqlab's private methods named by dotted strings
(``("deqlab.solvers._driver", "CountedMap.__call__", "f")``), so a rename in deqlab broke a benchmark only
when someone ran it, and ``backward.py`` imported ``solvers.py`` through ``sys.path``. The timings now come
from ``deqlab.instrument``; these checks keep it that way.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith("_"))
HELPERS = {p.stem for p in BENCH.glob("_*.py")}  # _common, _workloads: shared modules, not scripts

# "deqlab.solvers._driver", "deqlab.nn.implicit._EquilibriumGradient", ...
PRIVATE_PATH = re.compile(r"\bdeqlab(?:\.\w+)*\._\w")
# a whole string that names a deqlab module ("deqlab.nn.implicit"): only patching needs that
MODULE_NAME = re.compile(r"deqlab(?:\.\w+)+")
ATTR_FUNCS = {"getattr", "setattr", "delattr", "hasattr"}


def problems(source: str, name: str = "<source>") -> list:
    """What in ``source`` names deqlab's internals by string, or imports a benchmark script."""
    found = []
    tree = ast.parse(source)
    scripts = {p.stem for p in SCRIPTS}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if PRIVATE_PATH.search(node.value):
                found.append(f"{name}:{node.lineno}: private deqlab name in a string: {node.value!r}")
            elif MODULE_NAME.fullmatch(node.value.strip()):
                found.append(f"{name}:{node.lineno}: deqlab module named in a string: {node.value!r}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ATTR_FUNCS:
            for arg in node.args[1:2]:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and re.match(r"_[a-z]", arg.value):
                    found.append(
                        f"{name}:{node.lineno}: {node.func.id}(..., {arg.value!r}) reaches a private attribute"
                    )
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for mod in mods:
                if mod.split(".")[0] in scripts:
                    found.append(
                        f"{name}:{node.lineno}: imports the benchmark script {mod!r}; move what it "
                        f"shares to _common.py or _workloads.py"
                    )
    return found


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_no_benchmark_names_deqlab_internals_in_strings_or_imports_another_script(path):
    assert problems(path.read_text(encoding="utf-8"), path.name) == []


def test_the_check_catches_the_old_patching_and_cross_imports():
    old = """
from solvers import WORKLOADS
_REGIONS = (("deqlab.solvers._driver", "CountedMap.__call__", "f"),
            ("deqlab.nn.implicit", "Linearization.vjp_z", "adjoint VJPs"))
setattr(owner, "_eval_map", wrapped)
"""
    found = problems(old)
    assert len(found) == 4, found
    assert problems("from _workloads import WORKLOADS\nx = getattr(torch.Tensor, '__bool__')\n") == []


def test_every_benchmark_script_has_a_smoke_test():
    tests = "\n".join(p.read_text(encoding="utf-8") for p in Path(__file__).parent.glob("test_*.py"))
    missing = [p.name for p in SCRIPTS if f'"{p.name}"' not in tests]
    assert missing == []
    assert "gpu_check.sh" in tests


def test_gpu_check_runs_benchmark_flags_that_exist():
    # benchmarks/gpu_check.sh needs a GPU; here: its syntax, and that each benchmark flag it passes is one
    # the script still accepts (a renamed flag would only show on the GPU machine)
    script = BENCH / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text(encoding="utf-8").replace("\\\n", " ")
    calls = re.findall(r"python3 (benchmarks/\w+\.py)([^|;&\n]*)", text)
    assert {c[0] for c in calls} >= {
        "benchmarks/solvers.py",
        "benchmarks/train_step.py",
        "benchmarks/per_sample_exit.py",
        "benchmarks/backward.py",
    }
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for rel in sorted({c[0] for c in calls} - {"benchmarks/cifar10_generated.py"}):  # that one forwards flags
        flags = {t.split("=")[0] for c in calls if c[0] == rel for t in shlex.split(c[1]) if t.startswith("--")}
        helptext = subprocess.run(
            [sys.executable, str(ROOT / rel), "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        ).stdout
        assert [f for f in sorted(flags) if f not in helptext] == [], rel
