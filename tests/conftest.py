"""Suite-wide settings: deterministic seeds, one intra-op thread, quiet Lightning logs and a bounded
hypothesis profile.

Why here: every test folder shares them, and CI runs on 2 cores, so property tests must not wander. One
thread: the tests evaluate tiny maps thousands of times; on a shared 2-core machine torch's thread pool
then spends more time contending than computing (the same test ran 0.1 s or 15 s depending on the load).
"""

import logging
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


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _quiet_lightning():
    names = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


@pytest.fixture
def fresh_dynamo():
    """Forget every compiled solver step and dynamo's graphs before and after the test, so compilation
    counts and fallbacks are the test's own (the compiled-step tests use it)."""
    from deqlab.solvers.compiled import reset_cache

    reset_cache()
    yield
    reset_cache()
