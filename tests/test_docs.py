"""Every ``python`` code block in ``docs/**/*.md`` (tutorials and API pages included) and ``README.md`` runs.

Why: documentation examples rot silently. Blocks of one page run in order in one fresh interpreter (a
page may build on its earlier blocks); a block whose first line is ``# not-run`` is skipped (for
commands that need a GPU, a dataset or minutes of training).
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


def _blocks(page: Path):
    return [b for b in BLOCK.findall(page.read_text()) if not b.lstrip().startswith("# not-run")]


@pytest.mark.parametrize(
    "page", [p for p in PAGES if p.exists() and _blocks(p)], ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_doc_examples_run(page, tmp_path):
    code = "\n\n".join(_blocks(page))
    script = tmp_path / f"{page.stem}_examples.py"  # tutorials write their outputs under tmp_path too
    script.write_text(code)
    # this checkout's deqlab, not whichever one is installed (a git worktree next to an editable install)
    env = dict(
        os.environ,
        MPLBACKEND="Agg",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"examples of {page.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
