"""Every ``python`` code block in ``docs/**/*.md`` (tutorials and API pages included) and ``README.md`` runs.

Why: documentation examples rot silently. Blocks of one page run in order in one fresh interpreter (a
page may build on its earlier blocks); a block whose first line is ``# not-run`` is skipped (for
commands that need a GPU, a dataset or minutes of training). The tutorials (docs/tutorials/) run in their
quick mode, on the embedded digits, and assert the results their pages state (and use no deprecated deqlab
name: such a DeprecationWarning fails the page); their full mode
(``DEQLAB_TUTORIAL_FULL=1``, real MNIST) is the generated script next to each page, checked here to match it.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


#: Prepended to a tutorial: a DeprecationWarning about deqlab's own names is an error. deqlab's point at the
#: line that used the old name (the tutorial itself, ``__main__``) or, for an old name that deqlab uses
#: itself, at deqlab; other packages' deprecations (torch's, Lightning's internals) stay theirs.
NO_DEPRECATED = (
    "import warnings\n"
    'warnings.filterwarnings("error", category=DeprecationWarning, module=r"__main__$|deqlab(\\.|$)")\n\n'
)


def _blocks(page: Path):
    return [b for b in BLOCK.findall(page.read_text()) if not b.lstrip().startswith("# not-run")]


@pytest.mark.parametrize(
    "page", [p for p in PAGES if p.exists() and _blocks(p)], ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_doc_examples_run(page, tmp_path):
    code = "\n\n".join(_blocks(page))
    if page.parent == ROOT / "docs" / "tutorials":
        code = NO_DEPRECATED + code
    script = tmp_path / f"{page.stem}_examples.py"  # tutorials write their outputs under tmp_path too
    script.write_text(code)
    # this checkout's deqlab, not whichever one is installed (a git worktree next to an editable install)
    env = dict(
        os.environ,
        MPLBACKEND="Agg",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    env.pop("DEQLAB_TUTORIAL_FULL", None)  # the tutorials' quick mode, whatever the caller's environment says
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"examples of {page.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_tutorial_scripts_match_their_pages():
    """docs/tutorials/<page>.py is generated from <page>.md (the full mode's script); a page edited without
    regenerating its script fails here, so the page and the script never drift apart."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_scripts", ROOT / "docs" / "tutorials" / "make_scripts.py")
    make_scripts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_scripts)
    assert make_scripts.pages(), "no tutorial page with code blocks found"
    stale = [p.with_suffix(".py").name for p in make_scripts.stale()]
    assert not stale, f"{stale} differ from their pages: run python docs/tutorials/make_scripts.py"


def test_a_tutorial_that_uses_a_deprecated_name_fails(tmp_path):
    """The check the tutorials run under: a deprecated deqlab spelling on the page's own line (here
    ``abstol=``, now ``ode_abstol=``) ends the script with the DeprecationWarning as an error."""
    script = tmp_path / "old_name.py"
    script.write_text(
        NO_DEPRECATED + "from deqlab.solvers import ContinuousDEQSolver\nContinuousDEQSolver('tsit5', abstol=1e-3)\n"
    )
    env = dict(
        os.environ,
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "DeprecationWarning: ContinuousDEQSolver: abstol= is deprecated" in proc.stderr, (
        proc.stderr[-2000:]
    )
