"""Two processes (gloo on CPU, started with the environment torchrun gives each process) train to the
same weights as one process with the same global batch; validation metrics are summed exactly over
processes and only rank 0 writes files."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

import zootune.engine.checkpoint as checkpoint_module
from zootune.engine import TrainConfig, Trainer
from zootune.tasks import ClassificationTask

from test_engine import Interrupt, KillAfter  # the same simulated kill as the one-process resume tests

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def train_tiny(out: Path, dropout: float = 0.0, kill_after: int | None = None, resume: bool = False) -> None:
    """What every run executes. The model has no BatchNorm: under DDP BatchNorm normalises with each
    process's own batch statistics (SyncBatchNorm needs GPUs), which legitimately differs from one
    process. Dropout (per-process RNG streams) is only used to test resuming."""
    rank = int(os.environ.get("RANK", "0"))
    writes = []
    if rank != 0:  # record any file a non-zero rank would write (every write goes through zootune.atomic)
        import zootune.atomic as atomic_module

        real = atomic_module.atomic_write

        def spy(path, write):
            writes.append(str(path))
            return real(path, write)

        checkpoint_module.atomic_write = atomic_module.atomic_write = spy

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 5, generator=g) * 2

    def blobs(n):
        y = torch.randint(0, 3, (n,), generator=g)
        return TensorDataset(centers[y] + torch.randn(n, 5, generator=g), y)

    train, val = blobs(45), blobs(21)  # 45 = 4 x 10 + 5: the last global batch splits 3 / 2
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Dropout(dropout), nn.Linear(12, 3))
    cfg = TrainConfig(epochs=3, batch_size=10, lr=0.1, optimizer="sgd", schedule="cosine", progress=False,
                      device="cpu")
    callbacks = [KillAfter(kill_after)] if kill_after else []
    try:
        result = Trainer(model, ClassificationTask(3), train, val, cfg, out_dir=out / "run", resume=resume,
                         callbacks=callbacks).fit()
    except Interrupt:
        return
    if rank == 0:
        torch.save({k: v.clone() for k, v in result.model.state_dict().items()}, out / "returned_state.pt")
        (out / "result.json").write_text(
            json.dumps({"history": result.history, "final": result.final_metrics, "best_epoch": result.best_epoch})
        )
    summary = {"writes": writes, "checkpoint_path": str(result.checkpoint_path)}
    (out / f"rank{rank}.json").write_text(json.dumps(summary))


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
