"""PAC-Net: masks, the three steps under real optimisers, save/load, export, registry."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zootune.errors import CheckpointError, ZootuneError
from zootune.methods.pac_net import PACNet, magnitude_masks
from zootune.methods.registry import build_method
from zootune.methods.pac_net.masked import MaskedLayer
from zootune.models import resnet_small
from zootune.tasks import ClassificationTask


def tiny_mlp(out: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, out))


def tiny_resnet(num_classes: int = 3) -> nn.Module:
    return resnet_small(num_classes=num_classes, depth=10, width=4)


OPTIMIZERS = {
    "sgd-momentum-wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-2),
    "adam-wd": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=5e-2),
    "adamw-wd": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.5),
}


def engine_steps(net: PACNet, optimizer, x, y, steps: int, all_params: bool = False) -> None:
    """The step the engine takes (zootune.methods.base): task loss + auxiliary loss, step, hook."""
    net.train()
    for _ in range(steps):
        optimizer.zero_grad()
        out = net(x)
        loss = F.cross_entropy(out, y) + net.auxiliary_loss(out, y)
        loss.backward()
        optimizer.step()
        net.after_optimizer_step()


def make_optimizer(net: PACNet, name: str, all_params: bool = False):
    # all_params: an optimiser a user built over every parameter -- frozen ones must still not move
    params = list(net.parameters()) if all_params else net.param_groups(0.0)[0]["params"]
    return OPTIMIZERS[name](params)


def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# ---- Prune ---------------------------------------------------------------------------------


def test_per_layer_and_global_masks_on_hand_made_tensors():
    a = torch.tensor([[4.0, -1.0], [3.0, 2.0]])
    b = torch.tensor([10.0, -40.0, 20.0, -30.0])
    per_layer = magnitude_masks({"a": a, "b": b}, 0.5, scope="layer")
    assert per_layer["a"].tolist() == [[True, False], [True, False]]  # drops |1| and |2|
    assert per_layer["b"].tolist() == [False, True, False, True]  # drops |10| and |20|
    glob = magnitude_masks({"a": a, "b": b}, 0.5, scope="global")
    assert not glob["a"].any()  # the four smallest magnitudes overall are all in a
    assert glob["b"].all()
    glob_75 = magnitude_masks({"a": a, "b": b}, 0.75, scope="global")  # 6 of 8 removed
    assert glob_75["a"].sum() == 0 and glob_75["b"].tolist() == [False, True, False, True]


def test_ties_are_broken_deterministically_with_an_exact_count():
    w = torch.ones(10)
    mask = magnitude_masks({"w": w}, 0.3)["w"]
    assert mask.tolist() == [False] * 3 + [True] * 7


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("fraction", [0.2, 0.8])
def test_prune_fraction_is_the_fraction_of_zeros(scope, fraction):
    net = PACNet(tiny_resnet(), prune_fraction=fraction, scope=scope)
    layers = net.masked_layers()
    assert {type(layer.base_layer) for layer in layers} == {nn.Conv2d}  # fc is the head: never pruned
    zeros = sum(int((layer.weight == 0).sum()) for layer in layers)
    total = sum(layer.weight.numel() for layer in layers)
    if scope == "layer":
        for layer in layers:
            assert int((layer.weight == 0).sum()) == round(fraction * layer.weight.numel())
    assert abs(zeros - fraction * total) <= len(layers)
    # biases and norm layers are not pruned
    assert all(int((p == 0).sum()) == 0 for n, p in net.named_parameters() if "bn" in n and n.endswith("weight"))


def test_pruned_entries_are_the_smallest_magnitudes_of_the_source_model():
    model = tiny_mlp()
    before = model[2].weight.detach().clone()
    net = PACNet(model, prune_fraction=0.75)
    mask = net.body.get_submodule("2").essential_mask
    assert mask.sum() == 64
    assert before.abs()[mask].min() >= before.abs()[~mask].max()
    assert torch.equal(net.body.get_submodule("2").weight[mask], before[mask])


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_bad_prune_fraction_is_a_user_error(bad):
    with pytest.raises(ZootuneError, match="REMOVED"):
        PACNet(tiny_mlp(), prune_fraction=bad)


def test_layers_to_prune_are_configurable():
    net = PACNet(tiny_mlp(), layers=["0"])
    assert net.layer_names == ["0"]
    assert isinstance(net.body[0], MaskedLayer) and isinstance(net.body[2], nn.Linear)
    with pytest.raises(ZootuneError):
        PACNet(tiny_mlp(), layers=["1"])  # ReLU has no weight


# ---- Allocate ------------------------------------------------------------------------------


@pytest.mark.parametrize("all_params", [False, True])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_allocate_keeps_pruned_entries_at_exactly_zero(opt, all_params):
    net = PACNet(tiny_resnet(), prune_fraction=0.6)
    masks = net.masks()
    target_head_before = snapshot(net.target_head)
    before = {n: layer.weight.detach().clone() for n, layer in zip(net.layer_names, net.masked_layers())}
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    engine_steps(net, make_optimizer(net, opt, all_params), x, y, steps=3)
    for name, layer in zip(net.layer_names, net.masked_layers()):
        w = layer.weight
        assert torch.equal(layer.essential_mask, masks[name])
        assert (w[~masks[name]] == 0).all(), name
        changed = w[masks[name]] != before[name][masks[name]]
        assert changed.float().mean() > 0.5, name  # essential entries do train
    for k, v in net.target_head.state_dict().items():
        assert torch.equal(v, target_head_before[k])  # the target head waits for Calibrate
    assert net.mode == "prune-allocate-calibrate"


def test_allocate_gradients_are_masked_before_the_optimizer_runs():
    net = PACNet(tiny_mlp(), prune_fraction=0.5)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    F.cross_entropy(net(x), y).backward()
    for layer in net.masked_layers():
        assert (layer.weight.grad[~layer.essential_mask] == 0).all()
        assert (layer.weight.grad[layer.essential_mask] != 0).any()


def test_source_route_matches_a_naively_masked_copy():
    model = tiny_mlp()
    reference = copy.deepcopy(model)
    net = PACNet(model, prune_fraction=0.7)
    for name, layer in zip(net.layer_names, net.masked_layers()):
        with torch.no_grad():
            reference.get_submodule(name).weight.mul_(layer.essential_mask.float())
    x = torch.randn(7, 6)
    assert torch.allclose(net(x), reference(x), atol=1e-6)


# ---- Calibrate -----------------------------------------------------------------------------


def allocated_resnet() -> PACNet:
    net = PACNet(tiny_resnet(), prune_fraction=0.7)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    engine_steps(net, torch.optim.Adam(net.param_groups(0.0)[0]["params"], lr=0.01), x, y, steps=2)
    return net


@pytest.mark.parametrize("all_params", [False, True])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_calibrate_changes_only_pruned_entries_and_the_target_head(opt, all_params):
    net = allocated_resnet().begin_calibrate()
    before = snapshot(net)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    engine_steps(net, make_optimizer(net, opt, all_params), x, y, steps=3)
    after = net.state_dict()
    for key, old in before.items():
        new = after[key]
        if key.startswith("target_head."):
            assert not torch.equal(new, old), key
        elif key.endswith("base_layer.weight"):
            mask = after[key.replace("base_layer.weight", "essential_mask")]
            assert torch.equal(new[mask], old[mask]), key  # essential entries: bitwise unchanged
            assert (new[~mask] != old[~mask]).float().mean() > 0.5, key  # pruned entries calibrate
        else:  # biases, norm parameters and running statistics, masks, w_S, source head
            assert torch.equal(new, old), key


def test_calibrate_gradients_reach_only_pruned_entries():
    net = allocated_resnet().begin_calibrate()
    net.zero_grad(set_to_none=True)  # drop the Allocate steps' gradients
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,))
    F.cross_entropy(net(x), y).backward()
    for layer in net.masked_layers():
        assert (layer.weight.grad[layer.essential_mask] == 0).all()
        assert (layer.weight.grad[~layer.essential_mask] != 0).any()
    assert all(p.grad is None for p in net.source_head.parameters())


def test_source_outputs_are_bitwise_unchanged_by_calibrate():
    net = allocated_resnet()
    x_src = torch.randn(6, 3, 16, 16)
    net.eval()
    source_before = net(x_src).detach().clone()
    net.begin_calibrate()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    engine_steps(net, make_optimizer(net, "sgd-momentum-wd"), x, y, steps=4)
    net.eval()
    target_out = net(x_src)
    net.task = "source"
    assert torch.equal(net(x_src), source_before)
    assert not torch.allclose(target_out, source_before)


def test_penalty_is_lambda_times_squared_distance_of_pruned_entries():
    with pytest.warns(UserWarning, match="prune-calibrate"):
        net = PACNet(tiny_mlp(), prune_fraction=0.5, l2_lambda=0.3).begin_calibrate()
    with torch.no_grad():
        for layer in net.masked_layers():
            layer.weight.add_(torch.randn_like(layer.weight))
    reference = 0.0
    for layer in net.masked_layers():
        for w, w_s, keep in zip(layer.weight.flatten().tolist(), layer.source_weight.flatten().tolist(),
                                layer.essential_mask.flatten().tolist()):
            if not keep:
                reference += (w - w_s) ** 2
    out = torch.zeros(1)
    assert net.auxiliary_loss(out, out).item() == pytest.approx(0.3 * reference, rel=1e-5)
    net.begin_allocate()
    assert net.auxiliary_loss(out, out).item() == 0.0


def test_huge_lambda_keeps_the_target_body_on_the_source_weights():
    # With SGD and lr = 1 / (2 λ), a step sets each pruned entry to w_S - lr * grad_task: as λ -> ∞
    # the calibrated body computes what the allocated source body computes, even when the pruned
    # entries start away from w_S (here: perturbed by 0.1, which a missing penalty would leave).
    def calibrate(lam: float, lr: float) -> float:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = PACNet(tiny_mlp(), prune_fraction=0.5, l2_lambda=lam).begin_calibrate()
        with torch.no_grad():
            for layer in net.masked_layers():
                layer.weight.add_(0.1 * torch.randn_like(layer.weight) * ~layer.essential_mask)
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        engine_steps(net, torch.optim.SGD(net.param_groups(lr)[0]["params"], lr=lr), x, y, steps=5)
        net.eval()
        target_features = net.body(x)
        net.task = "source"
        return (net.body(x) - target_features).abs().max().item()

    assert calibrate(1e8, 0.5e-8) < 1e-6
    assert calibrate(0.0, 0.5e-8) > 1e-2  # the same run without the penalty stays away


def test_norm_statistics_may_follow_the_target_when_asked():
    net = PACNet(tiny_resnet(), freeze_norm_stats=False)
    with pytest.warns(UserWarning, match="prune-calibrate"):
        net.begin_calibrate()
    before = net.body.bn1.running_mean.clone()
    net.train()
    net(torch.randn(4, 3, 16, 16) + 3.0)
    assert not torch.equal(net.body.bn1.running_mean, before)


# ---- modes, save/load, export, registry ------------------------------------------------------


def test_calibrate_without_allocate_warns_prune_calibrate():
    net = PACNet(tiny_mlp())
    with pytest.warns(UserWarning, match="prune-calibrate"):
        net.begin_calibrate()
    assert net.mode == "prune-calibrate"


def test_save_load_round_trip(tmp_path):
    net = allocated_resnet().begin_calibrate()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    engine_steps(net, make_optimizer(net, "adam-wd"), x, y, steps=2)
    net.save(tmp_path)
    config = json.loads((tmp_path / "pac_net.json").read_text())
    assert config["prune_fraction"] == 0.7 and config["stage"] == "calibrate"
    assert not list(tmp_path.glob("*.tmp"))

    loaded = PACNet.load(tmp_path, tiny_resnet())
    for (name, mask), (name2, mask2) in zip(net.masks().items(), loaded.masks().items()):
        assert name == name2 and torch.equal(mask, mask2)
    assert loaded.stage == "calibrate" and loaded.task == "target"
    assert loaded.mode == "prune-allocate-calibrate"
    net.eval(), loaded.eval()
    for task in ("target", "source"):
        net.task = loaded.task = task
        assert torch.equal(net(x), loaded(x)), task
    # the loaded model goes on calibrating with the same frozen entries
    before = loaded.state_dict()["body.layer1.0.conv1.base_layer.weight"].clone()
    engine_steps(loaded, make_optimizer(loaded, "sgd-momentum-wd"), x, y, steps=1)
    layer = loaded.body.layer1[0].conv1
    assert torch.equal(layer.weight[layer.essential_mask], before[layer.essential_mask])


def test_load_errors_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError):
        PACNet.load(tmp_path, tiny_resnet())
    PACNet(tiny_resnet()).save(tmp_path)
    with pytest.raises(CheckpointError):
        PACNet.load(tmp_path, resnet_small(num_classes=3, depth=10, width=8))  # other widths
    (tmp_path / "pac_net.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError):
        PACNet.load(tmp_path, tiny_resnet())


@pytest.mark.parametrize("task", ["source", "target"])
def test_merge_and_unload_equals_the_routed_model(task):
    net = allocated_resnet().begin_calibrate()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    engine_steps(net, make_optimizer(net, "adam-wd"), x, y, steps=2)
    net.eval()
    net.task = task
    plain = net.merge_and_unload(task).eval()
    assert not any(isinstance(m, MaskedLayer) for m in plain.modules())
    assert set(plain.state_dict()) == set(tiny_resnet().state_dict())
    assert torch.allclose(plain(x), net(x), atol=1e-5)


def test_registry_build_without_source_data_is_prune_calibrate():
    from zootune.methods.registry import get_method

    spec = get_method("pac-net")
    members = [tiny_resnet(), tiny_resnet()]
    original = snapshot(members[1])
    with pytest.warns(UserWarning, match="prune-calibrate"):
        net = build_method(spec.name, members, ClassificationTask(5), options={"prune_fraction": 0.5, "l2_lambda": 0.1}, member=1)
    assert net.stage == "calibrate" and net.mode == "prune-calibrate" and net.l2_lambda == 0.1
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    for k, v in members[1].state_dict().items():
        assert torch.equal(v, original[k])  # the zoo member itself is not changed
    with pytest.raises(ZootuneError, match="unknown pac-net option"):
        build_method("pac-net", members, ClassificationTask(5), options={"prune_ratio": 0.5})
    with pytest.raises(ZootuneError, match="prune_fraction.*must be a number"):
        build_method("pac-net", members, ClassificationTask(5), options={"prune_fraction": "0.5"})


# ---- through the shared engine -------------------------------------------------------------


def tensor_dataset(n: int, num_classes: int = 3, shift: float = 0.0):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 3, 16, 16, generator=g) + shift
    return torch.utils.data.TensorDataset(x, torch.randint(0, num_classes, (n,), generator=g))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_engine_allocate_then_calibrate_moves_only_the_intended_entries(optimizer):
    from zootune.engine import TrainConfig

    config = TrainConfig(epochs=1, batch_size=8, optimizer=optimizer, lr=0.05, momentum=0.9,
                         weight_decay=0.1, schedule="constant", progress=False)
    net = PACNet(tiny_resnet(), prune_fraction=0.8)
    masks = net.masks()
    net.allocate(tensor_dataset(24), ClassificationTask(3), config=config)
    assert net.allocate_steps == 3
    for name, layer in zip(net.layer_names, net.masked_layers()):
        assert (layer.weight[~masks[name]] == 0).all()
    net.eval()
    probe = torch.randn(4, 3, 16, 16)
    source_before = net(probe).detach().clone()
    before = snapshot(net.begin_calibrate())  # records w_S; calibrate() records the same again
    net.calibrate(tensor_dataset(16, shift=1.0), ClassificationTask(3), config=config)
    after = net.state_dict()
    for key in before:
        if key.endswith("base_layer.weight"):
            mask = masks[key[len("body."):-len(".base_layer.weight")]]
            assert torch.equal(after[key][mask], before[key][mask]), key
            assert not torch.equal(after[key][~mask], before[key][~mask]), key
        elif not key.startswith("target_head."):
            assert torch.equal(after[key], before[key]), key
    net.eval()
    net.task = "source"
    assert torch.equal(net(probe), source_before)


def test_registry_build_with_source_data_runs_allocate():
    from types import SimpleNamespace

    from zootune.engine import TrainConfig

    members = [tiny_resnet(num_classes=3)]
    source = SimpleNamespace(train=tensor_dataset(16), val=None, task=ClassificationTask(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the full method must not warn "prune-calibrate"
        net = build_method("pac-net", members, ClassificationTask(4), options={"allocate_epochs": 1,
                           "allocate_batch_size": 8}, source_data=source, train_config=TrainConfig(progress=False))
    assert net.mode == "prune-allocate-calibrate" and net.stage == "calibrate" and net.allocate_steps == 2
    for layer in net.masked_layers():
        assert torch.equal(layer.source_weight, layer.weight.detach())
        assert (layer.source_weight[~layer.essential_mask] == 0).all()
    from zootune.errors import DataError

    with pytest.raises(DataError, match="outputs"):
        build_method("pac-net", members, ClassificationTask(4),
                     source_data=SimpleNamespace(train=tensor_dataset(16), val=None, task=ClassificationTask(5)))


def test_source_splits_from_the_suite_run_allocate_on_that_dataset():
    # A source task given as DatasetSplits (what `zootune fit --source-data FOLDER` reads).
    from zootune.suite.targets import get_target

    members = [resnet_small(num_classes=10, depth=10, width=4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net = build_method("pac-net", members, ClassificationTask(3), source_data=get_target("digits8x8"),
                           options={"allocate_epochs": 1, "allocate_batch_size": 256, "prune_fraction": 0.5,
                                    "scope": "global"})
    assert net.mode == "prune-allocate-calibrate" and net.allocate_steps == 3  # ceil(~540 / 256)
    zeros = sum(int((~layer.essential_mask).sum()) for layer in net.masked_layers())
    assert zeros == round(0.5 * sum(layer.essential_mask.numel() for layer in net.masked_layers()))
