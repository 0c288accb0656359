import pytest
import torch

# The test models are tiny: a second intra-op thread only waits for a core (measured 10-100x slower
# per step on a loaded 2-core machine), so the whole suite runs single-threaded.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _own_formulation_cache(tmp_path, monkeypatch):
    """Each test starts with an empty cache of timed formulation choices (the user's stays untouched);
    CLI tests in subprocesses use the user cache, as a user's runs do."""
    from zootune.layers import formulation_cache

    monkeypatch.setattr(formulation_cache, "choices_path", lambda cache_dir: tmp_path / "formulations.json")
