"""zootune.minizoo: pretext objectives, pretraining, the safetensors cache and loading as a Zoo.

Members are pretrained here for a handful of steps on a few dozen images: the properties under test
(determinism, file layout, checksums, rebuilds) do not depend on how long a member trains.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from zootune.errors import CheckpointError, ZootuneError
from zootune.minizoo import (
    MEMBERS, build_minizoo, feature_map, list_minizoo, load_minizoo, minizoo_arch, pooled_features, pretrain,
)
from zootune.minizoo import members as members_module
from zootune.minizoo import store
from zootune.minizoo.objectives import contrastive_logits

# the package re-exports the function ``pretrain``, which hides the submodule of the same name
pretrain_module = sys.modules["zootune.minizoo.pretrain"]

TINY = tuple(dataclasses.replace(m, steps=2, num_images=24, batch_size=8) for m in MEMBERS)


@pytest.fixture
def tiny_members(monkeypatch):
    """Make the MiniZoo's member table the tiny one everywhere it is looked up."""
    for module in (members_module, pretrain_module, store):
        monkeypatch.setattr(module, "MEMBERS", TINY)
    return TINY


def test_zoo_is_one_architecture_with_diverse_pretraining():
    assert len(MEMBERS) >= 5
    assert len({m.name for m in MEMBERS}) == len(MEMBERS)
    assert len({m.algorithm for m in MEMBERS}) >= 4 and len({m.data for m in MEMBERS}) >= 4
    model = minizoo_arch()()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_feature_hook_matches_resnet_layers():
    model = minizoo_arch()().eval()
    x = torch.randn(3, 3, 32, 32)
    manual = model.layer4(model.layer3(model.layer2(model.layer1(model.relu(model.bn1(model.conv1(x)))))))
    assert torch.allclose(feature_map(model, x), manual)
    assert torch.allclose(pooled_features(model, x), manual.mean(dim=(2, 3)), atol=1e-6)

    class Tokens(nn.Module):  # a non-ResNet backbone exposing the documented hook
        def forward_feature_map(self, x):
            return x[:, :2, ::4, ::4] * 2

    assert torch.equal(pooled_features(Tokens(), x), (x[:, :2, ::4, ::4] * 2).mean(dim=(2, 3)))
    with pytest.raises(ZootuneError, match="forward_feature_map"):
        feature_map(nn.Linear(3, 3), x)


def test_contrastive_logits_equal_naive_nt_xent():
    torch.manual_seed(1)
    proj, t = torch.randn(6, 5), 0.3
    logits, positives = contrastive_logits(proj, t)
    loss = F.cross_entropy(logits, positives)
    z = [p / p.norm() for p in proj]
    n = len(z) // 2
    naive = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denominator = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        naive += -math.log(math.exp(float(z[i] @ z[j]) / t) / denominator)
    assert loss.item() == pytest.approx(naive / (2 * n), rel=1e-5)


@pytest.mark.parametrize("spec", TINY, ids=[m.name for m in TINY])
def test_pretrain_every_member_returns_a_trained_backbone(spec):
    model, summary = pretrain(minizoo_arch(), spec, seed=3)
    init = minizoo_arch()()
    changed = [k for k, v in model.state_dict().items() if not k.startswith("fc.") and v.dtype.is_floating_point
               and not torch.equal(v, init.state_dict()[k])]
    assert changed, "pretraining changed no backbone weight"
    assert set(model.state_dict()) == set(init.state_dict())  # the pretext head is not in the model
    assert summary["member"] == spec.name and summary["steps"] == 2 and summary["seed"] == 3
    assert math.isfinite(summary["metric"]) and summary["seconds"] >= 0


def test_pretrain_is_deterministic_for_a_seed():
    spec = TINY[2]  # cheap data; the other members share the same training loop
    a, _ = pretrain(minizoo_arch(), spec, seed=0)
    again, _ = pretrain(minizoo_arch(), spec, seed=0)
    for (k, x), (_, y) in zip(a.state_dict().items(), again.state_dict().items()):
        assert torch.equal(x, y), k
    b, _ = pretrain(minizoo_arch(), spec, seed=1)
    assert not torch.equal(a.conv1.weight, b.conv1.weight)


def test_build_cache_load_and_rebuild(tiny_members, tmp_path, monkeypatch):
    names = [tiny_members[2].name, tiny_members[4].name]  # cheap generated data
    rows = build_minizoo(tmp_path, members=names, seed=0, progress=False)
    folder = tmp_path / "minizoo"
    manifest = json.loads((folder / "manifest.json").read_text())
    reference = minizoo_arch()().state_dict()
    for row in rows:
        path = folder / row["file"]
        assert row["sha256"] == store.sha256_file(path) == manifest["members"][row["name"]]["sha256"]
        assert row["zootune_version"] and row["seed"] == 0 and row["metric_name"]
        tensors = load_file(path)
        # torchvision-layout backbone keys, BN buffers included, no head
        assert set(tensors) == {k for k in reference if not k.startswith("fc.")}
        assert "bn1.running_mean" in tensors and "layer1.0.bn2.num_batches_tracked" in tensors

    # a second build reuses the cached files instead of pretraining again
    def no_pretraining(*args, **kwargs):
        raise AssertionError("a valid cached member was rebuilt")

    monkeypatch.setattr(store, "pretrain", no_pretraining)
    assert [r["sha256"] for r in build_minizoo(tmp_path, members=names, progress=False)] == [r["sha256"] for r in rows]

    zoo = load_minizoo(tmp_path, build_if_missing=False, members=names)
    assert list(zoo.names) == names and len(zoo) == 2
    stored = load_file(folder / rows[1]["file"])
    for k, v in stored.items():
        assert torch.equal(zoo[1].state_dict()[k], v), k

    listing = {r["name"]: r for r in list_minizoo(tmp_path)}
    assert listing[names[0]]["built"] and listing[names[0]]["checksum_ok"]
    # members 2 and 4 start from member 0's weights, so it was built as their base; member 1 was not
    assert listing[tiny_members[0].name]["built"] and not listing[tiny_members[1].name]["built"]

    # corrupt a member: reported by list and by a load that may not build, rebuilt identically otherwise
    original = (folder / rows[0]["file"]).read_bytes()
    (folder / rows[0]["file"]).write_bytes(original[:-8] + b"garbage!")
    assert not {r["name"]: r for r in list_minizoo(tmp_path)}[names[0]]["checksum_ok"]
    with pytest.raises(CheckpointError, match=f"{names[0]} corrupt"):
        load_minizoo(tmp_path, build_if_missing=False, members=names)
    monkeypatch.setattr(store, "pretrain", pretrain_module.pretrain)
    load_minizoo(tmp_path, build_if_missing=True, members=names)
    assert (folder / rows[0]["file"]).read_bytes() == original  # same seed -> same bytes


def test_member_with_init_from_starts_from_the_base_weights(tiny_members, tmp_path, monkeypatch):
    dependent = next(m for m in tiny_members if m.init_from is not None)
    base = next(m for m in tiny_members if m.name == dependent.init_from)
    seen = {}

    def recording_pretrain(model, member, seed=0, progress=False):
        spec = pretrain_module.get_member(member)
        if isinstance(model, torch.nn.Module):
            seen[spec.name] = {k: v.clone() for k, v in model.state_dict().items()}
        return pretrain_module.pretrain(model, member, seed=seed, progress=progress)

    monkeypatch.setattr(store, "pretrain", recording_pretrain)
    rows = {r["name"]: r for r in build_minizoo(tmp_path, members=[dependent.name], progress=False)}
    assert base.name not in seen  # the base itself starts from a random init
    base_weights = load_file(tmp_path / "minizoo" / f"{base.name}.safetensors")
    for key, value in base_weights.items():
        assert torch.equal(seen[dependent.name][key], value), key
    assert rows[dependent.name]["init_from_sha256"] == store.sha256_file(tmp_path / "minizoo" / f"{base.name}.safetensors")

    # rebuilding the base (another seed of it, same file name) invalidates the member built on it
    manifest = json.loads((tmp_path / "minizoo" / "manifest.json").read_text())
    manifest["members"][dependent.name]["init_from_sha256"] = "0" * 64
    (tmp_path / "minizoo" / "manifest.json").write_text(json.dumps(manifest))
    seen.clear()
    build_minizoo(tmp_path, members=[dependent.name], progress=False)
    assert dependent.name in seen


def test_missing_zoo_is_reported(tiny_members, tmp_path):
    with pytest.raises(CheckpointError, match="missing.*zootune zoo build"):
        load_minizoo(tmp_path, build_if_missing=False)
    (tmp_path / "minizoo").mkdir()
    (tmp_path / "minizoo" / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest"):
        list_minizoo(tmp_path)
