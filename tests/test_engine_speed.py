"""The engine's speed settings change how, not what, it computes: mixed precision (bf16 on the CPU,
fp16 with a GradScaler), channels-last, the thread rule, aggregation formulations chosen once before
training and stored in the checkpoint, SyncBatchNorm conversion; and a Zoo-Tuning run resumed in a
fresh process after ``kill -9`` mid-epoch ends with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import Dataset

from zootune.engine import TrainConfig, Trainer
from zootune.engine import threads as engine_threads
from zootune.engine.checkpoint import load_checkpoint
from zootune.engine.sync_bn import (
    CpuSyncBatchNorm,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)
from zootune.layers import AggregatedLayer, autotune, formulation_cache
from zootune.tasks import ClassificationTask


class Images(Dataset):
    """Random 3x8x8 images whose class is the sign pattern of the channel means; augmentation
    (noise, flips) from the global torch and NumPy generators, like a real augmenting dataset."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.y = ((self.x.mean((2, 3)) > 0).long() * torch.tensor([1, 1, 0])).sum(1).clamp(max=2)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i] + 0.1 * torch.randn(3, 8, 8)
        if np.random.rand() < 0.5:
            x = x.flip(-1)
        return x, int(self.y[i])


def agg_net(seed: int = 0, lite: bool = False, formulation: str = "auto") -> nn.Module:
    """Two aggregation layers (3x3 and pointwise) around BatchNorm, a linear head."""
    torch.manual_seed(seed)

    def sources(c_in, c_out, k):
        return [nn.Conv2d(c_in, c_out, k, padding=k // 2) for _ in range(3)]

    return nn.Sequential(
        AggregatedLayer(sources(3, 8, 3), lite=lite, formulation=formulation), nn.BatchNorm2d(8), nn.ReLU(),
        AggregatedLayer(sources(8, 8, 1), lite=lite, formulation=formulation), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


def quiet(**kw) -> TrainConfig:
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    kw.setdefault("batch_size", 8)
    kw.setdefault("lr", 0.05)
    return TrainConfig(**kw)


class Probe(nn.Module):
    """Records, at every forward, whether autocast is on and in which dtype, the input's memory
    format and the thread count."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.seen: list[tuple] = []

    def forward(self, x):
        out = self.inner(x)
        self.seen.append((self.training, torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"),
                          out.dtype, x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
                          torch.get_num_threads()))
        return out


# ------------------------------------------------------------------ precision


def test_bf16_autocast_in_training_and_validation_and_close_to_fp32():
    train, val = Images(48, seed=1), Images(16, seed=2)
    task = ClassificationTask(3)
    fp32 = Trainer(agg_net(), task, train, val, quiet(epochs=2, exact_choices="macs")).fit()
    probe = Probe(agg_net())
    bf16 = Trainer(probe, task, train, val, quiet(epochs=2, precision="bf16", exact_choices="macs")).fit()
    assert {(training, dtype, out) for training, dtype, out, *_ in probe.seen} == {
        (True, torch.bfloat16, torch.bfloat16), (False, torch.bfloat16, torch.bfloat16)}
    for name, p in bf16.model.inner.named_parameters():
        assert p.dtype == torch.float32, name  # autocast keeps the weights in fp32
        q = dict(fp32.model.named_parameters())[name]
        # two epochs of the same steps with 8-bit-mantissa products: close, not equal
        assert (p - q).norm() <= 0.1 * q.norm() + 1e-3, name
    assert not all(torch.equal(p, q) for p, q in zip(bf16.model.inner.parameters(), fp32.model.parameters()))
    assert abs(bf16.history[-1]["train_loss"] - fp32.history[-1]["train_loss"]) < 0.1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_resume_is_exact(tmp_path, precision):
    """The fp16 GradScaler's state travels in the checkpoint; bf16 needs none. (Formulations by
    multiply-adds: two timed runs in one process may choose differently; see the last test.)"""
    train, task = Images(40, seed=3), ClassificationTask(3)
    cfg = quiet(epochs=3, precision=precision, lr=0.1, exact_choices="macs")
    straight = Trainer(agg_net(), task, train, None, cfg, out_dir=tmp_path / "a").fit()

    class Stop(Exception):
        pass

    class KillAfterOne:
        def on_epoch_end(self, trainer, record):
            if trainer.epoch == 1:
                raise Stop

    with pytest.raises(Stop):
        Trainer(agg_net(), task, train, None, cfg, out_dir=tmp_path / "b", callbacks=[KillAfterOne()]).fit()
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    if precision == "fp16":
        assert ckpt["grad_scaler"]["scale"] > 0 and "_growth_tracker" in ckpt["grad_scaler"]
    torch.manual_seed(123)
    resumed = Trainer(agg_net(seed=7), task, train, None, cfg, out_dir=tmp_path / "b", resume=True).fit()
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name


def test_unknown_precision_is_a_config_error():
    with pytest.raises(Exception, match="precision must be one of"):
        TrainConfig(precision="fp8")


# ------------------------------------------------------------------ channels-last


def test_channels_last_trains_in_that_layout_and_returns_a_contiguous_model():
    train, task = Images(32, seed=4), ClassificationTask(3)
    probe = Probe(agg_net())
    result = Trainer(probe, task, train, None, quiet(epochs=1, channels_last=True, exact_choices="macs")).fit()
    assert all(cl for training, _, _, cl, _ in probe.seen if training)
    assert all(p.is_contiguous() for p in result.model.parameters())
    plain = Trainer(agg_net(), task, train, None, quiet(epochs=1, exact_choices="macs")).fit()
    for p, q in zip(result.model.inner.parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)  # other kernels, same numbers
    # the default on the CPU is the plain layout
    probe = Probe(agg_net())
    Trainer(probe, task, train, None, quiet(epochs=1)).fit()
    assert not any(cl for *_, cl, _ in probe.seen)


# ------------------------------------------------------------------ threads


def test_thread_rule(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    huge, tiny = (lambda: 1e12), (lambda: 1e6)
    assert engine_threads.choose_threads(3, cpu, tiny) == 3  # a number is a number
    assert engine_threads.choose_threads(None, cpu, tiny) == 1  # a small model: one thread
    assert engine_threads.choose_threads(None, cpu, huge) is None  # a big one: torch's default
    monkeypatch.setattr(os, "getloadavg", lambda: (1.7, 1.0, 1.0))
    assert engine_threads.choose_threads(None, cpu, huge) == 1  # a busy machine: one thread
    assert engine_threads.choose_threads(None, torch.device("cuda"), tiny) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert engine_threads.choose_threads(None, cpu, tiny) is None  # the user's setting stands


def test_thread_rule_block_sets_and_restores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with engine_threads.thread_rule(None, torch.device("cpu"), lambda: 1e6) as inside:
            assert inside == torch.get_num_threads() == 1  # a small model on 2 threads: one
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_engine_sets_threads_while_training_and_restores_them():
    before = torch.get_num_threads()
    probe = Probe(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)))
    Trainer(probe, ClassificationTask(3), Images(16), None, quiet(epochs=1, threads=2)).fit()
    assert {threads for *_, threads in probe.seen} == {2}
    assert torch.get_num_threads() == before


def test_forward_macs_counts_one_forward_and_changes_nothing():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    macs = engine_threads.forward_macs(net, (torch.randn(2, 3, 5, 5),))
    assert macs == pytest.approx(2 * 5 * 5 * 4 * 3 * 9, abs=2 * 4 * 25)  # the conv (BN: a few per element)
    assert net.training and all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


# ------------------------------------------------------------------ formulations


def test_formulations_are_tuned_once_before_training_and_stored(tmp_path, monkeypatch):
    calls = []
    real_tune = autotune.tune
    monkeypatch.setattr(autotune, "tune", lambda model, example, **k: calls.append({**k, "example": example})
                        or real_tune(model, example, **k))
    net = agg_net()
    Trainer(net, ClassificationTask(3), Images(24), None, quiet(epochs=2, exact_choices="time"),
            out_dir=tmp_path).fit()
    assert len(calls) == 1 and calls[0]["mode"] == "time"
    assert calls[0]["example"].shape == (8, 3, 8, 8)  # the first training batch
    stored = load_checkpoint(tmp_path / "checkpoint.pt")["training_states"]
    layers = autotune.aggregated_layers(net)
    assert set(stored) == set(layers) and stored == autotune.formulation_choices(net)
    for name, per_phase in stored.items():
        assert set(per_phase) == {"train"}  # evaluation keeps the multiply-add rule
        assert per_phase["train"] in layers[name].candidate_formulations("train")
    # resuming reads them back instead of timing again
    calls.clear()
    fresh = agg_net()
    Trainer(fresh, ClassificationTask(3), Images(24), None, quiet(epochs=3, exact_choices="time"),
            out_dir=tmp_path, resume=True).fit()
    assert calls == [] and autotune.formulation_choices(fresh) == stored
    # a given example batch is what the tuning sees
    Trainer(agg_net(), ClassificationTask(3), Images(24), None, quiet(epochs=1, exact_choices="time"),
            example_input=torch.randn(5, 3, 8, 8)).fit()
    assert calls[-1]["example"].shape == (5, 3, 8, 8)


def _noisy_timing(monkeypatch):
    """``measure`` that picks another survivor on every call, as a loaded machine's timing may."""
    calls = []

    def measure(candidates, macs, device="cpu", repeats=autotune.MEASURE_REPEATS):
        survivors = [n for n in candidates if macs[n] <= autotune.PRUNE_FACTOR * min(macs[c] for c in candidates)]
        calls.append(len(calls))
        return autotune.LayerChoice(survivors[len(calls) % len(survivors)], {}, dict(macs))

    monkeypatch.setattr(autotune, "measure", measure)
    return calls


def _trained_state(net, epochs=2):
    Trainer(net, ClassificationTask(3), Images(24), None, quiet(epochs=epochs, exact_choices="time")).fit()
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_timed_choices_are_reused_from_the_machine_cache_so_reruns_are_bit_identical(monkeypatch, tmp_path):
    calls = _noisy_timing(monkeypatch)
    first = _trained_state(agg_net())
    timed = len(calls)
    assert timed == 2 and json.loads((tmp_path / "formulations.json").read_text())
    second = _trained_state(agg_net())
    assert len(calls) == timed  # nothing timed again
    assert all(torch.equal(first[k], second[k]) for k in first)
    # without the cache the noisy timing chooses otherwise and the weights differ: the cache is what
    # makes the rerun equal
    monkeypatch.setattr(formulation_cache, "choices_path", lambda cache_dir: tmp_path / "other.json")
    calls.append("the load changed")  # the next timings pick the other survivors
    third = _trained_state(agg_net())
    assert any(not torch.equal(first[k], third[k]) for k in first)


def test_a_corrupt_or_unwritable_formulation_cache_is_measured_again(monkeypatch, tmp_path):
    (tmp_path / "formulations.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        _trained_state(agg_net(), epochs=1)
    assert json.loads((tmp_path / "formulations.json").read_text())  # replaced by a valid one
    monkeypatch.setattr(formulation_cache, "choices_path", lambda cache_dir: Path("/proc/zootune-x/f.json"))
    with pytest.warns(UserWarning, match="cannot be written"):
        _trained_state(agg_net(), epochs=1)


def test_macs_mode_stores_no_choice_and_fixed_formulations_are_not_tuned(tmp_path):
    net = agg_net()
    Trainer(net, ClassificationTask(3), Images(24), None, quiet(epochs=1, exact_choices="macs"), out_dir=tmp_path).fit()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["training_states"] == {"0": {}, "3": {}}
    fixed = agg_net(formulation="stacked")
    Trainer(fixed, ClassificationTask(3), Images(24), None, quiet(epochs=1)).fit()
    assert autotune.formulation_choices(fixed) == {}


def test_sync_bn_conversion_is_in_place_and_reverts():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.BatchNorm1d(4 * 9))
    bn2, bn1 = net[1], net[3]
    params = [bn2.weight, bn2.running_mean]
    converted = convert_sync_batchnorm(net, torch.device("cpu"))
    assert type(net[1]) is CpuSyncBatchNorm and net[1] is bn2 and net[3] is bn1
    assert net[1].weight is params[0] and net[1].running_mean is params[1]
    x = torch.randn(5, 3, 5, 5)
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.BatchNorm1d(4 * 9))
    reference.load_state_dict(net.state_dict())
    # one process: exactly the plain layer (training and eval)
    torch.testing.assert_close(net(x), reference(x))
    torch.testing.assert_close(net[1].running_var, reference[1].running_var)
    revert_sync_batchnorm(converted)
    assert type(net[1]) is nn.BatchNorm2d and type(net[3]) is nn.BatchNorm1d


def test_sync_bn_with_one_process_is_a_no_op():
    train, task = Images(24), ClassificationTask(3)
    a = Trainer(agg_net(), task, train, None, quiet(epochs=1, sync_bn=True, exact_choices="macs")).fit()
    b = Trainer(agg_net(), task, train, None, quiet(epochs=1, exact_choices="macs")).fit()
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    assert all(type(m) is not CpuSyncBatchNorm for m in a.model.modules())


# ------------------------------------------------------------------ exact resume across processes


def _worker(out: str, epochs: int, prefer: str, kill_in_epoch: int | None, resume: bool) -> None:
    """One training process. ``prefer``: the formulation this process's "timing" picks (a stand-in
    for a machine whose load changes between processes); ``kill_in_epoch``: SIGKILL itself after a
    few batches of that epoch (1-based)."""
    torch.set_num_threads(1)

    def measure(candidates, macs, device="cpu", repeats=1):
        names = list(candidates)
        return autotune.LayerChoice(prefer if prefer in names else names[0], {n: 1.0 for n in names}, dict(macs))

    autotune.measure = measure
    # each run folder its own cache of timed choices: the processes stand for different machines
    formulation_cache.choices_path = lambda cache_dir: Path(out) / "formulations.json"
    state = {"epoch_done": 0, "reads_in_epoch": 0}

    class Killing(Images):
        def __getitem__(self, i):
            if kill_in_epoch is not None and state["epoch_done"] == kill_in_epoch - 1:
                state["reads_in_epoch"] += 1
                if state["reads_in_epoch"] > 20:  # mid-epoch: after a couple of optimizer steps
                    os.kill(os.getpid(), signal.SIGKILL)
            return super().__getitem__(i)

    class Count:
        def on_epoch_end(self, trainer, record):
            state["epoch_done"] = trainer.epoch
            state["reads_in_epoch"] = 0

    cfg = quiet(epochs=epochs, exact_choices="time", lr=0.1, batch_size=6)
    # No validation data: the last epoch's weights are returned, not an earlier best one.
    result = Trainer(agg_net(), ClassificationTask(3), Killing(42), None, cfg, out_dir=out,
                     resume=resume, callbacks=[Count()]).fit()
    torch.save(result.model.state_dict(), Path(out) / "final.pt")
    (Path(out) / "choices.json").write_text(json.dumps(autotune.formulation_choices(result.model)))


def _run_worker(out: Path, prefer: str, kill_in_epoch=None, resume=False) -> int:
    """The worker in a new process (forked: torch is already imported, which saves seconds per
    process; nothing of this process's state is involved -- the choices live on the layers of the
    model the worker builds)."""
    process = mp.get_context("fork").Process(target=_worker, args=(str(out), 2, prefer, kill_in_epoch, resume))
    process.start()
    process.join(timeout=120)
    if process.is_alive():
        process.kill()
        process.join()
    return process.exitcode


def test_resume_after_kill_9_in_a_fresh_process_is_bit_exact_with_timed_formulations(tmp_path):
    """Straight: 2 epochs with timed formulations (this process's timing prefers "stacked").
    Interrupted: the same, SIGKILLed mid-epoch 2. Resumed in a new process whose timing would
    prefer "outputs": it reads "stacked" back from the checkpoint and ends bit-identical.
    Control: with the stored choices removed, the resumed run times again and ends elsewhere."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _run_worker(straight, "stacked") == 0
    assert _run_worker(killed, "stacked", kill_in_epoch=2) == -signal.SIGKILL
    ckpt = load_checkpoint(killed / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and not (killed / "final.pt").exists()
    control = tmp_path / "control"
    control.mkdir()
    stripped = dict(ckpt, training_states=None)
    torch.save(stripped, control / "checkpoint.pt")

    assert _run_worker(killed, "outputs", resume=True) == 0
    want = torch.load(straight / "final.pt", weights_only=True)
    got = torch.load(killed / "final.pt", weights_only=True)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert json.loads((killed / "choices.json").read_text())["0"]["train"] == "stacked"

    assert _run_worker(control, "outputs", resume=True) == 0
    other = torch.load(control / "final.pt", weights_only=True)
    assert json.loads((control / "choices.json").read_text())["0"]["train"] == "outputs"
    assert not all(torch.equal(other[k], want[k]) for k in want)  # the stored choices mattered


# ------------------------------------------------------------------ the fit command's flags


def test_fit_flags_reach_the_engine(tmp_path, capsys):
    from test_cli import ARCH, FAST, write_images

    import zootune.cli.main as cli
    from zootune.models import resnet_small
    from zootune.zoo import save_state_dict

    for split in ("train", "val"):
        write_images(tmp_path / "data" / split, classes=2, per_class=4, seed=len(split))
    torch.manual_seed(0)
    zoo = []
    for i in range(2):
        zoo.append(tmp_path / f"m{i}.safetensors")
        save_state_dict(zoo[-1], resnet_small(depth=10, width=4).state_dict())
    argv = ["fit", *ARCH, "--zoo", *zoo, "--data", tmp_path / "data", "--method", "lite", *FAST,
            "--out", tmp_path / "out", "--precision", "bf16", "--threads", "1", "--channels-last", "on",
            "--device", "cpu"]
    assert cli.main([str(a) for a in argv]) == 0
    config = load_checkpoint(tmp_path / "out" / "train" / "checkpoint.pt")["config"]
    assert (config["precision"], config["threads"], config["channels_last"], config["device"]) == ("bf16", 1, True, "cpu")
    capsys.readouterr()
    assert cli.main([str(a) for a in [*argv[:-8], "--out", tmp_path / "o2", "--precision", "fp8"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zootune: error:") and "precision" in err[0]
