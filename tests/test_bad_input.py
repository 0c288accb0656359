"""Bad input through the real CLI entry point: one ``zootune: error:`` line, exit code 2, no
traceback, nothing left behind that breaks a rerun -- and nothing executed from a model folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zootune.cli import main as cli
from zootune.models import resnet_small
from zootune.zoo.checkpoint import save_state_dict

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

ARCH = ["--arch", "resnet_small", "--arch-option", "depth=10", "--arch-option", "width=4"]
FAST = ["--epochs", "1", "--batch-size", "8", "--max-steps-per-epoch", "2", "--no-progress"]


def _images(root: Path, classes=("a", "b"), per_class=6, size=12):
    g = torch.Generator().manual_seed(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (torch.rand(size, size, 3, generator=g) * 120 + 100 * k).clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    for i in range(2):
        torch.manual_seed(i)
        save_state_dict(root / f"m{i}.safetensors", resnet_small(num_classes=3, depth=10, width=4).state_dict())
    _images(root / "data")
    out = root / "fitted"
    assert cli.main([str(a) for a in ["fit", *ARCH, "--zoo", root / "m0.safetensors", root / "m1.safetensors",
                                      "--data", root / "data", "--method", "finetune", *FAST, "--out", out]]) == 0
    return root


def run_cli(argv, cwd=None):
    """The real entry point in a fresh process: exit code, stdout, stderr."""
    done = subprocess.run([sys.executable, "-m", "zootune", *map(str, argv)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)
    return done.returncode, done.stdout, done.stderr


def assert_one_line_error(code, stderr, *fragments):
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("zootune: error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def _model_dir_with(ws: Path, tmp_path: Path, **changes) -> Path:
    """A copy of the fitted model folder whose config.json has ``changes`` applied (None: delete)."""
    folder = tmp_path / "model"
    folder.mkdir()
    source = ws / "fitted" / "model"
    (folder / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    config = json.loads((source / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# ----------------------------------------------------------------------------- no code from data

@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_a_model_folder_naming_code_does_not_run_it(ws, tmp_path, command):
    marker = tmp_path / "MARKER"
    folder = _model_dir_with(ws, tmp_path, arch="os:system", arch_kwargs={"command": f"touch {marker}"})
    argv = [command, folder, *(["--data", ws / "data"] if command == "evaluate" else ["--out", tmp_path / "x"])]
    code, _, err = run_cli(argv)
    assert_one_line_error(code, err, "names code to import", "--trust-code")
    assert not marker.exists()


def test_trust_code_lets_a_harmless_builder_load(ws, tmp_path):
    folder = _model_dir_with(ws, tmp_path, arch="zootune.models:resnet_small")
    code, _, err = run_cli(["evaluate", folder, "--data", ws / "data"])
    assert_one_line_error(code, err, "names code to import")
    code, out, err = run_cli(["evaluate", folder, "--data", ws / "data", "--trust-code"])
    assert code == 0, err
    assert "acc" in out
