"""DDP on CPU (2 processes, gloo): DEQ gradients all-reduce correctly, no unused-parameter errors.

``strategy="ddp"`` re-launches the running command as rank 1, so the training runs in a separate
script (lightning_ddp_script.py), never inside pytest itself.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_testkit import REPO

SCRIPT = Path(__file__).with_name("lightning_ddp_script.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(mode: str, out: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in {
            "MASTER_ADDR",
            "MASTER_PORT",
            "LOCAL_RANK",
            "WORLD_SIZE",
            "RANK",
            "NODE_RANK",
            "LOCAL_WORLD_SIZE",
            "GROUP_RANK",
            "TORCHELASTIC_RUN_ID",
        }
    }
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), mode, str(out)], cwd=out, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{mode} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _single_and_ddp(variant: str, out: Path):
    """Run the ``single<variant>`` and ``ddp<variant>`` modes; return the single run's and both ranks' records."""
    _run(f"single{variant}", out)
    _run(f"ddp{variant}", out)
    return torch.load(out / f"single{variant}_rank0.pt"), [torch.load(out / f"ddp{variant}_rank{r}.pt") for r in (0, 1)]


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_the_single_process_run(tmp_path):
    single, ranks = _single_and_ddp("", tmp_path)
    assert single["global_step"] == ranks[0]["global_step"] == ranks[1]["global_step"] == 8
    for name, ref in single["state"].items():
        a, b = ranks[0]["state"][name], ranks[1]["state"][name]
        assert torch.equal(a, b), f"ranks disagree on {name}"
        assert torch.allclose(a, ref, rtol=0, atol=1e-6), (
            f"{name}: DDP differs from single process by {(a - ref).abs().max()}"
        )
    # the shortcut (trained only through the skip loss) received gradients under DDP too
    # (its parameters are deq.init.module.* since issue 7's ShortcutGuess, deq.shortcut.* before)
    assert any("shortcut" in n or "init.module" in n for n in single["state"])
    # validation metrics were reduced across ranks (sync_dist): equal on both ranks
    assert ranks[0]["val_loss"] == pytest.approx(ranks[1]["val_loss"], rel=1e-9)
    assert ranks[0]["val_loss"] == pytest.approx(single["val_loss"], rel=1e-6)
    assert list((tmp_path / "tb_ddp").rglob("events.out.tfevents*")), "rank 0 wrote no TensorBoard events"


@pytest.mark.slow
def test_ddp_ranks_agree_to_skip_a_batch_that_is_non_finite_on_one_rank_only(tmp_path):
    single, ranks = _single_and_ddp("_nan", tmp_path)
    assert single["skipped"] == ranks[0]["skipped"] == ranks[1]["skipped"] == 2  # batch 1 of both epochs
    for name, ref in single["state"].items():
        a, b = ranks[0]["state"][name], ranks[1]["state"][name]
        assert torch.isfinite(a).all() and torch.equal(a, b), f"ranks disagree on {name}"
        assert torch.allclose(a, ref, rtol=0, atol=1e-6), f"{name}: DDP differs from single process"


@pytest.mark.slow
def test_ddp_with_accumulation_drops_the_window_of_a_micro_batch_non_finite_on_one_rank_only(tmp_path):
    # batch 0 of each epoch does not step (accumulate_grad_batches=2) and is non-finite on rank 1 only
    single, ranks = _single_and_ddp("_nanaccum", tmp_path)
    assert single["skipped"] == ranks[0]["skipped"] == ranks[1]["skipped"] == 2  # batch 0 of both epochs
    assert single["global_step"] == ranks[0]["global_step"] == ranks[1]["global_step"] == 4
    for name, ref in single["state"].items():
        a, b = ranks[0]["state"][name], ranks[1]["state"][name]
        assert torch.isfinite(a).all() and torch.equal(a, b), f"ranks disagree on {name}"
        assert torch.allclose(a, ref, rtol=0, atol=1e-6), f"{name}: DDP differs from single process"
