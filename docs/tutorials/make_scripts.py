"""Writes each tutorial page's code blocks as a script next to the page: ``docs/tutorials/<page>.py``.

The page is the one source: its ``python`` blocks are what tests/test_docs.py runs (the quick mode) and
what the generated script runs (quick mode by default, full mode with ``DEQLAB_TUTORIAL_FULL=1``). Edit the
page, then regenerate::

    .venv/bin/python docs/tutorials/make_scripts.py           # rewrite the scripts
    .venv/bin/python docs/tutorials/make_scripts.py --check   # exit 1 when a script differs from its page

tests/test_docs.py runs ``--check``'s comparison, so a page edited without regenerating fails the suite.

Why generated, and not the page including the script (pymdownx.snippets): the page stays plain Markdown
that reads the same on GitHub, in an editor and on the site, test_docs.py keeps running exactly the blocks
a reader sees, and the script is an ordinary file that needs no documentation tooling to read or run.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: The same block pattern as tests/test_docs.py: a block whose first line is ``# not-run`` is left out.
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
#: A ``##`` heading or a code block, in page order (headings become comments in the script).
PART = re.compile(r"^(## [^\n]+)$|```python\n(.*?)```", re.S | re.M)


def pages() -> list[Path]:
    """The tutorial pages that have runnable blocks."""
    return sorted(p for p in HERE.glob("*.md") if BLOCK.search(p.read_text()))


def script_for(page: Path) -> str:
    """The script text for ``page``: a header, then every runnable block in order, under its section."""
    title = page.read_text().splitlines()[0].lstrip("# ").strip()
    parts = [f'''"""{title}.

Generated from docs/tutorials/{page.name} by docs/tutorials/make_scripts.py: edit the page, not this file.
The page explains every step; this file is its code blocks, in order.

Quick mode (default, the embedded digits, what the test suite runs):
    .venv/bin/python docs/tutorials/{page.stem}.py
Full mode (real MNIST; /path/to/data/MNIST/raw holds the four IDX files):
    DEQLAB_TUTORIAL_FULL=1 DEQLAB_MNIST_DIR=/path/to/data .venv/bin/python docs/tutorials/{page.stem}.py
"""''']
    heading = None
    for match in PART.finditer(page.read_text()):
        if match.group(1):
            heading = match.group(1)[3:].strip()
            continue
        block = match.group(2)
        if block.lstrip().startswith("# not-run"):
            continue
        if heading:
            parts.append(f"# {'-' * 8} {heading} {'-' * max(0, 100 - len(heading) - 12)}")
            heading = None
        parts.append(block.rstrip("\n"))
    return "\n\n".join(parts) + "\n"


def stale() -> list[Path]:
    """Scripts that are missing or differ from what their page generates."""
    return [p for p in pages() if not p.with_suffix(".py").exists() or p.with_suffix(".py").read_text() != script_for(p)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report scripts that differ from their page")
    args = parser.parse_args(argv)
    out_of_date = stale()
    if args.check:
        for page in out_of_date:
            print(f"{page.with_suffix('.py').name} differs from {page.name}: run python docs/tutorials/make_scripts.py")
        return 1 if out_of_date else 0
    for page in out_of_date:
        page.with_suffix(".py").write_text(script_for(page))
        print(f"wrote {page.with_suffix('.py').relative_to(HERE.parents[1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
