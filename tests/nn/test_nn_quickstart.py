"""Runs docs/quickstart_example.py (the README quickstart), on CPU and, when present, on CUDA."""

import runpy
from pathlib import Path

import pytest
import torch

QUICKSTART = Path(__file__).resolve().parents[2] / "docs" / "quickstart_example.py"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_quickstart_runs_and_gives_gradients(device, capsys):
    main = runpy.run_path(str(QUICKSTART))["main"]
    out = main(device)
    assert out["z_star"].shape == (1, 2) and out["z_star"].device.type == device
    assert out["solution"].nfe > 0
    assert set(out["grads"]) == {"stem.weight", "stem.bias", "deq.model.on_z.weight", "deq.model.on_x.weight"}
    for name, g in out["grads"].items():
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    assert "nfe" in capsys.readouterr().out
