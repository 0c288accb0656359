import pytest
import torch

# The test models are tiny: a second intra-op thread only waits for a core (measured 10-100x slower
# per step on a loaded 2-core machine), so the whole suite runs single-threaded.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
