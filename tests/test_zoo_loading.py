"""Zoo loading: the paper's five checkpoint layouts, overrides, and refusals with clear messages."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from zootune.errors import CheckpointError, ZooMismatchError, ZootuneError
from zootune.models import resnet50, resnet_small
from zootune.zoo import Zoo, detect_prefix, load_state_dict_file, read_safetensors_metadata, save_state_dict


def _without_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _marked(state: dict[str, torch.Tensor], mark: float) -> dict[str, torch.Tensor]:
    """The state with conv1 (and the head) shifted by ``mark`` so each file's member is recognisable."""
    out = dict(state)
    for key in ("conv1.weight", "fc.weight", "fc.bias"):
        if key in state:
            out[key] = state[key] + mark
    return out


def write_layouts(state: dict[str, torch.Tensor], folder: Path, legacy: bool = False) -> dict[str, tuple[Path, dict]]:
    """The five files of the paper's zoo, each in its real key layout; returns name -> (path, backbone).

    ``legacy`` writes torch's pre-1.6 (non-zip) format, in which the paper's 2019-era files are.
    """
    body = _without_head(state)

    def save(obj, path):
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)

    files: dict[str, tuple[Path, dict]] = {}

    # ImageNet supervised (torchvision): raw keys, with the 1000-way classifier.
    sup = _marked(state, 1.0)
    files["resnet50-19c8e357"] = (folder / "resnet50-19c8e357.pth", sup)
    save(sup, files["resnet50-19c8e357"][0])

    # MoCo: DataParallel-wrapped query and momentum encoders, the queue, nested under 'state_dict'.
    query, key = _marked(state, 2.0), _marked(state, 20.0)
    moco_state = {f"module.encoder_q.{k}": v for k, v in query.items()}
    moco_state.update({f"module.encoder_k.{k}": v for k, v in key.items()})
    moco_state["module.queue"] = torch.randn(128, 64)
    moco_state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    files["moco_v1_200ep_pretrain"] = (folder / "moco_v1_200ep_pretrain.pth.tar", query)
    save({"epoch": 200, "arch": "resnet50", "state_dict": moco_state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.03}]}},
               files["moco_v1_200ep_pretrain"][0])

    # Mask R-CNN / Keypoint R-CNN: FrozenBatchNorm2d backbone (no num_batches_tracked) + FPN/RPN/heads.
    for name, mark, task_head in (("maskrcnn_resnet50_fpn_coco-bf2d0c1e", 3.0, "mask_predictor.mask_fcn_logits"),
                                  ("keypointrcnn_resnet50_fpn_coco-fc266e95", 4.0, "keypoint_predictor.kps_score_lowres")):
        frozen_bn = {k: v for k, v in _marked(body, mark).items() if not k.endswith("num_batches_tracked")}
        detection = {f"backbone.body.{k}": v for k, v in frozen_bn.items()}
        detection.update({
            "backbone.fpn.inner_blocks.0.0.weight": torch.randn(8, 4, 1, 1),
            "backbone.fpn.layer_blocks.0.0.weight": torch.randn(8, 8, 3, 3),
            "rpn.head.conv.0.0.weight": torch.randn(8, 8, 3, 3),
            "roi_heads.box_head.fc6.weight": torch.randn(16, 8),
            f"roi_heads.{task_head}.weight": torch.randn(5, 8, 1, 1),
        })
        files[name] = (folder / f"{name}.pth", frozen_bn)
        save(detection, files[name][0])

    # DeepLabV3: backbone.* with its segmentation and auxiliary heads beside it.
    seg = _marked(body, 5.0)
    deeplab = {f"backbone.{k}": v for k, v in seg.items()}
    deeplab.update({"classifier.0.convs.0.0.weight": torch.randn(8, 8, 1, 1),
                    "classifier.4.weight": torch.randn(21, 8, 1, 1),
                    "aux_classifier.0.weight": torch.randn(8, 8, 3, 3),
                    "aux_classifier.4.bias": torch.randn(21)})
    files["deeplabv3_resnet50_coco-cd0a2569"] = (folder / "deeplabv3_resnet50_coco-cd0a2569.pth", seg)
    save(deeplab, files["deeplabv3_resnet50_coco-cd0a2569"][0])
    return files


def assert_member_holds(member: nn.Module, written: dict[str, torch.Tensor], fresh: nn.Module) -> None:
    loaded = member.state_dict()
    for key, value in loaded.items():
        if key.startswith("fc."):
            # Heads are never taken from the checkpoint: the member keeps the architecture's own
            # (built with the zoo's fixed seed, like ``new_model()``).
            assert torch.equal(value, fresh.state_dict()[key]), key
            assert key not in written or not torch.equal(value, written[key]), key
        elif key in written:
            assert torch.equal(value, written[key]), key
        else:
            assert key.endswith("num_batches_tracked"), f"{key} was not loaded"


@pytest.fixture(scope="module")
def resnet50_state() -> dict[str, torch.Tensor]:
    model = resnet50()
    # Non-trivial BN statistics, so a buffer that is not loaded would show.
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if buf.is_floating_point():
                buf.copy_(torch.rand_like(buf) + 0.5)
            else:
                buf.fill_(7)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _small_state(**kw) -> dict[str, torch.Tensor]:
    model = resnet_small(**kw)
    with torch.no_grad():
        for buf in model.buffers():
            buf.copy_(torch.rand_like(buf.float()).to(buf.dtype) + 1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_paper_five_resnet50_layouts_load_as_they_are(resnet50_state, tmp_path):
    files = write_layouts(resnet50_state, tmp_path)
    zoo = Zoo.from_checkpoints([path for path, _ in files.values()], arch="resnet50")
    assert zoo.names == list(files)
    assert zoo.head_name == "fc"
    fresh = zoo.new_model()
    for member, (path, written) in zip(zoo, files.values()):
        assert type(member).__name__ == "ResNet"
        assert_member_holds(member, written, fresh)


@pytest.mark.parametrize("suffix", [".pth", ".pth-legacy", ".safetensors"])
def test_small_resnet_layouts_and_safetensors(tmp_path, suffix):
    state = _small_state()
    files = write_layouts(state, tmp_path, legacy=suffix == ".pth-legacy")
    paths = []
    for name, (path, written) in files.items():
        if suffix == ".safetensors":
            flat = load_state_dict_file(path)
            path = save_state_dict(tmp_path / f"{name}.safetensors", flat)
        paths.append(path)
    zoo = Zoo.from_checkpoints(paths, arch="resnet10_small", arch_kwargs={"num_classes": 10})
    assert zoo.names == list(files)
    # picklable (spawned workers receive the zoo), builder included
    copied = pickle.loads(pickle.dumps(zoo))
    assert copied.names == zoo.names and torch.equal(copied.new_model().fc.weight, zoo.new_model().fc.weight)
    fresh = zoo.new_model()
    for member, (_, written) in zip(zoo, files.values()):
        assert_member_holds(member, written, fresh)


def test_moco_ambiguity_goes_to_query_encoder_and_override_can_pick_the_key_encoder(tmp_path):
    state = _small_state()
    files = write_layouts(state, tmp_path)
    moco_path, query = files["moco_v1_200ep_pretrain"]
    raw = load_state_dict_file(moco_path)
    for keys in (list(raw), sorted(raw)):  # file order, and sorted as safetensors stores them
        prefix, covered, tied = detect_prefix(keys, set(_without_head(state)))
        assert (prefix, tied) == ("module.encoder_q.", ["module.encoder_k."])
        assert covered == len(_without_head(state))

    zoo = Zoo.from_checkpoints([moco_path], arch="resnet10_small", remap="module.encoder_k.")
    expected_key_encoder = state["conv1.weight"] + 20.0
    assert torch.equal(zoo[0].conv1.weight, expected_key_encoder)


def test_callable_remap_and_keep_head(tmp_path):
    state = _small_state()
    custom = {f"net.trunk.{k}": v for k, v in state.items()}
    custom["net.trunk.proj.weight"] = torch.randn(3, 3)  # a part the architecture does not have
    path = tmp_path / "custom.pt"
    torch.save({"model": custom, "best_acc1": torch.tensor(71.0)}, path)

    def rename(key: str) -> str | None:
        if key == "net.trunk.proj.weight":
            return None
        return key.removeprefix("net.trunk.")

    zoo = Zoo.from_checkpoints([path], arch="resnet10_small", remap=rename, keep_head=True)
    for key, value in zoo[0].state_dict().items():
        assert torch.equal(value, state[key]), key
    # Without the function the extra key is reported, not silently dropped.
    with pytest.raises(CheckpointError, match=r"custom\.pt.*does not have: proj\.weight"):
        Zoo.from_checkpoints([path], arch="resnet10_small")


def test_user_builder_callable_and_names(tmp_path):
    state = _small_state(width=8)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        torch.save(state, tmp_path / folder / "checkpoint.pth")
    zoo = Zoo.from_checkpoints([tmp_path / "a" / "checkpoint.pth", tmp_path / "b" / "checkpoint.pth"],
                               arch=lambda: resnet_small(num_classes=4, width=8))
    assert zoo.names == ["checkpoint-1", "checkpoint-2"]
    fresh = zoo.new_model()
    assert type(fresh) is type(zoo[0]) and fresh is not zoo[0]
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in zoo[0].state_dict().items()}
    assert not torch.equal(fresh.conv1.weight, zoo[0].conv1.weight)
    assert zoo["checkpoint-2"] is zoo[1] and zoo[1:].names == ["checkpoint-2"]
    assert "checkpoint-1" in repr(zoo) and "2 x ResNet" in repr(zoo)


def test_from_modules_defaults_and_fresh_model():
    members = [resnet_small(num_classes=10), resnet_small(num_classes=3)]  # heads may differ
    zoo = Zoo.from_modules(members)
    assert zoo.names == ["member0", "member1"] and list(zoo) == members and len(zoo) == 2
    fresh = zoo.new_model()
    assert type(fresh) is type(members[0]) and fresh is not members[0]
    assert not torch.equal(fresh.conv1.weight, members[0].conv1.weight)


def test_mismatched_zoo_names_member_key_and_shapes():
    with pytest.raises(ZooMismatchError) as info:
        Zoo.from_modules([resnet_small(width=16), resnet_small(width=8)], names=["wide", "narrow"])
    message = str(info.value)
    assert "narrow" in message and "conv1.weight" in message
    assert "(8, 3, 3, 3)" in message and "(16, 3, 3, 3)" in message

    with pytest.raises(ZooMismatchError, match=r"layer1\.1\..* missing in member 'shallow'"):
        Zoo.from_modules([resnet_small(depth=18), resnet_small(depth=10)], names=["deep", "shallow"])


def test_empty_zoo_is_refused():
    with pytest.raises(ZootuneError, match="at least one"):
        Zoo.from_modules([])
    with pytest.raises(ZootuneError, match="at least one"):
        Zoo.from_checkpoints([], arch="resnet10_small")


def test_missing_file_and_missing_backbone_key(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(CheckpointError, match="not found.*nowhere.pth"):
        Zoo.from_checkpoints([missing], arch="resnet10_small")

    state = _small_state()
    del state["layer2.0.bn1.running_var"]
    path = tmp_path / "incomplete.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"incomplete\.pth.*layer2\.0\.bn1\.running_var"):
        Zoo.from_checkpoints([path], arch="resnet10_small")


def test_other_architecture_is_refused(tmp_path):
    path = tmp_path / "deeper.pth"
    torch.save(_small_state(depth=18), path)  # extra blocks layerN.1.* the depth-10 model lacks
    with pytest.raises(CheckpointError, match=r"deeper\.pth.*does not have.*layer1\.1\."):
        Zoo.from_checkpoints([path], arch="resnet10_small")
    wide = tmp_path / "wide.pth"
    torch.save(_small_state(width=32), wide)
    with pytest.raises(CheckpointError, match=r"conv1\.weight has shape \(32, 3, 3, 3\).*\(16, 3, 3, 3\)"):
        Zoo.from_checkpoints([wide], arch="resnet10_small")


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors"])
def test_truncated_file_is_refused(tmp_path, kind):
    state = _small_state()
    if kind == "safetensors":
        path = save_state_dict(tmp_path / "cut.safetensors", state)
    else:
        path = tmp_path / "cut.pth"
        torch.save(state, path, _use_new_zipfile_serialization=(kind == "zip"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read .*cut\.(pth|safetensors).*truncated"):
        Zoo.from_checkpoints([path], arch="resnet10_small")


class _CreatesFileWhenUnpickled:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on plain pickles
@pytest.mark.parametrize("writer", ["torch_zip", "torch_legacy", "plain_pickle"])
def test_pickle_that_would_run_code_is_refused(tmp_path, writer):
    marker = tmp_path / "code_ran"
    payload = {"conv1.weight": torch.zeros(1), "evil": _CreatesFileWhenUnpickled(str(marker))}
    path = tmp_path / "evil.pth"
    if writer == "plain_pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=(writer == "torch_zip"))
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        Zoo.from_checkpoints([path], arch="resnet10_small")
    assert not marker.exists()
    message = str(info.value)
    assert "refusing to load" in message and "evil.pth" in message and "arbitrary code" in message
    assert "\n" not in message


def test_save_state_dict_is_atomic_and_round_trips(tmp_path):
    state = _small_state()
    state["tied"] = state["conv1.weight"]  # shared storage: safetensors would refuse it as is
    for name in ("w.safetensors", "w.pt"):
        path = save_state_dict(tmp_path / name, state, metadata={"arch": "resnet10_small", "epochs": 3})
        loaded = load_state_dict_file(path)
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert read_safetensors_metadata(tmp_path / "w.safetensors") == {"arch": "resnet10_small", "epochs": "3"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt", "w.safetensors"]  # no temp files left


def test_headless_backbones_make_a_zoo(tmp_path):
    def headless() -> nn.Module:
        model = resnet_small(width=8)
        model.fc = nn.Identity()
        return model

    state = _small_state(width=8)  # with an fc the headless architecture lacks: dropped as a head
    save_state_dict(tmp_path / "with_fc.safetensors", state)
    zoo = Zoo.from_checkpoints([tmp_path / "with_fc.safetensors"], arch=headless)
    assert zoo.head_name is None
    assert all(torch.equal(v, state[k]) for k, v in zoo[0].state_dict().items())
    assert Zoo.from_modules([headless(), headless()]).head_name is None
    with pytest.raises(ZootuneError, match="no module named 'classifier'"):
        Zoo.from_modules([headless()], head_name="classifier")
