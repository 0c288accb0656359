"""The CLI's zoo options (issue 14): --aggregate, pretrained names in --zoo, the method list in
`fit --help`, architectures known without imports. Pretrained names are loaded for real in the
interop lane (tests/interop); here only what needs neither timm nor torchvision."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import zootune.cli.main as cli
from zootune.methods.registry import available_methods
from zootune.zoo import save_state_dict

FAST = ["--epochs", "1", "--batch-size", "8", "--image-size", "16", "--max-steps-per-epoch", "1", "--no-progress"]
ARCH = ["--arch", f"{__name__}:tiny_net", "--trust-code"]  # this module is importable by name under pytest


class TinyNet(nn.Module):
    """A conv, a hidden Linear and a Linear head: what --aggregate chooses between."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.hidden = nn.Linear(4, 64)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(torch.relu(self.hidden(h)))


def tiny_net(num_classes: int = 10) -> TinyNet:
    return TinyNet(num_classes)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-zoo")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c in range(2):
            (root / "data" / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                image = rng.uniform(0, 255, (16, 16, 3)).astype(np.uint8)
                Image.fromarray(image).save(root / "data" / split / f"c{c}" / f"{i}.png")
    torch.manual_seed(0)
    for i in range(2):
        save_state_dict(root / f"m{i}.safetensors", tiny_net().state_dict())
    return root


def run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *fragments):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("zootune: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def fit(workspace, out, *extra):
    return ["fit", *ARCH, "--zoo", workspace / "m0.safetensors", workspace / "m1.safetensors",
            "--data", workspace / "data", *FAST, "--out", out, *extra]


def test_fit_help_lists_every_registered_method(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["fit", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for name in available_methods():
        assert name in out, name


@pytest.mark.filterwarnings("ignore:Zoo-Tuning aggregates only")
def test_aggregate_linear_reaches_the_method_and_the_report_is_printed(workspace, tmp_path, capsys):
    code, out, _ = run_cli(fit(workspace, tmp_path / "conv", "--method", "lite"), capsys)
    assert code == 0
    assert "1 layer(s) aggregated" in out and "Linear layers are not in target_types" in out
    code, out, _ = run_cli(fit(workspace, tmp_path / "both", "--method", "zoo-tuning", "--aggregate", "conv,linear"),
                           capsys)
    assert code == 0
    assert "2 layer(s) aggregated" in out  # conv and hidden; fc is the new head
    info = json.loads((tmp_path / "both" / "model" / "config.json").read_text())
    assert info["options"]["target_types"] == ["conv", "linear"]
    # the saved full model is rebuilt from the zoo with the same options, and evaluates
    code, out, _ = run_cli(["evaluate", tmp_path / "both" / "model", "--data", workspace / "data", "--trust-code"],
                           capsys)
    assert code == 0 and "acc" in out
    # the same through --option, which used to end in a traceback
    code, _, err = run_cli(fit(workspace, tmp_path / "opt", "--option", 'target_types=["Linear"]'), capsys)
    assert code == 0, err


def test_aggregate_applies_to_the_methods_that_declare_a_layer_types_option():
    """--aggregate reads MethodSpec.layer_types_option, not an option name: the Zoo-Tuning family
    declares it; a method that does not is refused, whatever its options are called."""
    declared = {name: spec.layer_types_option for name, spec in available_methods().items()
                if spec.layer_types_option is not None}
    assert declared == {name: "target_types" for name in ("zoo-tuning", "lite", "zoo-tuning-paper", "lite-paper")}
    from dataclasses import replace

    from zootune.errors import ZootuneError

    lite = available_methods()["lite"]
    options = {}
    cli._add_layer_types(replace(lite, layer_types_option="layers"), options, ["conv"])
    assert options == {"layers": ["conv"]}
    with pytest.raises(ZootuneError, match="aggregates no layers"):
        cli._add_layer_types(replace(lite, layer_types_option=None), {}, ["conv"])


@pytest.mark.parametrize("extra, fragments", [
    (["--aggregate", "conv,lnear"], ["unknown layer type 'lnear'", "conv, conv1d"]),
    (["--aggregate", ","], ["give at least one layer type"]),
    (["--method", "finetune", "--aggregate", "conv"], ["aggregates no layers"]),
    (["--aggregate", "linear", "--option", "target_types=conv"], ["once"]),
])
def test_bad_aggregate_gives_one_line(extra, fragments, workspace, tmp_path, capsys):
    code, _, err = run_cli(fit(workspace, tmp_path / "out", *extra), capsys)
    one_line_error(code, err, *fragments)


def test_zoo_names_and_files_are_checked_before_loading(workspace, tmp_path, capsys):
    data = ["--data", workspace / "data", "--out", tmp_path / "o"]
    code, _, err = run_cli(["fit", "--zoo", workspace / "m0.safetensors", *data], capsys)
    one_line_error(code, err, "--arch is required")
    code, _, err = run_cli(["fit", "--zoo", "timm:resnet18.a1_in1k", workspace / "m0.safetensors", *data], capsys)
    one_line_error(code, err, "mixes pretrained names")
    code, _, err = run_cli(["fit", *ARCH, "--zoo", "timm:resnet18.a1_in1k", *data], capsys)
    one_line_error(code, err, "drop --arch")


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed here (interop lane)")
def test_pretrained_name_without_the_library_says_what_to_install(workspace, tmp_path, capsys):
    code, _, err = run_cli(["fit", "--zoo", "timm:resnet18.a1_in1k", "--data", workspace / "data",
                            "--out", tmp_path / "o"], capsys)
    one_line_error(code, err, "needs timm", "pip install timm")


def test_every_architecture_the_docs_name_is_registered_without_importing_it():
    code = (
        "import sys\n"
        "from zootune.models import resolve_arch\n"
        "from zootune.models import ARCHITECTURES\n"
        "names = ['resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet_small', 'resnet10_small',\n"
        "         'resnet18_small', 'vit_tiny32', 'mixer_tiny32', 'minizoo_resnet10_w8', 'minatar_qnet']\n"
        "missing = [n for n in names if n not in ARCHITECTURES]\n"
        "assert not missing, missing\n"
        "assert 'zootune.minizoo.store' not in sys.modules and 'zootune.rl.qnet' not in sys.modules\n"
        "model = resolve_arch('minizoo_resnet10_w8')(num_classes=3)\n"
        "assert sum(p.numel() for p in model.parameters()) > 0\n"
        "from zootune.minizoo.store import ARCH_NAME\n"
        "assert ARCH_NAME == 'minizoo_resnet10_w8'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_named_zoo_brings_its_preprocessing_to_training_and_to_the_export(tmp_path):
    """What `fit` normalises with for a zoo by name: the checkpoints' mean/std/crop, recorded in the
    exported config.json so that `evaluate` reads images the same way."""
    from zootune.cli.main import _preprocessing
    from zootune.data.image_folder import load_image_folder
    from zootune.errors import CheckpointError
    from zootune.model_dir import check_model_config
    from zootune.models import resnet_small
    from zootune.zoo import Zoo
    from zootune.zoo.preprocessing import DataConfig

    config = DataConfig(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=(3, 16, 16),
                        interpolation="bilinear", crop_pct=1.0)
    zoo = Zoo([resnet_small(depth=10, width=4)], ["m0"], data_configs=[config])
    chosen = _preprocessing(zoo)
    assert chosen == {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "crop_fraction": 1.0}
    assert _preprocessing(Zoo.from_modules([resnet_small(depth=10, width=4)])) == {}  # defaults
    for name, value in (("a", 0), ("b", 255)):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (value,) * 3).save(tmp_path / "data" / name / f"{i}.png")
    splits = load_image_folder(tmp_path / "data", image_size=16, augment="none", **chosen)
    x, _ = splits.val[0]
    assert torch.allclose(x.abs().max(), torch.tensor(2.0))  # (0 - 0.5) / 0.25 or (1 - 0.5) / 0.25
    info = {"format": "zootune-model", "kind": "plain", "arch": "resnet_small", "num_classes": 2, "method": "finetune",
            "preprocessing": chosen}
    check_model_config(info, "config.json")
    with pytest.raises(CheckpointError, match="preprocessing"):
        check_model_config({**info, "preprocessing": {"mean": "grey"}}, "config.json")
    with pytest.raises(CheckpointError, match="unknown preprocessing field"):
        check_model_config({**info, "preprocessing": {"resize": "bicubic"}}, "config.json")
