"""Fixtures for the Lightning tests: one intra-op thread (the models are tiny; thread hand-offs would
dominate and a shared 2-core machine makes them erratic) and quiet Lightning logs."""
import logging

import pytest
import torch


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
