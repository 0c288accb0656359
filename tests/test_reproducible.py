"""The same command, seed and machine give the same model, bit for bit: `zootune fit` (default
method, default options) twice in separate processes, with the user's formulation cache shared as it
is between a user's runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zootune.models import resnet_small
from zootune.zoo.checkpoint import save_state_dict

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def _folder(root: Path, classes=3, per_class=24, size=16):
    g = torch.Generator().manual_seed(0)
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(size, size, 3, generator=g) * 160 + 40 * k).clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / f"c{k}" / f"{i}.png")


def test_fit_twice_in_separate_processes_writes_byte_identical_models(tmp_path):
    for i in range(2):
        torch.manual_seed(i)
        save_state_dict(tmp_path / f"m{i}.safetensors", resnet_small(num_classes=3, depth=10, width=8).state_dict())
    _folder(tmp_path / "data")
    env = {**os.environ, "ZOOTUNE_CACHE": str(tmp_path / "cache")}
    outputs = []
    for run in ("a", "b"):
        argv = [sys.executable, "-m", "zootune", "fit", "--arch", "resnet_small", "--arch-option", "depth=10",
                "--arch-option", "width=8", "--zoo", tmp_path / "m0.safetensors", tmp_path / "m1.safetensors",
                "--data", tmp_path / "data", "--epochs", "2", "--no-progress", "--seed", "3",
                "--out", tmp_path / run]
        done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr
        outputs.append(tmp_path / run / "model")
    assert list((tmp_path / "cache" / "formulations").glob("*.json"))  # the first run's timed choices
    for name in ("model.safetensors", "metrics.json"):
        a, b = (out / name for out in outputs)
        if name == "metrics.json":  # seconds differ; everything measured must not
            a, b = ({k: v for k, v in json.loads(p.read_text()).items() if k != "seconds"} for p in (a, b))
            assert a == b
        else:
            assert a.read_bytes() == b.read_bytes()
