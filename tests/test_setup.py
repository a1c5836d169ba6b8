"""Setting up and starting: what a new user meets before any model runs (issue 17)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_clone_named_deqlab_in_the_working_directory_does_not_shadow_the_package(tmp_path):
    # the folder above a clone named "deqlab": without the checkout's path entry (make's deqlab-checkout.pth),
    # `import deqlab` found the clone as an empty namespace package ("... from 'deqlab' (unknown location)")
    (tmp_path / "deqlab").symlink_to(ROOT, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "from deqlab import DeepEquilibriumNetwork; import deqlab; print(deqlab.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-500:]
    assert Path(out.stdout.strip()).resolve() == (ROOT / "deqlab" / "__init__.py").resolve()
    text = (ROOT / "Makefile").read_text()
    assert text.count("$(CHECKOUT_PTH)") == 2  # both set-ups (demo and test) write the path entry


def test_make_demo_installs_only_what_the_demo_needs_and_says_it_is_installing():
    text = (ROOT / "Makefile").read_text()
    demo = re.search(r"^demo: (.*)$", text, re.M).group(1)
    assert "CORE_STAMP" in demo and "STAMP)" not in demo.replace("CORE_STAMP", "")
    core = text[text.index("$(CORE_STAMP):") : text.index("demo:")]
    assert "-e ." in core and "[dev]" not in core and "EXTRAS" not in core  # no dev or docs extras
    assert "setting up" in core  # progress, not ~95 s of silence
    assert "pipefail" in text  # a failing pip is not hidden by the output filter


def test_the_demos_tensorboard_command_runs_as_printed():
    from deqlab.demo import tensorboard_command

    command = tensorboard_command("runs/demo").split()
    assert command[1:] == ["--logdir", "runs/demo"]
    exe = Path(command[0]) if os.path.isabs(command[0]) else ROOT / command[0]
    assert command[0] == "tensorboard" or exe.exists() or (Path.cwd() / command[0]).exists()
    out = subprocess.run(
        [
            command[0]
            if command[0] == "tensorboard"
            else str(Path.cwd() / command[0])
            if not os.path.isabs(command[0])
            else command[0],
            "--version",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.strip()
