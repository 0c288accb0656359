"""Zoos by name through timm's and torchvision's own pretrained machinery -- nothing downloaded.

The conftest points TORCH_HOME and HF_HOME into an empty temporary folder and switches the hub
offline; each test puts the files it needs where the libraries look for them (torchvision's
``$TORCH_HOME/hub/checkpoints/<file of the weights' url>``, a Hugging Face snapshot written by timm's
own ``save_for_hf``) or hands a local file over (``NAME=PATH``, timm's
``pretrained_cfg_overlay=dict(file=...)``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from interop_helpers import CLASSES, images, needs_both, needs_timm, needs_torchvision

import zootune.cli.main as cli
from zootune.errors import CheckpointError, ZooMismatchError, ZootuneError
from zootune.methods.hub_pathway import HubPathway
from zootune.zoo import Hub
from zootune.zoo import NotCachedError, Zoo, data_config, load_pretrained, save_state_dict


def torchvision_cache_file(monkeypatch, tmp_path, arch: str, weights: str, model=None) -> Path:
    """A random ``arch`` model's weights where torchvision looks for the download of ``weights``."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    member = torchvision.models.get_model_weights(arch)[weights]
    path = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(member.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(11)
    model = model or torchvision.models.get_model(arch, weights=None, num_classes=len(member.meta["categories"]))
    torch.save(model.state_dict(), path)
    return path


def timm_file(tmp_path, arch: str, seed: int = 0, name: str = "weights.safetensors") -> Path:
    import timm

    torch.manual_seed(seed)
    path = tmp_path / name
    save_state_dict(path, timm.create_model(arch).state_dict())
    return path


@needs_torchvision
def test_torchvision_member_from_its_own_cache(monkeypatch, tmp_path):
    path = torchvision_cache_file(monkeypatch, tmp_path, "resnet18", "IMAGENET1K_V1")
    zoo = Zoo.from_pretrained(["torchvision:resnet18.IMAGENET1K_V1"])
    expected = torch.load(path, weights_only=True)
    assert all(torch.equal(zoo[0].state_dict()[k], v) for k, v in expected.items())
    assert zoo.origins == (str(path),) and zoo.architecture == "torchvision:resnet18"
    # the checkpoint's own preprocessing: torchvision's ResNet18_Weights.IMAGENET1K_V1.transforms()
    assert data_config(zoo) == {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                                "input_size": (3, 224, 224), "interpolation": "bilinear", "crop_pct": 224 / 256}


@needs_timm
def test_timm_member_from_a_local_file_keeps_its_pretrained_config(tmp_path):
    path = timm_file(tmp_path, "resnet18")
    zoo = Zoo.from_pretrained([f"timm:resnet18.a1_in1k={path}"])
    from safetensors.torch import load_file

    saved = load_file(path)
    assert all(torch.equal(zoo[0].state_dict()[k], v) for k, v in saved.items())
    assert zoo.names == ["timm:resnet18.a1_in1k"] and zoo.origins == (str(path),)
    config = data_config(zoo)  # timm.data.resolve_data_config of resnet18.a1_in1k
    assert config["interpolation"] == "bicubic" and config["crop_pct"] == 0.95


@needs_timm
def test_hf_hub_member_from_the_hub_cache(tmp_path):
    import timm
    from huggingface_hub import constants
    from timm.models._hub import save_for_hf

    torch.manual_seed(3)
    model = timm.create_model("resnet18", num_classes=5)
    repo = Path(constants.HF_HUB_CACHE) / "models--zootune-test--tiny-resnet"
    commit = "0123456789abcdef0123456789abcdef01234567"
    save_for_hf(model, str(repo / "snapshots" / commit), safe_serialization=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    zoo = Zoo.from_pretrained(["hf-hub:zootune-test/tiny-resnet"])
    assert all(torch.equal(zoo[0].state_dict()[k], v) for k, v in model.state_dict().items())
    assert zoo.architecture == "timm:resnet18" and zoo[0].num_classes == 5


@needs_both
@pytest.mark.parametrize("name, what", [
    ("timm:resnet18.a1_in1k", "timm.create_model('resnet18.a1_in1k', pretrained=True)"),
    ("torchvision:resnet50.IMAGENET1K_V2", "get_model('resnet50', weights='IMAGENET1K_V2')"),
    ("hf-hub:zootune-test/not-cached", "timm.create_model('hf-hub:zootune-test/not-cached', pretrained=True)"),
])
def test_offline_member_not_cached_is_one_line_naming_it_and_how_to_fetch_it(name, what, tmp_path, monkeypatch,
                                                                             capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(NotCachedError) as raised:
        Zoo.from_pretrained([name])
    message = str(raised.value)
    assert "\n" not in message and name in message and "not in the local cache" in message
    assert what in message and f"{name}=PATH" in message
    (tmp_path / "data" / "c0").mkdir(parents=True)  # the CLI says the same in one line, exit 2
    code = cli.main(["fit", "--zoo", name, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("zootune: error: ") and name in err


@needs_both
def test_one_architecture_from_both_libraries_makes_one_zoo_with_both_preprocessings(monkeypatch, tmp_path):
    # timm's ResNet-50 and torchvision's are one network with one key layout: the torchvision member
    # is loaded into timm's class, after checking both compute the same outputs.
    path = torchvision_cache_file(monkeypatch, tmp_path, "resnet50", "IMAGENET1K_V2")
    timm_weights = timm_file(tmp_path, "resnet50", seed=1)
    with pytest.warns(UserWarning, match="different preprocessing"):
        zoo = Zoo.from_pretrained([f"timm:resnet50.a1_in1k={timm_weights}", "torchvision:resnet50.IMAGENET1K_V2"])
    assert type(zoo[0]) is type(zoo[1]) and type(zoo[0]).__module__.startswith("timm")
    import torchvision

    reference = torchvision.models.resnet50()
    reference.load_state_dict(torch.load(path, weights_only=True))
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(zoo[1].eval()(x), reference.eval()(x), rtol=1e-5, atol=1e-5)
    notes = zoo.preprocessing_notes
    assert len(notes) == 1 and "interpolation bilinear (vs bicubic)" in notes[0]
    assert zoo.data_config.interpolation == "bicubic"  # the first member's, as the warning says


@needs_both
def test_mixed_architectures_make_a_hub_not_a_zoo(monkeypatch, tmp_path):
    torchvision_cache_file(monkeypatch, tmp_path, "resnet18", "IMAGENET1K_V1")
    vit = timm_file(tmp_path, "vit_tiny_patch16_224", name="vit.safetensors")
    names = ["torchvision:resnet18.IMAGENET1K_V1", f"timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k={vit}"]
    with pytest.raises(ZooMismatchError, match="share one architecture.*zootune.Hub"):
        Zoo.from_pretrained(names)
    models = load_pretrained(names)
    hub = Hub(models)
    assert hub.names == ["torchvision:resnet18.IMAGENET1K_V1", "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k"]
    model = HubPathway(hub, CLASSES, input_shape=(3, 224, 224))
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 224, 224)).shape == (2, CLASSES)


@needs_torchvision
def test_a_cached_file_that_would_run_code_is_refused(monkeypatch, tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "pwned"),))

    path = torchvision_cache_file(monkeypatch, tmp_path, "resnet18", "IMAGENET1K_V1")
    torch.save({"state_dict": Payload()}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        Zoo.from_pretrained(["torchvision:resnet18.IMAGENET1K_V1"])
    assert not (tmp_path / "pwned").exists()


@needs_both
def test_unknown_names_are_one_line_errors():
    for name, fragment in (("timm:resnet18.nope", "no pretrained weights"), ("timm:no_such_net", "no architecture"),
                           ("torchvision:resnet18.NOPE", "no weights 'NOPE'"), ("torchvision:nonet", "no architecture")):
        with pytest.raises(ZootuneError, match=fragment) as raised:
            Zoo.from_pretrained([name])
        assert "\n" not in str(raised.value)


@needs_both
@pytest.mark.filterwarnings("ignore:zoo members expect different preprocessing")
def test_cli_fit_by_name_exports_a_model_that_evaluates_from_the_names(monkeypatch, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    torchvision_cache_file(monkeypatch, tmp_path, "resnet18", "IMAGENET1K_V1")
    weights = timm_file(tmp_path, "resnet18", seed=2)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            (tmp_path / "data" / split / f"c{c}").mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / f"c{c}" / f"{i}.png")
    names = [f"timm:resnet18.a1_in1k={weights}", "torchvision:resnet18.IMAGENET1K_V1"]
    argv = ["fit", "--zoo", *names, "--data", tmp_path / "data", "--method", "zoo-tuning", "--option",
            "formulation=grouped", "--epochs", "1", "--batch-size", "4", "--image-size", "32",
            "--max-steps-per-epoch", "1", "--no-progress", "--out", tmp_path / "run"]
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr().out
    assert code == 0
    assert "the checkpoints' preprocessing: mean (0.485, 0.456, 0.406)" in out and "20 layer(s) aggregated" in out
    info = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert info["zoo"] == names and info["arch"] == "timm:resnet18" and info["kind"] == "method"
    code = cli.main(["evaluate", str(tmp_path / "run" / "model"), "--data", str(tmp_path / "data")])
    assert code == 0 and "acc" in capsys.readouterr().out


@needs_timm
def test_cli_aggregates_the_linear_layers_of_a_timm_vit(tmp_path, capsys):
    import numpy as np
    import timm
    from PIL import Image

    zoo = []
    for seed in range(2):
        torch.manual_seed(seed)
        zoo.append(tmp_path / f"vit{seed}.safetensors")
        save_state_dict(zoo[-1], timm.create_model("vit_tiny_patch16_224", img_size=32).state_dict())
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "data" / f"c{c}" / f"{i}.png")
    common = ["fit", "--arch", "timm:vit_tiny_patch16_224", "--arch-option", "img_size=32", "--zoo", *zoo,
              "--data", tmp_path / "data", "--method", "lite", "--epochs", "1", "--batch-size", "4",
              "--image-size", "32", "--max-steps-per-epoch", "1", "--no-progress"]
    code = cli.main([str(a) for a in [*common, "--out", tmp_path / "conv"]])
    captured = capsys.readouterr()
    assert code == 0 and "warning: Zoo-Tuning aggregates only 2.7%" in captured.err  # one line, by the CLI
    assert "1 layer(s) aggregated" in captured.out  # the patch embedding alone
    code = cli.main([str(a) for a in [*common, "--aggregate", "conv,linear", "--out", tmp_path / "both"]])
    out = capsys.readouterr().out
    assert code == 0 and "49 layer(s) aggregated" in out  # + qkv, proj, fc1, fc2 of 12 blocks
