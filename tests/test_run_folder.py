"""Runs are never silently overwritten: the run folder's lock, refusal, atomic commit and cleanup,
resuming with a new learning rate after a NaN, and SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from zootune.cli import main as cli
from zootune.errors import ZootuneError
from zootune.models import resnet_small
from zootune.run_folder import RunFolder, commit_folder
from zootune.zoo.checkpoint import save_state_dict

sys.path.insert(0, str(Path(__file__).parent))
from test_bad_input import ARCH, _images  # noqa: E402


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metrics.jsonl").write_text("{}")
    with RunFolder(tmp_path):  # logs without a checkpoint: nothing to lose, a rerun may start
        pass
    (tmp_path / "train" / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(ZootuneError, match="holds another run .*train/checkpoint.pt"):
        RunFolder(tmp_path).open()
    with RunFolder(tmp_path, resume=True):
        assert (tmp_path / "train" / "checkpoint.pt").exists()
    (tmp_path / "model").mkdir()
    with RunFolder(tmp_path, overwrite=True):
        assert not (tmp_path / "model").exists() and not (tmp_path / "train").exists()


def test_stale_temporaries_of_crashed_writes_are_removed(tmp_path):
    (tmp_path / "train").mkdir()
    stale = [tmp_path / "train" / ".checkpoint.pt.abc123.tmp", tmp_path / ".model.tmp-4242"]
    stale[0].write_bytes(b"half")
    stale[1].mkdir()
    keep = tmp_path / "train" / "notes.txt"
    keep.write_text("mine")
    with RunFolder(tmp_path):
        assert not any(p.exists() for p in stale) and keep.exists()


def test_commit_replaces_a_folder_as_one_unit(tmp_path):
    final = tmp_path / "model"

    def write(version):
        def fill(folder):
            (folder / "config.json").write_text(version)
            (folder / "model.safetensors").write_text(version)
        return fill

    commit_folder(final, write("one"))
    commit_folder(final, write("two"))
    assert {p.name: p.read_text() for p in final.iterdir()} == {"config.json": "two", "model.safetensors": "two"}

    def fails(folder):
        (folder / "config.json").write_text("three")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        commit_folder(final, fails)
    assert (final / "config.json").read_text() == "two"  # the old set stays whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left


def test_a_second_process_cannot_write_the_same_folder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from zootune.run_folder import RunFolder
            with RunFolder({str(tmp_path)!r}):
                print("locked", flush=True)
                sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ZootuneError, match=f"another zootune process \\(pid {holder.pid}\\) is writing"):
            RunFolder(tmp_path).open()
    finally:
        holder.communicate("\n", timeout=60)
    with RunFolder(tmp_path):  # released when the holder ended: no stale lock
        pass


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    save_state_dict(root / "m0.safetensors", resnet_small(num_classes=3, depth=10, width=4).state_dict())
    _images(root / "data", per_class=12)
    return root


def fit_argv(ws, out, *extra):
    return [str(a) for a in ["fit", *ARCH, "--zoo", ws / "m0.safetensors", "--data", ws / "data", "--method",
                             "finetune", "--batch-size", "4", "--no-progress", "--out", out, *extra]]


def test_fit_refuses_another_run_and_overwrite_replaces_it(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(fit_argv(workspace, out, "--epochs", "1")) == 0
    first = (out / "model" / "model.safetensors").read_bytes()
    assert cli.main(fit_argv(workspace, out, "--epochs", "1", "--seed", "1")) == 2
    assert "holds another run" in capsys.readouterr().err
    assert (out / "model" / "model.safetensors").read_bytes() == first  # untouched
    assert cli.main(fit_argv(workspace, out, "--epochs", "1", "--seed", "1", "--overwrite")) == 0
    assert (out / "model" / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in (out / "model").iterdir()) == ["config.json", "metrics.json", "model.safetensors"]


def test_nan_advice_works_resume_with_a_smaller_lr_finishes(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(fit_argv(workspace, out, "--epochs", "1", "--lr", "0.05")) == 0
    # the user continues with a learning rate that is far too large: it must take effect (and fail)
    assert cli.main(fit_argv(workspace, out, "--epochs", "3", "--lr", "1e6", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "non-finite" in err and "after epoch 1" in err and "lower --lr and --resume" in err
    # ... and the advice as printed works: the same command with a lower lr and --resume finishes
    assert cli.main(fit_argv(workspace, out, "--epochs", "3", "--lr", "0.05", "--resume")) == 0
    assert (out / "model" / "metrics.json").exists()


def test_nan_before_any_checkpoint_needs_no_resume(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(fit_argv(workspace, out, "--epochs", "2", "--lr", "1e6")) == 2
    err = capsys.readouterr().err
    assert "nothing to resume from" in err
    assert cli.main(fit_argv(workspace, out, "--epochs", "1", "--lr", "0.05")) == 0  # the plain rerun is not refused


def test_sigterm_keeps_the_checkpoint_says_one_line_and_exits_143(workspace, tmp_path):
    out = tmp_path / "run"
    argv = fit_argv(workspace, out, "--epochs", "400", "--lr", "0.01")
    process = subprocess.Popen([sys.executable, "-m", "zootune", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "train" / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("zootune: terminated (SIGTERM)") and "--resume" in lines[0]
    from zootune.engine.checkpoint import load_checkpoint

    assert load_checkpoint(out / "train" / "checkpoint.pt")["epoch"] >= 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_under_two_processes_only_rank_0_writes_and_prints(workspace, tmp_path):
    """`zootune fit` as torchrun starts it (env:// rendezvous, gloo on CPU): one model folder,
    written by rank 0; rank 1 prints nothing and takes no lock."""
    out = tmp_path / "run"
    argv = fit_argv(workspace, out, "--epochs", "1", "--device", "cpu")
    env_base = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, "-m", "zootune", *argv], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env={**env_base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in processes]
    for p, (stdout, stderr) in zip(processes, outputs):
        assert p.returncode == 0, stderr
    assert "model written to" in outputs[0][0]
    assert outputs[1][0].strip() == ""  # rank 1 prints nothing
    assert sorted(p.name for p in (out / "model").iterdir()) == ["config.json", "metrics.json", "model.safetensors"]
    assert not list(out.rglob(".*tmp*"))


def test_atomic_writes_flush_the_folder_after_the_rename(tmp_path, monkeypatch):
    """A rename is durable only once its folder is flushed: both writers fsync the folder after
    os.replace, and what they wrote reads back."""
    import os

    from zootune.atomic import atomic_write_text
    from zootune.run_folder import commit_folder

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    atomic_write_text(tmp_path / "a.txt", "hello")
    assert events.index(("fsync", str(tmp_path))) > events.index(("replace", str(tmp_path / "a.txt")))
    events.clear()
    commit_folder(tmp_path / "model", lambda tmp: (tmp / "x").write_text("y"))
    assert events.index(("fsync", str(tmp_path))) > events.index(("replace", str(tmp_path / "model")))
    assert (tmp_path / "a.txt").read_text() == "hello" and (tmp_path / "model" / "x").read_text() == "y"
