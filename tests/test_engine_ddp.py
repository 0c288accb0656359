"""Two processes (gloo on CPU, started with the environment torchrun gives each process) train to the
same weights as one process with the same global batch; validation metrics are summed exactly over
processes; with BatchNorm they do so only with ``sync_bn``; only rank 0 writes files and logs, and
every rank uses rank 0's formulation choices."""

from __future__ import annotations

import builtins
import json
import logging
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_engine import (  # the same simulated kill as the one-process resume tests
    Interrupt,
    KillAfter,
)
from torch import nn
from torch.utils.data import TensorDataset

import zootune.atomic as atomic_module
import zootune.engine.checkpoint as checkpoint_module
from zootune.engine import TrainConfig, Trainer
from zootune.layers import AggregatedLayer, autotune
from zootune.tasks import ClassificationTask

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _spy_on_writes(root: Path) -> list[str]:
    """Record every file-system write under ``root`` by this process (open for writing, renames,
    new folders, torch.save, the atomic writer)."""
    writes: list[str] = []
    root = str(root.resolve())

    def note(path) -> None:
        path = str(Path(path).resolve()) if isinstance(path, (str, os.PathLike)) else str(path)
        if path.startswith(root):
            writes.append(path)

    real_open, real_replace, real_rename, real_makedirs = builtins.open, os.replace, os.rename, os.makedirs
    real_mkdir, real_save, real_atomic = Path.mkdir, torch.save, atomic_module.atomic_write

    def spy_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            note(file)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = spy_open
    os.replace = lambda src, dst, *a, **k: (note(dst), real_replace(src, dst, *a, **k))[1]
    os.rename = lambda src, dst, *a, **k: (note(dst), real_rename(src, dst, *a, **k))[1]
    os.makedirs = lambda name, *a, **k: (note(name), real_makedirs(name, *a, **k))[1]
    Path.mkdir = lambda self, *a, **k: (note(self), real_mkdir(self, *a, **k))[1]
    torch.save = lambda obj, f, *a, **k: (note(f), real_save(obj, f, *a, **k))[1]

    def atomic(path, write):  # every write of the library goes through zootune.atomic
        note(path)
        return real_atomic(path, write)

    checkpoint_module.atomic_write = atomic_module.atomic_write = atomic
    return writes


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _model(kind: str, dropout: float) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Dropout(dropout), nn.Linear(12, 3))
    if kind == "bn":
        return nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 3))
    if kind == "lite":  # aggregation layers whose forward averages its gate over the processes
        return nn.Sequential(AggregatedLayer([nn.Linear(5, 12) for _ in range(3)], lite=True), nn.Tanh(),
                             AggregatedLayer([nn.Linear(12, 3) for _ in range(3)]))
    raise ValueError(kind)


def train_tiny(out: Path, dropout: float = 0.0, kill_after: int | None = None, resume: bool = False,
               kind: str = "mlp", sync_bn: bool = False) -> None:
    """What every run executes. ``kind="mlp"`` has no BatchNorm: under DDP BatchNorm normalises with
    each process's own batch statistics unless ``sync_bn``. Dropout (per-process RNG streams) is only
    used to test resuming."""
    rank = int(os.environ.get("RANK", "0"))
    writes, records = [], _Records()
    zootune_log = logging.getLogger("zootune")
    level = zootune_log.level
    zootune_log.addHandler(records)
    zootune_log.setLevel(logging.INFO)
    if rank != 0:  # record any file a non-zero rank would write into the run folder
        writes = _spy_on_writes(out / "run")

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 5, generator=g) * 2

    def blobs(n):
        y = torch.randint(0, 3, (n,), generator=g)
        return TensorDataset(centers[y] + torch.randn(n, 5, generator=g), y)

    train, val = blobs(45), blobs(21)  # 45 = 4 x 10 + 5: the last global batch splits 3 / 2
    model = _model(kind, dropout)
    cfg = TrainConfig(epochs=3, batch_size=10, lr=0.1, optimizer="sgd", schedule="cosine", progress=False,
                      device="cpu", sync_bn=sync_bn, exact_choices="time")
    callbacks = [KillAfter(kill_after)] if kill_after else []
    try:
        result = Trainer(model, ClassificationTask(3), train, val, cfg, out_dir=out / "run", resume=resume,
                         callbacks=callbacks).fit()
    except Interrupt:
        return
    finally:
        zootune_log.removeHandler(records)
        zootune_log.setLevel(level)
    if rank == 0:
        torch.save({k: v.clone() for k, v in result.model.state_dict().items()}, out / "returned_state.pt")
        (out / "result.json").write_text(
            json.dumps({"history": result.history, "final": result.final_metrics, "best_epoch": result.best_epoch})
        )
    summary = {"writes": list(writes), "checkpoint_path": str(result.checkpoint_path), "logs": records.messages,
               "choices": autotune.formulation_choices(result.model),
               "bn_classes": sorted({type(m).__name__ for m in result.model.modules() if "Norm" in type(m).__name__})}
    with builtins.open(out / f"rank{rank}.json", "w") as f:  # outside the run folder
        f.write(json.dumps(summary))


def _worker(rank: int, world_size: int, port: int, out: Path, kwargs: dict) -> None:
    # The variables torchrun sets for each process it starts.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    try:
        train_tiny(out, **kwargs)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(world_size: int, out: Path, **kwargs) -> None:
    # fork: the children start with torch already imported (seconds saved per process on a busy machine);
    # building an optimizer once first imports what torch.optim loads lazily (torch._dynamo), for the same reason.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    ctx = mp.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, out, kwargs)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * world_size


def test_two_processes_equal_one_process(tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    run_processes(2, two)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_tiny(one)  # one process, here
    finally:
        torch.set_num_threads(threads)

    w1 = torch.load(one / "returned_state.pt", weights_only=True)
    w2 = torch.load(two / "returned_state.pt", weights_only=True)
    last1 = torch.load(one / "run" / "checkpoint.pt", weights_only=True)["model"]
    last2 = torch.load(two / "run" / "checkpoint.pt", weights_only=True)["model"]
    for k in last1:
        torch.testing.assert_close(last2[k], last1[k], atol=1e-5, rtol=1e-5, msg=k)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-5, msg=k)
    r1 = json.loads((one / "result.json").read_text())
    r2 = json.loads((two / "result.json").read_text())
    # Metric sums over 11 + 10 validation samples on two ranks = the sums over 21 on one.
    for a, b in zip(r1["history"], r2["history"]):
        assert b["val_acc"] == pytest.approx(a["val_acc"], abs=1e-9)
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5)
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)
    assert r2["final"]["val_acc"] == pytest.approx(r1["final"]["val_acc"])
    assert r2["best_epoch"] == r1["best_epoch"]
    # Only rank 0 writes; its checkpoint holds both ranks' RNG states for an exact resume.
    rank1 = json.loads((two / "rank1.json").read_text())
    assert rank1["writes"] == [] and rank1["checkpoint_path"] == "None"
    assert sorted(os.listdir(two / "run")) == ["checkpoint.pt", "metrics.csv", "metrics.jsonl"]
    ckpt = torch.load(two / "run" / "checkpoint.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])


def test_two_process_run_resumes_exactly(tmp_path, monkeypatch):
    """Killed after epoch 1 and resumed, two processes with dropout (a different RNG stream per
    process, all saved by rank 0) end with the weights of an uninterrupted two-process run."""
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir()
    resumed.mkdir()
    run_processes(2, straight, dropout=0.3)
    run_processes(2, resumed, dropout=0.3, kill_after=1)
    assert torch.load(resumed / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    run_processes(2, resumed, dropout=0.3, resume=True)
    a = torch.load(straight / "run" / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "run" / "checkpoint.pt", weights_only=True)
    assert b["epoch"] == a["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["rng"][1]["torch"], b["rng"][1]["torch"])


def _one_process(out: Path, **kwargs) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_tiny(out, **kwargs)
    finally:
        torch.set_num_threads(threads)


def test_batchnorm_equals_one_process_only_with_sync_bn(tmp_path, monkeypatch):
    """BatchNorm under DDP normalises each process's slice by default (a different function of the
    global batch than one process computes); with sync_bn it normalises the global batch, and two
    processes end where one process ends (weights and running statistics)."""
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    dirs = {name: tmp_path / name for name in ("one", "synced", "per_rank")}
    for d in dirs.values():
        d.mkdir()
    _one_process(dirs["one"], kind="bn")
    run_processes(2, dirs["synced"], kind="bn", sync_bn=True)
    run_processes(2, dirs["per_rank"], kind="bn")
    one, synced, per_rank = (torch.load(dirs[n] / "returned_state.pt", weights_only=True) for n in dirs)
    for k in one:
        torch.testing.assert_close(synced[k], one[k], atol=1e-5, rtol=1e-5, msg=k)
    worst = max((per_rank[k].double() - one[k].double()).abs().max().item() for k in one if one[k].is_floating_point())
    assert worst > 1e-3  # per-process statistics: a different training
    # The returned model has the architecture's own BatchNorm class again.
    assert json.loads((dirs["synced"] / "rank0.json").read_text())["bn_classes"] == ["BatchNorm1d"]


def test_only_rank_0_writes_and_logs_and_every_rank_uses_its_formulations(tmp_path, monkeypatch):
    """Lite aggregation layers, formulations timed on each rank: rank 1 writes nothing into the run
    folder and logs nothing; both ranks end with rank 0's choices, which are in the checkpoint."""
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    run_processes(2, tmp_path, kind="lite")
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank1["writes"] == [] and rank1["logs"] == [] and rank1["checkpoint_path"] == "None"
    assert any("epoch 3/3" in line for line in rank0["logs"])
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint.pt", "metrics.csv", "metrics.jsonl"]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert rank0["choices"] == rank1["choices"] == ckpt["training_states"]
    assert set(rank0["choices"]) == {"0", "2"}
