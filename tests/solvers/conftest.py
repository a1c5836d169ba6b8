"""tests/solvers: run on one intra-op thread.

Why: the solver tests evaluate tiny maps thousands of times; on a shared 2-core machine torch's thread
pool then spends more time contending than computing (the same test ran 0.1 s or 15 s depending on the
load). One thread makes the folder's run time stable.
"""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
