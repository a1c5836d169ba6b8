"""The shape of the package, checked: imports point down the layers, never up, and there is no cycle;
a model type is read in one module; old names live in one compatibility module.

The layers (docs/architecture.md): ``_compat``, ``state`` → ``solvers``, ``spec`` → ``nn`` → ``models``,
``data`` → ``lightning`` (it resumes deqlab's loaders exactly, so it knows them) → ``zoo`` → ``cli``, ``demo``
→ the package root. Imports inside functions count as
well: a lazy upward import is still an upward dependency.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "deqlab"

LAYER = {
    "_compat": 0,
    "state": 0,
    "instrument": 0,
    "solvers": 1,
    "spec": 1,
    "nn": 2,
    "models": 3,
    "compat": 3,
    "data": 3,
    "lightning": 4,
    "zoo": 5,
    "cli": 6,
    "demo": 6,
    "": 7,
}


def _modules() -> Dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(modules: Dict[str, Path]) -> Dict[str, Set[str]]:
    """Module -> the deqlab modules it imports (anywhere in its code), resolved to existing modules."""
    edges: Dict[str, Set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets = subs + ([base] if len(subs) < len(node.names) else [])
            for t in targets:
                while t and t not in modules:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != name and t.startswith("deqlab"):
                    edges[name].add(t)
    return edges


def _layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_subpackage_has_a_layer():
    tops = {_layer_of(m) for m in _modules()}
    assert tops <= set(LAYER), f"give these a layer in LAYER and docs/architecture.md: {sorted(tops - set(LAYER))}"


def test_imports_point_down_the_layers():
    bad = []
    for src, targets in _imports(_modules()).items():
        for dst in targets:
            a, b = _layer_of(src), _layer_of(dst)
            if a != b and LAYER[a] <= LAYER[b]:
                bad.append(f"{src} -> {dst} ({a}: layer {LAYER[a]}, {b}: layer {LAYER[b]})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    edges = _imports(_modules())
    state: Dict[str, int] = {}
    cycles: List[List[str]] = []

    def visit(node: str, stack: List[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for module in sorted(_modules()):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_a_model_type_is_compared_in_one_module():
    # every other module asks a deqlab.spec.ModelKind what the type is
    names = r"""["'](vanilla|skip|skip_reg|neural_ode)["']"""
    pattern = re.compile(rf"(==|!=)\s*{names}|{names}\s*(==|!=)|\bmodel_type\s*(==|!=|not in\b)|if .*\bmodel_type in\b")
    hits = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "paper_repro").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code) and not code.lstrip().startswith((">>>", "``")):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "compare a ModelKind's attributes instead:\n" + "\n".join(hits)


def test_old_names_warn_from_the_compatibility_module_only():
    # ``DeprecationWarning`` is raised in deqlab/_compat.py and nowhere else
    offenders = [
        str(p.relative_to(ROOT))
        for p in PACKAGE.rglob("*.py")
        if p.name != "_compat.py"
        and "DeprecationWarning" in p.read_text()
        and re.search(r"warnings\.warn\([^)]*DeprecationWarning", p.read_text(), re.S)
    ]
    assert not offenders, f"warn through deqlab._compat instead: {offenders}"


@pytest.mark.parametrize("module", ["deqlab.solvers", "deqlab.nn", "deqlab.models", "deqlab.spec"])
def test_the_lower_layers_do_not_import_lightning(module):
    import subprocess
    import sys

    code = f"import sys, {module}; print(any(m.startswith(('pytorch_lightning', 'lightning')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
