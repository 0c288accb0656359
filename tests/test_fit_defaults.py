"""What `zootune fit` chooses when the user gives no tuning flags: input size and augmentation from
the folder (zootune.data.auto), the step budget (engine.config.budget_epochs), the learning rate by
a probe (methods.lr_probe) -- each stated, recorded and reused on --resume."""

from __future__ import annotations

import json
import dataclasses
import math

import numpy as np
import pytest
import torch

from zootune.data.auto import auto_augment, auto_image_size
from zootune.engine.config import budget_epochs
from zootune.methods import lr_probe


@pytest.mark.parametrize("sides,zoo,want", [
    ([(32, 32)] * 5, None, 32),
    ([(28, 28)] * 5, None, 32),  # never below 32
    ([(64, 80), (70, 64), (64, 64)], None, 64),  # the shorter side
    ([(100, 100), (101, 140), (99, 99)], None, 96),  # rounded down to a multiple of 8
    ([(640, 480)] * 3, None, 224),  # at most 224
    ([(32, 32)] * 3, 224, 224),  # the zoo's own input size wins
])
def test_auto_image_size_follows_its_rule(sides, zoo, want):
    size, why = auto_image_size(np.array(sides), zoo)
    assert size == want and why


@pytest.mark.parametrize("size,want", [(32, "light"), (63, "light"), (64, "light"), (95, "light"), (96, "paper"),
                                       (224, "paper")])
def test_auto_augment_follows_the_input_size(size, want):
    assert auto_augment(size)[0] == want


@pytest.mark.parametrize("n,batch", [(960, 48), (100, 48), (48_000, 48), (10, 64), (5_000_000, 64)])
def test_the_budget_is_at_least_10_epochs_and_1000_steps_and_at_most_300_epochs(n, batch):
    epochs, why = budget_epochs(n, batch)
    steps = math.ceil(n / batch)
    assert epochs == min(300, max(10, math.ceil(1000 / steps)))
    assert str(epochs) in why and "--epochs" in why


def _fake_probe(monkeypatch, outcomes: dict):
    """lr_probe's training replaced: {lr: validation metric, or "rollback" (the guard rolled back
    once), or "stop" (the guard's rollbacks ran out)}; returns the (lr, epochs) probed, in order."""
    from types import SimpleNamespace

    from zootune.errors import NonFiniteLossError

    seen = []

    def probe(member, task, train, val, config, epochs):
        seen.append((config.lr, epochs))
        outcome = outcomes[config.lr]
        if outcome == "stop":
            raise NonFiniteLossError("non-finite loss")
        rollbacks = [{"epoch": 1}] if outcome == "rollback" else []
        return SimpleNamespace(best_val_metric=1.0 if rollbacks else outcome, rollbacks=rollbacks)

    monkeypatch.setattr(lr_probe, "probe_run", probe)
    return seen


def _choose(optimizer: str = "sgd"):
    from zootune.data.datasets import DatasetSplits
    from zootune.engine import TrainConfig
    from zootune.tasks import ClassificationTask

    splits = DatasetSplits(train=[], val=[], test=None, num_classes=2, name="none")
    return lr_probe.choose_learning_rate([torch.nn.Identity()] * 2, ClassificationTask(2), splits,
                                         TrainConfig(optimizer=optimizer), member=1)


def test_the_lr_probe_keeps_the_largest_rate_that_trains_whatever_the_smaller_rates_measure(monkeypatch):
    # polygons' 2-epoch probe preferred 0.03 on validation; the full fine-tune at 0.1 was 3 points better
    seen = _fake_probe(monkeypatch, {0.1: 27.7, 0.03: 38.0, 0.01: 36.0})
    choice = _choose()
    assert choice.lr == 0.1 and choice.member == 1 and seen == [(0.1, 2)]  # one probe when it trains
    assert choice.to_dict()["val_acc"] == {"0.1": 27.7} and choice.diverged == []


def test_the_lr_probe_refuses_rates_that_diverge_and_falls_back_to_the_smallest(monkeypatch):
    seen = _fake_probe(monkeypatch, {0.1: "stop", 0.03: "rollback", 0.01: 20.0})
    choice = _choose()
    assert choice.lr == 0.01 and [lr for lr, _ in seen] == [0.1, 0.03, 0.01]
    assert choice.diverged == [0.1, 0.03] and choice.to_dict()["diverged"] == ["0.1", "0.03"]
    assert "0.1: diverged / 0.03: diverged / 0.01: val acc 20.00" in choice.summary()
    _fake_probe(monkeypatch, {1e-3: "stop", 3e-4: "stop", 1e-4: "stop"})
    choice = _choose("adam")
    assert choice.lr == 1e-4 and choice.diverged == [1e-3, 3e-4, 1e-4]  # nothing trains: the smallest


def test_the_lr_probe_detects_divergence_in_a_real_training():
    """probe_run's rollbacks are what the rule reads: a rate that blows a model up rolls back."""
    from zootune.engine import TrainConfig
    from zootune.methods.finetune import probe_run
    from zootune.tasks import ClassificationTask

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g) * 10
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    config = TrainConfig(batch_size=16, device="cpu", momentum=0.0, weight_decay=0.0)
    calm = probe_run(model, ClassificationTask(2), data, data, dataclasses.replace(config, lr=1e-3), 2)
    wild = probe_run(model, ClassificationTask(2), data, data, dataclasses.replace(config, lr=1e3), 2)
    assert calm.rollbacks == [] and wild.rollbacks != []


def _tiny_fit_workspace(tmp_path):
    """A 2-class folder of 40 x 48 images and two resnet_small members; the `fit` argv for finetune."""
    from zootune.models import resnet_small
    from zootune.zoo.checkpoint import save_state_dict

    pytest.importorskip("PIL")
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for k in range(2):
        (tmp_path / "data" / f"c{k}").mkdir(parents=True)
        for i in range(10):
            pixels = (torch.rand(40, 48, 3, generator=g) * 150 + 80 * k).clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(tmp_path / "data" / f"c{k}" / f"{i}.png")
    for i in range(2):
        torch.manual_seed(i)
        save_state_dict(tmp_path / f"m{i}.safetensors", resnet_small(num_classes=3, depth=10, width=4).state_dict())
    return ["fit", "--arch", "resnet_small", "--arch-option", "depth=10", "--arch-option", "width=4", "--zoo",
            tmp_path / "m0.safetensors", tmp_path / "m1.safetensors", "--data", tmp_path / "data",
            "--method", "finetune", "--max-steps-per-epoch", "1", "--no-progress", "--out", tmp_path / "run"]


def _fit_printing(argv) -> str:
    import contextlib
    import io

    from zootune.cli import main as cli

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main([str(a) for a in argv]) == 0
    return printed.getvalue()


def test_fit_with_no_tuning_flags_says_and_records_what_it_chose(tmp_path):
    text = _fit_printing(_tiny_fit_workspace(tmp_path))
    out = tmp_path / "run"
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    chosen = metrics["chosen"]
    # 40 x 48 images: median shorter side 40 -> 40 px, below 96 -> light augmentation; 16 training
    # images at batch 48 -> 1 step per epoch -> 300 epochs (the cap); the largest rate that trains
    assert chosen["image_size"] == 40 and chosen["augment"] == "light" and chosen["epochs"] == 300
    assert chosen["lr"] == 0.1 and list(chosen["lr_probe"]["val_acc"]) == ["0.1"]
    assert "--image-size auto: 40" in text and "--augment auto: light" in text and "--epochs auto: 300 epochs" in text
    assert f"--lr auto: lr {chosen['lr']:g}, the largest rate" in text
    # the warm-up: the first 5% of the run (300 epochs of 1 step: 15 epochs), said and recorded
    assert chosen["warmup_epochs"] == pytest.approx(15.0) and "--warmup-epochs auto: 15 epochs = 15 steps" in text
    assert json.loads((out / "model" / "config.json").read_text())["image_size"] == 40
    assert json.loads((out / "choices.json").read_text())["lr"] == chosen["lr"]  # what --resume reuses
    # no --member: the member LogME ranks first is the one probed and trained
    assert chosen["member"] == chosen["lr_probe"]["member"] and f"--member: {chosen['member']}," in text


def test_without_member_fit_trains_the_member_logme_ranks_first_and_resume_keeps_it(tmp_path, monkeypatch):
    from zootune.methods import logme

    argv = _tiny_fit_workspace(tmp_path)
    ranked = []
    monkeypatch.setattr(logme, "best_member", lambda zoo, data: ranked.append(1) or 1)
    _fit_printing(argv)
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    chosen = json.loads((tmp_path / "run" / "model" / "metrics.json").read_text())["chosen"]
    assert config["member"] == 1 and chosen["member"] == 1 and chosen["lr_probe"]["member"] == 1
    monkeypatch.setattr(logme, "best_member", lambda zoo, data: 0)  # --resume reads the choice back
    _fit_printing(argv + ["--resume"])
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["member"] == 1 and ranked == [1]


def test_a_probe_compresses_the_runs_warmup_with_its_schedule():
    """The probe's epochs are the run's schedule compressed, warm-up included. 2 probe epochs of 4
    steps for a 50-epoch run: a warm-up over half the run (25 epochs) is the probe's first epoch (its
    4th step at the full rate); over the whole run (50), both probe epochs (the 4th step at 4/8 of it).
    Not compressed, both would take every probe step (4/8)."""
    from zootune.engine import TrainConfig
    from zootune.methods.finetune import probe_run
    from zootune.tasks import ClassificationTask

    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    config = TrainConfig(batch_size=16, device="cpu", lr=0.1, epochs=50, schedule="constant", progress=False)

    def lr_after_first_epoch(warmup_epochs):
        run = probe_run(model, ClassificationTask(2), data, data, dataclasses.replace(config, warmup_epochs=warmup_epochs), 2)
        return run.history[0]["lr"]

    assert lr_after_first_epoch(25.0) == pytest.approx(0.1) and lr_after_first_epoch(50.0) == pytest.approx(0.05)
    assert lr_after_first_epoch(0.0) == pytest.approx(0.1)


def test_a_corrupt_choices_file_is_chosen_again_with_a_warning(tmp_path):
    from zootune.cli.main import _saved_choices

    path = tmp_path / "choices.json"
    assert _saved_choices(path) == {}
    path.write_text('{"lr": 0.03, "epochs": 12}')
    assert _saved_choices(path) == {"lr": 0.03, "epochs": 12}
    for text in ("{not json", "[1, 2]", '{"lr": "fast"}'):
        path.write_text(text)
        with pytest.warns(UserWarning, match="unreadable"):
            assert _saved_choices(path) == {}
