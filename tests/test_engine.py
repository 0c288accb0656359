"""The training engine: exact resume, non-finite stops, label checks, method hooks, model selection,
atomic checkpoints, evaluation, schedules and the global-batch sampler, on tiny models."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from zootune.engine import FitResult, TrainConfig, Trainer, evaluate, predict
from zootune.engine.checkpoint import atomic_torch_save, load_checkpoint
from zootune.engine.optim import LRSchedule
from zootune.engine.sampler import GlobalBatchSampler, rank_loss_weight
from zootune.errors import CheckpointError, DataError, NonFiniteLossError, ZootuneError
from zootune.tasks import ClassificationTask


def blobs(n: int, dim: int = 6, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    return TensorDataset(x, y)


class NoisyDataset(Dataset):
    """Random augmentation from the *global* torch, Python and NumPy generators in __getitem__."""

    def __init__(self, base: TensorDataset):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        scale = 1.0 + 0.1 * float(np.random.randn())
        sign = -1.0 if random.random() < 0.1 else 1.0
        return sign * scale * x + 0.3 * torch.randn_like(x), int(y)


def mlp(dim: int = 6, classes: int = 3, seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, classes))


def quiet(**kw) -> TrainConfig:
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")  # exactness is promised on CPU; these references are computed there
    return TrainConfig(**kw)


def strip_timing(history):
    return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")} for row in history]


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


class Interrupt(Exception):
    pass


class KillAfter:
    """Simulates the process being killed right after epoch ``k``'s checkpoint was written."""

    def __init__(self, k: int):
        self.k = k

    def on_epoch_end(self, trainer, record):
        if trainer.epoch == self.k:
            raise Interrupt


def scramble_global_rngs():
    torch.manual_seed(12345)
    random.seed(12345)
    np.random.seed(12345)


# ------------------------------------------------------------------ resume


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_after_kill_equals_uninterrupted_run(tmp_path, optimizer):
    train, val = NoisyDataset(blobs(60, seed=1)), blobs(30, seed=2)
    cfg = quiet(epochs=4, batch_size=16, lr=0.05, optimizer=optimizer, schedule="cosine", warmup_epochs=1)
    task = ClassificationTask(3)

    straight = Trainer(mlp(dropout=0.2), task, train, val, cfg, out_dir=tmp_path / "a").fit()

    with pytest.raises(Interrupt):
        Trainer(mlp(dropout=0.2), task, train, val, cfg, out_dir=tmp_path / "b", callbacks=[KillAfter(2)]).fit()
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 2
    scramble_global_rngs()  # a new process starts with other RNG states; the checkpoint must restore them
    resumed = Trainer(mlp(seed=99, dropout=0.2), task, train, val, cfg, out_dir=tmp_path / "b", resume=True).fit()

    assert_same_state(straight.model, resumed.model)
    last_a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    last_b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    for k, v in last_a["model"].items():  # the last epoch's weights too, not only the selected ones
        assert torch.equal(last_b["model"][k], v), k
    assert resumed.final_metrics == straight.final_metrics
    assert strip_timing(resumed.history) == strip_timing(straight.history)
    assert resumed.best_epoch == straight.best_epoch
    # The metric files hold each epoch once, also after the kill and the resume.
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    csv_rows = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert csv_rows[0].split(",")[:2] == ["epoch", "lr"] and len(csv_rows) == 5


def test_resume_without_rng_restore_would_differ(tmp_path):
    """Guards the test above: the augmentation really draws from the global RNGs, so skipping their
    restoration changes the result (otherwise equality would prove nothing)."""
    train, val = NoisyDataset(blobs(60, seed=1)), None  # no selection: the last epoch is returned
    cfg = quiet(epochs=3, batch_size=16, lr=0.05)
    task = ClassificationTask(3)
    straight = Trainer(mlp(), task, train, val, cfg).fit()
    with pytest.raises(Interrupt):
        Trainer(mlp(), task, train, val, cfg, out_dir=tmp_path, callbacks=[KillAfter(1)]).fit()
    ckpt_path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["rng"] = [dict(ckpt["rng"][0], torch=torch.manual_seed(7).get_state())]
    torch.save(ckpt, ckpt_path)
    resumed = Trainer(mlp(), task, train, val, cfg, out_dir=tmp_path, resume=True).fit()
    assert not torch.equal(resumed.model[0].weight, straight.model[0].weight)


def test_run_k_epochs_then_extend_to_n_equals_n_epochs(tmp_path):
    # With a constant schedule the first k epochs do not depend on the total, so extending works.
    train, val = NoisyDataset(blobs(50, seed=3)), blobs(20, seed=4)
    task = ClassificationTask(3)
    straight = Trainer(mlp(), task, train, val, quiet(epochs=4, batch_size=12, lr=0.05, schedule="constant")).fit()
    first = quiet(epochs=2, batch_size=12, lr=0.05, schedule="constant")
    Trainer(mlp(), task, train, val, first, out_dir=tmp_path).fit()
    scramble_global_rngs()
    resumed = Trainer(
        mlp(), task, train, val, dataclasses.replace(first, epochs=4), out_dir=tmp_path, resume=True
    ).fit()
    assert_same_state(straight.model, resumed.model)
    assert resumed.final_metrics == straight.final_metrics


def test_resume_from_corrupt_checkpoint_is_a_checkpoint_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        Trainer(mlp(), ClassificationTask(3), blobs(20), None, quiet(epochs=1), out_dir=tmp_path, resume=True).fit()


def test_resume_into_another_architecture_is_a_checkpoint_error(tmp_path):
    Trainer(mlp(), ClassificationTask(3), blobs(20), None, quiet(epochs=1, batch_size=8), out_dir=tmp_path).fit()
    other = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        Trainer(
            other, ClassificationTask(3), blobs(20), None, quiet(epochs=2, batch_size=8), out_dir=tmp_path, resume=True
        ).fit()


# ------------------------------------------------------------------ non-finite loss


class BlowsUp(nn.Module):
    """An MLP whose auxiliary loss turns NaN once training is past ``at`` (a fraction of all steps)."""

    def __init__(self, at: float):
        super().__init__()
        self.net = mlp()
        self.at = at
        self.fraction = 0.0

    def forward(self, x):
        return self.net(x)

    def set_training_progress(self, fraction):
        self.fraction = fraction

    def auxiliary_loss(self, outputs, targets):
        return outputs.new_tensor(float("nan") if self.fraction >= self.at else 0.0)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model = BlowsUp(at=0.5)  # 4 epochs x 4 steps: NaN at step 8, the first step of epoch 3
    saved = {}

    class Snapshot:
        def on_epoch_end(self, trainer, record):
            saved["bytes"] = (tmp_path / "checkpoint.pt").read_bytes()
            saved["state"] = copy.deepcopy(trainer.module.state_dict())

    trainer = Trainer(
        model, ClassificationTask(3), blobs(64), blobs(16, seed=5), quiet(epochs=4, batch_size=16, lr=0.05),
        out_dir=tmp_path, callbacks=[Snapshot()],
    )
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit()
    message = str(err.value)
    assert "epoch 3" in message and "step 1" in message and "lower learning rate" in message
    assert "after epoch 2" in message
    # The file on disk is byte-for-byte the one written after epoch 2, and it loads.
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved["bytes"]
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 8
    for k, v in saved["state"].items():
        assert torch.equal(ckpt["model"][k], v)
    # The NaN step was never applied to the weights in memory either.
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_nan_before_any_checkpoint_says_so():
    with pytest.raises(NonFiniteLossError, match="no checkpoint had been written yet") as caught:
        Trainer(BlowsUp(at=0.0), ClassificationTask(3), blobs(32), None, quiet(epochs=1, batch_size=8)).fit()
    assert caught.value.checkpoint is None and "kept" not in caught.value.cause


# ------------------------------------------------------------------ data checks


def test_out_of_range_label_is_a_clear_data_error():
    ds = blobs(40, classes=3)
    ds.tensors[1][25] = 3  # a 4th class in a 3-class task
    with pytest.raises(DataError, match=r"label out of range.*\[0, 3\].*3 classes"):
        Trainer(mlp(), ClassificationTask(3), ds, None, quiet(epochs=1, batch_size=8)).fit()


def test_out_of_range_label_in_validation_is_a_data_error():
    val = blobs(20)
    val.tensors[1][3] = -1
    with pytest.raises(DataError, match="label out of range"):
        Trainer(mlp(), ClassificationTask(3), blobs(20), val, quiet(epochs=1, batch_size=8)).fit()


def test_empty_dataset_is_a_data_error():
    empty = TensorDataset(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="empty"):
        Trainer(mlp(), ClassificationTask(3), empty, None, quiet(epochs=1)).fit()


# ------------------------------------------------------------------ method hooks


class Recorder(nn.Module):
    """Records every hook call; ``aux`` is a function of the module for the auxiliary loss."""

    def __init__(self, aux=None):
        super().__init__()
        self.net = mlp()
        self.aux = aux
        self.fractions: list[float] = []
        self.after_steps = 0

    def forward(self, x):
        return self.net(x)

    def set_training_progress(self, fraction):
        self.fractions.append(fraction)

    def after_optimizer_step(self):
        self.after_steps += 1

    def auxiliary_loss(self, outputs, targets):
        return self.aux(self) if self.aux is not None else outputs.new_zeros(())


def test_progress_and_after_step_hooks_are_called_every_step():
    model = Recorder()
    # 50 samples in batches of 16: 4 steps per epoch (the last one has 2 samples), 3 epochs.
    Trainer(model, ClassificationTask(3), blobs(50), None, quiet(epochs=3, batch_size=16)).fit()
    assert model.fractions == [i / 12 for i in range(12)]
    assert model.after_steps == 12


def test_max_steps_per_epoch_caps_steps_and_progress():
    model = Recorder()
    Trainer(model, ClassificationTask(3), blobs(50), None, quiet(epochs=2, batch_size=8, max_steps_per_epoch=2)).fit()
    assert model.fractions == [0.0, 0.25, 0.5, 0.75]


def test_constant_auxiliary_loss_is_added_to_the_reported_loss():
    task, data = ClassificationTask(3), blobs(40)
    cfg = quiet(epochs=2, batch_size=10)
    plain = Trainer(Recorder(), task, data, None, cfg).fit()
    shifted = Trainer(Recorder(aux=lambda m: torch.tensor(2.5)), task, data, None, cfg).fit()
    # A constant has no gradient: same weights, every epoch's loss exactly 2.5 higher.
    assert_same_state(plain.model, shifted.model)
    for a, b in zip(plain.history, shifted.history):
        assert b["train_loss"] == pytest.approx(a["train_loss"] + 2.5, abs=1e-6)


def test_training_matches_a_plain_sgd_loop_with_auxiliary_penalty():
    """Full-batch SGD (no momentum/decay, constant lr) with an L2 auxiliary penalty, against a loop
    written out by hand."""
    data = blobs(24)
    x, y = data.tensors
    lam, lr, steps = 0.05, 0.2, 5

    def penalty(m):
        return lam * sum((p**2).sum() for p in m.net.parameters())

    model = Recorder(aux=penalty)
    reference = copy.deepcopy(model.net)
    cfg = quiet(epochs=steps, batch_size=24, lr=lr, momentum=0.0, weight_decay=0.0, schedule="constant")
    result = Trainer(model, ClassificationTask(3), data, None, cfg).fit()

    for _ in range(steps):
        loss = F.cross_entropy(reference(x), y) + lam * sum((p**2).sum() for p in reference.parameters())
        grads = torch.autograd.grad(loss, list(reference.parameters()))
        with torch.no_grad():
            for p, g in zip(reference.parameters(), grads):
                p -= lr * g
    for (name, p), q in zip(result.model.net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


class TwoRates(nn.Module):
    def __init__(self, backbone_factor: float):
        super().__init__()
        self.backbone = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)
        self.backbone_factor = backbone_factor

    def forward(self, x):
        return self.head(torch.relu(self.backbone(x)))

    def param_groups(self, base_lr):
        return [
            {"params": list(self.backbone.parameters()), "lr": base_lr * self.backbone_factor},
            {"params": list(self.head.parameters()), "lr": base_lr},
        ]


def test_param_groups_set_each_groups_learning_rate():
    torch.manual_seed(0)
    model = TwoRates(backbone_factor=0.1)
    before = copy.deepcopy(model)
    data = blobs(16)
    x, y = data.tensors
    lr = 0.5
    cfg = quiet(epochs=1, batch_size=16, lr=lr, momentum=0.0, weight_decay=0.0, schedule="constant")
    Trainer(model, ClassificationTask(3), data, None, cfg).fit()
    # One full-batch step: each group moves by its own rate times the gradient.
    loss = F.cross_entropy(before(x), y)
    loss.backward()
    for name, rate in (("backbone", lr * 0.1), ("head", lr)):
        for p_new, p_old in zip(getattr(model, name).parameters(), getattr(before, name).parameters()):
            torch.testing.assert_close(p_new, p_old - rate * p_old.grad, atol=1e-6, rtol=1e-5)


def test_param_group_with_frozen_parameters_leaves_them_untouched():
    model = TwoRates(backbone_factor=1.0)
    model.backbone.requires_grad_(False)
    frozen = copy.deepcopy(model.backbone.state_dict())
    Trainer(model, ClassificationTask(3), blobs(32), None, quiet(epochs=1, batch_size=8, lr=0.5)).fit()
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, frozen[k])


def test_nothing_to_train_is_a_clear_error():
    model = mlp().requires_grad_(False)
    with pytest.raises(ZootuneError, match="no trainable parameters"):
        Trainer(model, ClassificationTask(3), blobs(16), None, quiet(epochs=1)).fit()


class Folding(nn.Module):
    """``finalize`` returns a different, plain model (like Lite Zoo-Tuning's folding)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 3)
        self.b = nn.Linear(6, 3)
        self.finalized = 0

    def forward(self, x):
        return self.a(x) + self.b(x)

    def finalize(self):
        self.finalized += 1
        merged = nn.Linear(6, 3)
        with torch.no_grad():
            merged.weight.copy_(self.a.weight + self.b.weight)
            merged.bias.copy_(self.a.bias + self.b.bias)
        return merged


def test_finalize_gives_the_returned_model_and_its_metrics():
    model = Folding()
    train, val = blobs(40), blobs(20, seed=7)
    task = ClassificationTask(3)
    result = Trainer(model, task, train, val, quiet(epochs=2, batch_size=10, lr=0.1)).fit()
    assert isinstance(result, FitResult) and model.finalized == 1
    assert isinstance(result.model, nn.Linear)
    x, y = val.tensors
    torch.testing.assert_close(result.model(x), model(x), atol=1e-6, rtol=1e-6)
    accuracy = 100.0 * (result.model(x).argmax(1) == y).float().mean().item()
    assert result.final_metrics["val_acc"] == pytest.approx(accuracy)


# ------------------------------------------------------------------ model selection


class ErrorRate(ClassificationTask):
    """Lower is better: the engine must pick the minimum."""

    metric_name = "err"
    higher_is_better = False

    def metric_sums(self, outputs, targets):
        wrong = (outputs.argmax(1) != targets).sum().item()
        return 100.0 * wrong, targets.numel()


class Snapshots:
    def __init__(self):
        self.states, self.records = [], []

    def on_epoch_end(self, trainer, record):
        self.states.append(copy.deepcopy(trainer.module.state_dict()))
        self.records.append(dict(record))


@pytest.mark.parametrize("task", [ClassificationTask(3), ErrorRate(3)], ids=["acc", "err"])
def test_best_validation_epoch_is_selected(task):
    # Random validation labels make the validation metric wander, so its best epoch is not the last.
    train = blobs(48, seed=11)
    val = blobs(30, seed=12)
    val.tensors[1].copy_(torch.randint(0, 3, (30,), generator=torch.Generator().manual_seed(3)))
    snaps = Snapshots()
    cfg = quiet(epochs=8, batch_size=8, lr=0.3, schedule="constant")
    result = Trainer(mlp(), task, train, val, cfg, callbacks=[snaps]).fit()
    values = [r[f"val_{task.metric_name}"] for r in snaps.records]
    pick = max if task.higher_is_better else min
    best = values.index(pick(values)) + 1  # the first epoch reaching the best value
    assert best != len(values), "precondition: the best epoch should not be the last one"
    assert result.best_epoch == best
    assert result.best_val_metric == pick(values)
    for k, v in snaps.states[best - 1].items():
        assert torch.equal(result.model.state_dict()[k], v)
    assert result.final_metrics[f"val_{task.metric_name}"] == pytest.approx(pick(values))


def test_without_validation_the_last_epoch_is_returned():
    snaps = Snapshots()
    cfg = quiet(epochs=3, batch_size=8)
    result = Trainer(mlp(), ClassificationTask(3), blobs(30), None, cfg, callbacks=[snaps]).fit()
    assert result.best_epoch == 3 and result.best_val_metric is None
    for k, v in snaps.states[-1].items():
        assert torch.equal(result.model.state_dict()[k], v)
    assert result.final_metrics["train_loss"] == snaps.records[-1]["train_loss"]


def test_eval_every_validates_only_on_those_epochs_and_the_last():
    cfg = quiet(epochs=5, batch_size=10, eval_every=2)
    result = Trainer(mlp(), ClassificationTask(3), blobs(30), blobs(10), cfg).fit()
    assert [("val_acc" in r) for r in result.history] == [False, True, False, True, True]


def test_same_config_same_numbers(tmp_path):
    train, val = NoisyDataset(blobs(40, seed=1)), blobs(20, seed=2)
    cfg = quiet(epochs=2, batch_size=8, lr=0.05, seed=3)
    a = Trainer(mlp(dropout=0.3), ClassificationTask(3), train, val, cfg).fit()
    scramble_global_rngs()
    b = Trainer(mlp(dropout=0.3), ClassificationTask(3), train, val, cfg).fit()
    assert_same_state(a.model, b.model)
    other_seed = dataclasses.replace(cfg, seed=4)
    c = Trainer(mlp(dropout=0.3), ClassificationTask(3), train, val, other_seed).fit()
    assert not torch.equal(a.model[0].weight, c.model[0].weight)


# ------------------------------------------------------------------ checkpoint files


def test_checkpoint_loads_with_weights_only_and_has_everything(tmp_path):
    cfg = quiet(epochs=2, batch_size=8)
    Trainer(mlp(), ClassificationTask(3), NoisyDataset(blobs(30)), blobs(10), cfg, out_dir=tmp_path).fit()
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "epoch", "step", "best_state", "history", "config", "rng", "sampler"} <= set(ckpt)
    assert TrainConfig.from_dict(ckpt["config"]) == cfg
    assert {"torch", "python", "numpy"} <= set(ckpt["rng"][0])


def test_failed_checkpoint_write_leaves_previous_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, path)
    good = path.read_bytes()

    def fsync_fails(fd):
        raise OSError("disk full")

    # The failure happens after the bytes went into the temporary file, before the rename.
    monkeypatch.setattr(os, "fsync", fsync_fails)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"epoch": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_trainer_checkpoint_failure_in_epoch_two_keeps_epoch_one(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync_fails_on_third_file(fd):
        # Each epoch writes checkpoint.pt, metrics.jsonl, metrics.csv: the 4th write is epoch 2's checkpoint
        # (the folder's own fsync after each rename is not a file write).
        import stat

        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return real_fsync(fd)
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk full")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_fails_on_third_file)
    with pytest.raises(OSError):
        Trainer(mlp(), ClassificationTask(3), blobs(30), None, quiet(epochs=3, batch_size=8), out_dir=tmp_path).fit()
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "metrics.csv", "metrics.jsonl"]


def test_resume_needs_out_dir():
    with pytest.raises(ZootuneError, match="out_dir"):
        Trainer(mlp(), ClassificationTask(3), blobs(8), resume=True)


# ------------------------------------------------------------------ evaluate / predict


def test_evaluate_equals_a_plain_computation():
    model, data, task = mlp(), blobs(37, seed=9), ClassificationTask(3)
    model.train()  # evaluate must switch to eval mode (and restore the mode)
    model[2].p = 0.9
    x, y = data.tensors
    with torch.no_grad():
        model.eval()
        out = model(x)
        model.train()
    metrics = evaluate(model, task, data, batch_size=8)  # 37 = 4 x 8 + 5: batch means must be re-weighted
    assert metrics["loss"] == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-5)
    assert metrics["acc"] == pytest.approx(100.0 * (out.argmax(1) == y).float().mean().item())
    assert model.training


def test_predict_returns_outputs_in_order():
    model, data = mlp(), blobs(21)
    model.eval()
    with torch.no_grad():
        expected = model(data.tensors[0])
    torch.testing.assert_close(predict(model, data, batch_size=4), expected)


# ------------------------------------------------------------------ config, schedule, sampler


def test_config_json_round_trip_and_validation():
    cfg = TrainConfig(epochs=3, optimizer="adam", betas=(0.8, 0.99), schedule="step", step_size=1, grad_clip=1.0)
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    json.dumps(cfg.to_dict())
    with pytest.raises(ZootuneError, match="optimizer must be one of"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ZootuneError, match="unknown training option"):
        TrainConfig.from_dict({"epochz": 3})


def test_learning_rate_schedules_follow_their_formulas():
    spe = 5
    cos = LRSchedule(TrainConfig(epochs=4, schedule="cosine", warmup_epochs=1), spe)
    for step in range(20):
        if step < 5:
            expected = (step + 1) / 5
        else:
            expected = 0.5 * (1 + math.cos(math.pi * (step - 5) / 15))
        assert cos.factor(step) == pytest.approx(expected)
    stepped = LRSchedule(TrainConfig(epochs=6, schedule="step", step_size=2, gamma=0.5), spe)
    assert [stepped.factor(e * spe) for e in range(6)] == [1, 1, 0.5, 0.5, 0.25, 0.25]


def test_scheduled_learning_rate_is_used_by_the_optimizer():
    model = TwoRates(backbone_factor=0.1)
    seen = []

    class Peek:
        def on_epoch_end(self, trainer, record):
            seen.append(record["lr"])

    cfg = quiet(epochs=3, batch_size=16, lr=0.3, schedule="step", step_size=1, gamma=0.1)
    Trainer(model, ClassificationTask(3), blobs(16), None, cfg, callbacks=[Peek()]).fit()
    # "lr" is the first group's (the backbone's, 0.1 x base) rate in the epoch's last step.
    assert seen == pytest.approx([0.03, 0.003, 0.0003])


@pytest.mark.parametrize(
    "n,batch,world,min_per_rank,drop_last",
    [(45, 10, 1, 1, False), (45, 10, 2, 1, False), (45, 10, 3, 1, False), (50, 16, 4, 1, False), (41, 8, 3, 1, False),
     (7, 4, 2, 1, False), (17, 8, 1, 2, False), (21, 8, 3, 2, False), (21, 8, 2, 1, True), (40, 8, 2, 1, True)],
)
def test_sampler_ranks_split_every_global_batch_without_repeats(n, batch, world, min_per_rank, drop_last):
    kw = dict(seed=5, min_per_rank=min_per_rank, drop_last=drop_last)
    whole = GlobalBatchSampler(n, batch, world_size=1, **{**kw, "min_per_rank": min_per_rank * world})
    ranks = [GlobalBatchSampler(n, batch, rank=r, world_size=world, **kw) for r in range(world)]
    for epoch in (0, 1):
        for s in [whole, *ranks]:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in ranks]
        assert all(len(p) == len(s) for p, s in zip(per_rank, ranks))
        reference = list(whole)
        for i, chunks in enumerate(zip(*per_rank)):
            joined = [idx for chunk in chunks for idx in chunk]
            assert joined == reference[i]  # the same global batch as one process, in order
            assert all(len(c) >= min_per_rank for c in chunks)
            # The loss weights make the ranks' mean of weighted means the global mean.
            weights = [rank_loss_weight(len(c), len(joined), world) for c in chunks]
            vals = [torch.arange(len(c), dtype=torch.float64) + c[0] for c in chunks]
            ddp_mean = sum(w * v.mean() for w, v in zip(weights, vals)) / world
            assert ddp_mean.item() == pytest.approx(torch.cat(vals).mean().item())
        covered = [idx for b in per_rank for batch_ in b for idx in batch_]
        assert len(covered) == len(set(covered))
        rest = n % batch
        dropped = rest if rest and (drop_last or rest < world * min_per_rank) else 0
        assert len(covered) == n - dropped
    first = [list(GlobalBatchSampler(n, batch, seed=5, world_size=1)) for _ in range(2)]
    assert first[0] == first[1]


def test_progress_bar_only_when_asked_and_on_a_terminal(capsys, monkeypatch):
    data = blobs(20)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    Trainer(mlp(), ClassificationTask(3), data, None, quiet(epochs=1, batch_size=5, progress=True)).fit()
    shown = capsys.readouterr().err
    assert "epoch 1/1" in shown and "loss=" in shown and "acc=" in shown and "img_s=" in shown
    Trainer(mlp(), ClassificationTask(3), data, None, quiet(epochs=1, batch_size=5, progress=False)).fit()
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    Trainer(mlp(), ClassificationTask(3), data, None, quiet(epochs=1, batch_size=5, progress=True)).fit()
    assert capsys.readouterr().err == ""


def test_batchnorm_model_skips_a_final_single_sample_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    steps = []

    class Count:
        def on_epoch_end(self, trainer, record):
            steps.append(trainer.step)

    # 17 = 2 x 8 + 1: a last batch of one sample would make BatchNorm raise in training mode.
    Trainer(model, ClassificationTask(3), blobs(17), None, quiet(epochs=2, batch_size=8), callbacks=[Count()]).fit()
    assert steps == [2, 4]
    with pytest.raises(ZootuneError, match="at least 2 sample"):
        Trainer(model, ClassificationTask(3), blobs(17), None, quiet(epochs=1, batch_size=1)).fit()


def test_tensorboard_gets_each_epochs_scalars_when_installed(tmp_path, monkeypatch):
    import types

    logged = []

    class FakeWriter:  # stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is optional)
        def __init__(self, log_dir):
            logged.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            logged.append((tag, step))

        def flush(self):
            pass

        def close(self):
            logged.append(("closed", None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    Trainer(mlp(), ClassificationTask(3), blobs(20), blobs(10), quiet(epochs=2, batch_size=10), out_dir=tmp_path).fit()
    assert logged[0] == ("dir", str(tmp_path / "tensorboard")) and logged[-1] == ("closed", None)
    assert ("val_acc", 1) in logged and ("val_acc", 2) in logged and ("train_loss", 2) in logged


# ------------------------------------------------------------------ the divergence guard


class Faulty(nn.Module):
    """An MLP whose output goes bad once: NaN at the ``nan_at``-th training forward, or x1e4 in the
    ``blow_at``-th evaluation pass (a stand-in for a blow-up the guard must undo)."""

    def __init__(self, nan_at=None, blow_at=None):
        super().__init__()
        self.net = mlp()
        self.nan_at, self.blow_at = nan_at, blow_at
        self.forwards = {"train": 0, "eval": 0}
        self._eval_seen = False

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self._eval_seen = False
            self.forwards["train"] += 1
            if self.forwards["train"] == self.nan_at:
                return out * float("nan")
        else:
            if not self._eval_seen:  # one count per evaluation pass
                self.forwards["eval"] += 1
                self._eval_seen = True
            if self.forwards["eval"] == self.blow_at:
                return out * 1e4
        return out


def _final_weights(model, **config):
    cfg = quiet(epochs=3, batch_size=8, lr=0.2, schedule="constant", **config)
    result = Trainer(model, ClassificationTask(3), blobs(48), blobs(24, seed=1), cfg).fit()
    return result, {k: v.clone() for k, v in result.model.state_dict().items()}


def test_a_nan_in_the_first_epoch_rolls_back_to_a_run_at_half_the_rate_bit_for_bit():
    faulted, weights = _final_weights(Faulty(nan_at=3))
    assert [e["lr_factor"] for e in faulted.rollbacks] == [0.5] and "non-finite training loss" in faulted.rollbacks[0]["reason"]
    # back to step 0 with the same data order and augmentations: exactly a clean run at lr x 0.5
    cfg = quiet(epochs=3, batch_size=8, lr=0.1, schedule="constant")
    clean = Trainer(Faulty(), ClassificationTask(3), blobs(48), blobs(24, seed=1), cfg).fit()
    for k, v in clean.model.state_dict().items():
        assert torch.equal(weights[k], v), k
    assert [row["lr"] for row in faulted.history] == pytest.approx([0.1, 0.1, 0.1])


def test_a_validation_loss_far_above_its_start_rolls_the_epoch_back():
    # eval pass 1 is the reference before training; pass 3 is epoch 2's validation
    result, _ = _final_weights(Faulty(blow_at=3))
    (event,) = result.rollbacks
    assert event["epoch"] == 2 and "validation loss" in event["reason"] and "x its value before training" in event["reason"]
    assert len(result.history) == 3 and [row["lr"] for row in result.history] == pytest.approx([0.2, 0.1, 0.1])
    assert all(math.isfinite(row["val_loss"]) and row["val_loss"] < 10 for row in result.history)


def test_without_rollbacks_left_a_nan_stops_training_as_before():
    with pytest.raises(NonFiniteLossError):
        _final_weights(Faulty(nan_at=3), max_rollbacks=0)


def test_the_guard_state_survives_a_resume(tmp_path):
    cfg = dict(batch_size=8, lr=0.2, schedule="constant")
    straight = Trainer(Faulty(nan_at=3), ClassificationTask(3), blobs(48), blobs(24, seed=1),
                       quiet(epochs=3, **cfg)).fit()
    Trainer(Faulty(nan_at=3), ClassificationTask(3), blobs(48), blobs(24, seed=1), quiet(epochs=2, **cfg),
            out_dir=tmp_path).fit()
    resumed = Trainer(Faulty(), ClassificationTask(3), blobs(48), blobs(24, seed=1), quiet(epochs=3, **cfg),
                      out_dir=tmp_path, resume=True).fit()
    assert resumed.rollbacks == straight.rollbacks and resumed.history[-1]["lr"] == pytest.approx(0.1)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


def test_time_left_is_said_once_per_training_call_after_its_first_epoch(tmp_path, caplog):
    import logging

    def lines():
        return [r.getMessage() for r in caplog.records if r.name == "zootune.progress"]

    data = blobs(40)
    with caplog.at_level(logging.INFO, logger="zootune.progress"):
        Trainer(mlp(), ClassificationTask(3), data, data, config=quiet(epochs=4, batch_size=8, progress=True)).fit()
        assert len(lines()) == 1 and lines()[0].startswith("training: epoch 1/4 took ")
        assert lines()[0].endswith("for the remaining 3")
        caplog.clear()
        Trainer(mlp(), ClassificationTask(3), data, data, config=quiet(epochs=4, batch_size=8)).fit()  # no progress
        assert lines() == []
        first = quiet(epochs=4, batch_size=8, progress=True, stop_after=2)
        Trainer(mlp(), ClassificationTask(3), data, data, config=first, out_dir=tmp_path).fit()
        assert len(lines()) == 1 and "epoch 1/2 (of 4; this call stops after 2)" in lines()[0]
        caplog.clear()
        rest = quiet(epochs=4, batch_size=8, progress=True)
        Trainer(mlp(), ClassificationTask(3), data, data, config=rest, out_dir=tmp_path, resume=True).fit()
        assert len(lines()) == 1 and lines()[0].startswith("training: epoch 3/4 took ")
