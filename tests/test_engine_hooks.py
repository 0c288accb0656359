"""The engine's preparation hook (zootune.engine.hooks): a module's ``prepare_for_training`` is called
once before training with the example batch, its ``training_state()`` is kept in the checkpoint and
given back on resume; checkpoints written before the hook (the aggregation layers' choices under
their old key, the option under its old name) still resume exactly."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from zootune.engine import TrainConfig, Trainer
from zootune.engine.checkpoint import load_checkpoint
from zootune.errors import CheckpointError
from zootune.layers import AggregatedLayer, autotune
from zootune.tasks import ClassificationTask


class Preparing(nn.Module):
    """A linear layer that records its preparation calls and keeps a choice made on the example batch."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 3)
        self.forwards = 0
        self.calls = []
        self.choice = None

    def forward(self, x):
        self.forwards += 1
        return self.linear(x)

    def prepare_for_training(self, context):
        example = context.example_batch()
        self.calls.append({"name": context.name, "shape": tuple(example.shape), "device": example.device,
                           "saved": context.saved_state, "forwards_before": self.forwards,
                           "agreed": context.agree("rank 0's"), "main": context.is_main})
        self.choice = (context.saved_state or {}).get("choice", f"chosen on {len(example)} samples")

    def training_state(self):
        return {"choice": self.choice}


def data(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g))


def quiet(**kw) -> TrainConfig:
    # threads=1: the thread rule would measure a forward pass before training
    return TrainConfig(**{"batch_size": 8, "progress": False, "device": "cpu", "threads": 1, **kw})


def test_a_module_prepares_once_before_training_and_gets_its_state_back_on_resume(tmp_path):
    model = nn.Sequential(nn.Identity(), Preparing())
    Trainer(model, ClassificationTask(3), data(), data(9, 1), quiet(epochs=3, stop_after=1), out_dir=tmp_path).fit()
    preparing = model[1]
    assert preparing.calls == [{"name": "1", "shape": (8, 5), "device": torch.device("cpu"), "saved": None,
                                "forwards_before": 0, "agreed": "rank 0's", "main": True}]
    assert preparing.forwards > 0
    assert load_checkpoint(tmp_path / "checkpoint.pt")["training_states"] == {"1": {"choice": "chosen on 8 samples"}}

    resumed = nn.Sequential(nn.Identity(), Preparing())
    Trainer(resumed, ClassificationTask(3), data(), data(9, 1), quiet(epochs=3), out_dir=tmp_path, resume=True).fit()
    assert [call["saved"] for call in resumed[1].calls] == [{"choice": "chosen on 8 samples"}]
    assert resumed[1].choice == "chosen on 8 samples"
    # a given example batch is what the module sees
    other = Preparing()
    Trainer(other, ClassificationTask(3), data(), None, quiet(epochs=1), example_input=torch.randn(4, 5)).fit()
    assert [call["shape"] for call in other.calls] == [(4, 5)]


def test_states_that_do_not_fit_the_model_are_checkpoint_errors(tmp_path):
    Trainer(Preparing(), ClassificationTask(3), data(), None, quiet(epochs=2, stop_after=1), out_dir=tmp_path).fit()
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    checkpoint["training_states"]["gone"] = {}
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="modules this model does not have: gone"):
        Trainer(Preparing(), ClassificationTask(3), data(), None, quiet(epochs=2), out_dir=tmp_path, resume=True).fit()

    class Refusing(Preparing):
        def prepare_for_training(self, context):
            if context.saved_state is not None:
                raise ValueError("not my state")

    del checkpoint["training_states"]["gone"]
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="checkpoint.pt: not my state"):
        Trainer(Refusing(), ClassificationTask(3), data(), None, quiet(epochs=2), out_dir=tmp_path, resume=True).fit()


def test_the_channels_last_rule_counts_a_module_that_says_it_convolves_in_2d():
    from zootune.engine.trainer import _has_conv2d

    assert _has_conv2d(nn.Sequential(nn.Conv2d(3, 4, 3)))
    assert not _has_conv2d(nn.Sequential(nn.Conv1d(3, 4, 3)))
    assert _has_conv2d(nn.Sequential(AggregatedLayer([nn.Conv2d(3, 4, 3) for _ in range(2)])))
    assert not _has_conv2d(nn.Sequential(AggregatedLayer([nn.Conv1d(3, 4, 3) for _ in range(2)])))
    assert not _has_conv2d(nn.Sequential(AggregatedLayer([nn.Linear(3, 4) for _ in range(2)])))


# ------------------------------------------------------------------ checkpoints of older zootune


def test_the_old_option_name_is_read():
    assert TrainConfig.from_dict({"formulations": "macs"}) == TrainConfig(exact_choices="macs")
    assert TrainConfig.from_json('{"formulations": "time"}').exact_choices == "time"


def agg_net(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(AggregatedLayer([nn.Linear(5, 8) for _ in range(3)]), nn.Tanh(),
                         AggregatedLayer([nn.Linear(8, 3) for _ in range(3)]))


def _last_survivor(monkeypatch):
    """``measure`` that picks the last candidate it may time (not the multiply-add rule's pick, so a
    restored choice shows in the numbers); ``calls`` counts what was timed."""
    calls = []

    def measure(candidates, macs, device="cpu", repeats=autotune.MEASURE_REPEATS):
        survivors = [n for n in candidates if macs[n] <= autotune.PRUNE_FACTOR * min(macs[c] for c in candidates)]
        calls.append(survivors)
        return autotune.LayerChoice(survivors[-1], {}, dict(macs))

    monkeypatch.setattr(autotune, "measure", measure)
    return calls


def test_a_checkpoint_written_before_the_hook_resumes_exactly(tmp_path, monkeypatch, caplog):
    calls = _last_survivor(monkeypatch)
    train, config = data(40), quiet(epochs=3, exact_choices="time", lr=0.1)
    whole = Trainer(agg_net(), ClassificationTask(3), train, None, config).fit().model.state_dict()
    chosen = autotune.formulation_choices(Trainer(agg_net(), ClassificationTask(3), train, None,
                                                  quiet(epochs=3, stop_after=1, exact_choices="time", lr=0.1),
                                                  out_dir=tmp_path).fit().model)
    fewest_macs = {name: {"train": per_phase["train"].chosen}
                   for name, per_phase in autotune.tune(agg_net(), train[:8][0], mode="macs").items()}
    assert calls and chosen != fewest_macs  # what the multiply-add rule would take instead
    # as an older zootune wrote it: non-empty choices under "formulations", the option under its old name
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    states = checkpoint.pop("training_states")
    checkpoint["formulations"] = {name: state for name, state in states.items() if state}
    checkpoint["config"]["formulations"] = checkpoint["config"].pop("exact_choices")
    torch.save(checkpoint, tmp_path / "checkpoint.pt")

    calls.clear()
    net = agg_net()
    with caplog.at_level(logging.WARNING, logger="zootune"):
        resumed = Trainer(net, ClassificationTask(3), train, None, config, out_dir=tmp_path, resume=True).fit()
    assert calls == [] and autotune.formulation_choices(net) == chosen  # read back, not timed again
    assert not [r for r in caplog.records if "changed" in r.getMessage()]  # the renamed option is the same
    assert all(torch.equal(whole[k], v) for k, v in resumed.model.state_dict().items())
