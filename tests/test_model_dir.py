"""The one model-folder format (:mod:`zootune.model_dir`), written and read by the CLI's path
(``export_info`` + ``save_model_dir`` / ``load_model_dir``) and by the Zoo-Tuning Python API
(``save_pretrained``/``load_pretrained``, ``save_folded``/``load_folded``) alike: round trips give the
same outputs, the task is recorded and rebuilt from the folder, and folders of the former Zoo-Tuning
save are read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from zootune.errors import CheckpointError, ZootuneError
from zootune.methods.registry import build_method
from zootune.methods.zoo_tuning import ZooTuning, load_folded, save_folded
from zootune.model_dir import (CONFIG_FILE, MODEL_FILE, classifier_task, export_info, load_model_dir,
                               model_task, read_model_config, save_model_dir)
from zootune.models import resnet_small
from zootune.tasks import ClassificationTask, LandmarkTask, task_for, task_from_config
from zootune.zoo import Zoo
from zootune.zoo.checkpoint import save_state_dict

ARCH, ARCH_KWARGS = "resnet_small", {"depth": 10, "width": 4, "num_classes": 7}


def _builder():
    return resnet_small(**ARCH_KWARGS)


def tiny_zoo(m: int = 3) -> list:
    zoo = []
    for seed in range(m):
        torch.manual_seed(300 + seed)
        zoo.append(_builder().eval())
    return zoo


@pytest.fixture(scope="module")
def zoo_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return [str(save_state_dict(root / f"m{i}.safetensors", member.state_dict()))
            for i, member in enumerate(tiny_zoo(2))]


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _trained(model, steps: int = 2, classes: int = 3):
    """``model`` after a few SGD steps (weights, gates, alignment, BN statistics, ā move), in eval mode."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        optimizer.zero_grad()
        outputs = model(_batch(step + 1))
        F.cross_entropy(outputs[:, :classes], torch.arange(4) % classes).backward()
        optimizer.step()
    return model.eval()


def _fine_tuned(zoo, task, train: bool = True):
    """Zoo member 0 fine-tuned for ``task`` (a few steps), finalized to the plain model it exports."""
    built = build_method("finetune", zoo, task)
    return (_trained(built) if train else built).finalize().eval()


def _same_outputs(a, b) -> None:
    x = _batch(9)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=1e-6, atol=1e-6)


def _config(folder) -> dict:
    return json.loads((folder / CONFIG_FILE).read_text())


# ------------------------------------------------------------------------------- round trips


def test_full_zoo_tuning_saves_a_method_folder_and_loads_back(tmp_path):
    zoo = tiny_zoo()
    model = _trained(ZooTuning(zoo, num_outputs=3, formulation="stacked"))
    model.save_pretrained(tmp_path / "full")
    assert {p.name for p in (tmp_path / "full").iterdir()} == {MODEL_FILE, CONFIG_FILE}
    config = _config(tmp_path / "full")
    assert config["format"] == "zootune-model" and config["kind"] == "method" and config["method"] == "zoo-tuning"
    assert config["arch"] is None and config["built"]["num_sources"] == 3
    assert config["head"] == {"type": "Linear", "in_features": 32, "out_features": 3, "bias": True}
    _same_outputs(ZooTuning.load_pretrained(tmp_path / "full", zoo), model)
    _same_outputs(ZooTuning.load_pretrained(tmp_path / "full", _builder), model)
    # the architecture is the caller's: the CLI's reader says how to load it instead
    with pytest.raises(CheckpointError, match=r"saved from Python .*ZooTuning.load_pretrained\(folder, zoo\)"):
        load_model_dir(tmp_path / "full")
    with pytest.raises(CheckpointError, match="not a folded plain one"):
        load_folded(tmp_path / "full", _builder)


def test_folded_lite_saves_a_plain_folder_and_loads_back(tmp_path):
    lite = _trained(ZooTuning(tiny_zoo(), num_outputs=3, lite=True, align="all", formulation="outputs"), steps=3)
    plain = lite.merge_and_unload().eval()
    save_folded(plain, tmp_path / "folded")
    config = _config(tmp_path / "folded")
    assert config["kind"] == "plain" and config["method"] == "lite" and config["head_name"] == "fc"
    loaded = load_folded(tmp_path / "folded", _builder)
    _same_outputs(loaded, plain)
    _same_outputs(loaded, lite)
    lite.save_pretrained(tmp_path / "lite")
    assert _config(tmp_path / "lite")["method"] == "lite"
    _same_outputs(ZooTuning.load_pretrained(tmp_path / "lite", tiny_zoo()), lite)


def test_a_plain_fine_tune_written_like_the_cli_loads_back_both_ways(tmp_path, zoo_files):
    zoo = Zoo.from_checkpoints(zoo_files, arch=ARCH, arch_kwargs=ARCH_KWARGS)
    task = ClassificationTask(3)
    model = _fine_tuned(zoo, task)
    info = export_info(model, arch=ARCH, arch_kwargs=ARCH_KWARGS, task=task, zoo_paths=zoo_files,
                       method="finetune", member=0, options={})
    assert info["kind"] == "plain" and info["task"] == {"type": "classification", "num_classes": 3}
    assert info["num_classes"] == 3
    save_model_dir(tmp_path / "model", model, info)
    loaded, read = load_model_dir(tmp_path / "model")
    _same_outputs(loaded, model)
    assert isinstance(model_task(read), ClassificationTask) and classifier_task(read, "predict").num_classes == 3
    _same_outputs(load_folded(tmp_path / "model", _builder), model)  # the task gives load_folded the head
    with pytest.raises(CheckpointError, match="written by `zootune fit`"):
        ZooTuning.load_pretrained(tmp_path / "model", zoo)


def test_a_method_folder_is_rebuilt_without_importing_the_experiment(tmp_path, zoo_files):
    zoo = Zoo.from_checkpoints(zoo_files, arch=ARCH, arch_kwargs=ARCH_KWARGS)
    torch.manual_seed(0)
    model = _trained(build_method("zoo-tuning", zoo, ClassificationTask(3), options={"formulation": "grouped"}))
    info = export_info(model, arch=ARCH, arch_kwargs=ARCH_KWARGS, task=ClassificationTask(3), zoo_paths=zoo_files,
                       method="zoo-tuning", member=None, options={"formulation": "grouped"})
    assert info["kind"] == "method"
    save_model_dir(tmp_path / "model", model, info)
    _same_outputs(load_model_dir(tmp_path / "model")[0], model)
    code = ("import sys; from zootune.model_dir import load_model_dir; "
            f"load_model_dir({str(tmp_path / 'model')!r}); print('zootune.experiment' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


# ------------------------------------------------------------------------------- the task


def test_a_landmark_model_records_its_task_and_is_rebuilt_with_its_head(tmp_path, zoo_files):
    zoo = Zoo.from_checkpoints(zoo_files, arch=ARCH, arch_kwargs=ARCH_KWARGS)
    task = LandmarkTask(3, normalisation="bbox", landmark_names=("a", "b", "c"))
    torch.manual_seed(0)
    model = _fine_tuned(zoo, task, train=False)
    info = export_info(model, arch=ARCH, arch_kwargs=ARCH_KWARGS, task=task, zoo_paths=zoo_files,
                       method="finetune", member=0, options={})
    assert info["kind"] == "plain" and "num_classes" not in info and info["task"] == task.to_config()
    save_model_dir(tmp_path / "model", model, info)
    loaded, read = load_model_dir(tmp_path / "model")
    _same_outputs(loaded, model)
    rebuilt = model_task(read)
    assert isinstance(rebuilt, LandmarkTask) and rebuilt.to_config() == task.to_config()
    with pytest.raises(ZootuneError, match="^predict applies image classifiers; this model folder holds a landmarks model$"):
        classifier_task(read, "predict")


def test_an_older_config_without_task_is_a_classifier_of_num_classes(tmp_path, zoo_files):
    zoo = Zoo.from_checkpoints(zoo_files, arch=ARCH, arch_kwargs=ARCH_KWARGS)
    model = _fine_tuned(zoo, ClassificationTask(3))
    info = export_info(model, arch=ARCH, arch_kwargs=ARCH_KWARGS, task=ClassificationTask(3), zoo_paths=zoo_files,
                       method="finetune", member=0, options={})
    del info["task"]  # as written before model folders recorded their task: num_classes alone
    save_model_dir(tmp_path / "model", model, info)
    loaded, read = load_model_dir(tmp_path / "model")
    _same_outputs(loaded, model)
    assert read["task"] == {"type": "classification", "num_classes": 3}


def test_task_records_and_their_refusals():
    for task in (ClassificationTask(4), LandmarkTask(5, eye_indices=(1, 3), beta=0.5)):
        assert task_from_config(task.to_config()).to_config() == task.to_config()
    for record, message in (({"type": "segmentation"}, "unknown task type 'segmentation'; known: classification"),
                            ({"type": "classification"}, "missing 1 required positional argument: 'num_classes'"),
                            ({"type": "classification", "num_classes": "4"}, "must be an integer"),
                            ("classification", "must be recorded as a JSON object")):
        with pytest.raises(ZootuneError, match=message) as caught:
            task_from_config(record)
        assert "\n" not in str(caught.value)


def test_the_task_of_data_splits_is_theirs_else_classification_of_their_classes():
    from types import SimpleNamespace

    landmarks = LandmarkTask(2)
    assert task_for(SimpleNamespace(task=landmarks, num_classes=0)) is landmarks
    task = task_for(SimpleNamespace(num_classes=6))
    assert isinstance(task, ClassificationTask) and task.num_classes == 6


# ------------------------------------------------------------------------------- the former format


def _write_former_folder(folder, module, config: dict) -> None:
    """A folder as zoo_tuning/io.py wrote it before the one format: safetensors without metadata and
    config.json dumped with indent=2, sorted keys."""
    folder.mkdir(parents=True)
    save_file({name: t.detach().contiguous() for name, t in module.state_dict().items()}, folder / MODEL_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))


def test_a_former_zoo_tuning_folder_is_read(tmp_path):
    zoo = tiny_zoo(4)
    model = _trained(ZooTuning(zoo, num_outputs=3, member_scores=[1.0, 9.0, 8.5, 0.0], prune_margin=2.0,
                               formulation="grouped"))
    built = model.config
    assert built.kept_members == [1, 2]
    _write_former_folder(tmp_path / "old", model, {
        "zootune_version": "0.1.0",
        "format": "zoo-tuning",
        "lite": False,
        "options": model.rebuild_options().to_dict(),
        "num_sources": 2,
        "kept_members": [1, 2],
        "num_zoo_members": 4,
        "built": built.to_dict(),
        "architecture": {"class": "ResNet", "module": "zootune.models.resnet"},
        "head": {"type": "Linear", "in_features": 32, "out_features": 3, "bias": True},
    })
    for source in (zoo, zoo[1:3], _builder):
        _same_outputs(ZooTuning.load_pretrained(tmp_path / "old", source), model)
    info = read_model_config(tmp_path / "old")
    assert info["format"] == "zootune-model" and info["kind"] == "method" and info["method"] == "zoo-tuning"
    with pytest.raises(CheckpointError, match="ZooTuning.load_pretrained"):
        load_model_dir(tmp_path / "old")


def test_a_former_folded_folder_is_read(tmp_path):
    lite = _trained(ZooTuning(tiny_zoo(), num_outputs=3, lite=True, formulation="outputs"))
    plain = lite.merge_and_unload().eval()
    _write_former_folder(tmp_path / "old", plain, {
        "zootune_version": "0.1.0",
        "method": "lite",
        "format": "plain",
        "architecture": {"class": "ResNet", "module": "zootune.models.resnet"},
        "head_name": "fc",
        "head": {"type": "Linear", "in_features": 32, "out_features": 3, "bias": True},
    })
    _same_outputs(load_folded(tmp_path / "old", _builder), plain)
    with pytest.raises(CheckpointError, match="not a Zoo-Tuning one saved by save_pretrained"):
        ZooTuning.load_pretrained(tmp_path / "old", tiny_zoo())
    with pytest.raises(CheckpointError, match=r"load_folded\(folder, builder\)"):
        load_model_dir(tmp_path / "old")
