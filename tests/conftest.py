import os

import pytest
import torch

# Two cores: keep torch from oversubscribing when pytest runs things in
# parallel processes, and make CPU results repeatable.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
