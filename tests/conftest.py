"""Suite-wide settings: deterministic seeds and a bounded hypothesis profile.

Why here: every test folder shares them, and CI runs on 2 cores, so property tests must not wander.
"""
import os
import warnings

import pytest
import torch

try:
    from hypothesis import settings

    settings.register_profile("deqlab", deadline=None, max_examples=25, derandomize=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deqlab"))
except ImportError:  # pragma: no cover - hypothesis is in the dev extra
    pass

warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
