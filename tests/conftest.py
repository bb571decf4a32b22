
import pytest
import torch

# One intra-op thread: on a busy 2-core machine more threads make tiny ops
# ~100x slower, and results stay repeatable. Tests that need several threads
# (and the subprocesses the tool tests start) set their own.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
