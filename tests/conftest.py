import os

import pytest
import torch

# The suite runs on 2 CPU cores next to other work; fixed threads keep timings and results stable.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
