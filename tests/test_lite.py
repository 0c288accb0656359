"""Lite Zoo-Tuning: batch-shared gate, temporal ensemble (also across processes), folding, I/O."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from zootune.errors import CheckpointError
from zootune.layers import AggregatedLayer
from zootune.methods.zoo_tuning import ZooTuning, load_folded, save_folded
from zootune.models import resnet_small


def tiny_zoo(m=3):
    zoo = []
    for seed in range(m):
        torch.manual_seed(200 + seed)
        zoo.append(resnet_small(num_classes=7, depth=10, width=4))
    return zoo


def trained_lite(steps=3):
    model = ZooTuning(tiny_zoo(), num_outputs=5, lite=True, align="all", formulation="outputs")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(0)
    for _ in range(steps):  # gates, alignment, BN statistics and ā all move away from their init
        x = torch.randn(6, 3, 32, 32)
        optimizer.zero_grad()
        F.cross_entropy(model(x), torch.randint(0, 5, (6,))).backward()
        optimizer.step()
    return model.eval()


def test_training_forward_uses_one_kernel_from_the_batch_mean_gate():
    torch.manual_seed(0)
    sources = [nn.Conv2d(4, 6, 3, padding=1) for _ in range(3)]
    layer = AggregatedLayer(sources, lite=True, align=True)
    with torch.no_grad():
        layer.align.weight.add_(0.2 * torch.randn_like(layer.align.weight))
        layer.gate.expand.bias.normal_()
        layer.gate.expand.weight.normal_()  # per-sample gates differ (V starts at 0)
    x = torch.randn(5, 4, 6, 6)
    mean_gate = layer.gate(x).mean(0)
    weight = sum(mean_gate[i] * (layer.align.weight[i] @ layer.bank[i].reshape(6, -1)).reshape(6, 4, 3, 3)
                 for i in range(3))
    bias = sum(mean_gate[i] * (layer.align.weight[i] @ layer.bias_bank[i]) for i in range(3))
    torch.testing.assert_close(layer(x), F.conv2d(x, weight, bias, padding=1))


def test_temporal_ensemble_is_the_documented_ema_without_gradient():
    torch.manual_seed(0)
    layer = AggregatedLayer([nn.Linear(4, 3) for _ in range(2)], lite=True, lite_momentum=0.9,
                            gate_init="reference")  # input-dependent gates from the start
    assert "gate_ema" in dict(layer.named_buffers()) and not layer.gate_ema.requires_grad
    assert all(p is not layer.gate_ema for p in layer.parameters())
    torch.testing.assert_close(layer.gate_ema, torch.full((2,), 0.5))  # before training: 1/m
    x1, x2 = torch.randn(8, 4), torch.randn(8, 4)
    g1, g2 = layer.gate(x1).mean(0).detach(), layer.gate(x2).mean(0).detach()
    layer(x1).sum().backward()
    torch.testing.assert_close(layer.gate_ema, g1)  # first update: ā = ā_batch
    layer(x2)
    torch.testing.assert_close(layer.gate_ema, 0.9 * g1 + 0.1 * g2)
    assert layer.gate_ema.grad is None and int(layer.gate_updates) == 2
    layer.eval()
    before = layer.gate_ema.clone()
    layer(torch.randn(3, 4))
    assert torch.equal(layer.gate_ema, before)  # eval neither updates ā ...
    plain = layer.merge()
    x = torch.randn(3, 4)
    torch.testing.assert_close(layer(x), plain(x))  # ... and uses ā for every input


def _distributed_worker(rank, store_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # same layer on both ranks
        layer = AggregatedLayer([nn.Conv2d(3, 4, 3) for _ in range(3)], lite=True, gate_init="reference")
        inputs = [torch.randn(4, 3, 5, 5), torch.randn(6, 3, 5, 5)]  # each rank trains on its own
        layer(inputs[rank])
        torch.save({"ema": layer.gate_ema.clone(),
                    "batch_means": [layer.gate(x).mean(0).detach() for x in inputs]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_temporal_ensemble_is_averaged_across_workers(tmp_path):
    mp.spawn(_distributed_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    expected = (results[0]["batch_means"][0] + results[0]["batch_means"][1]) / 2
    assert not torch.allclose(results[0]["batch_means"][0], results[0]["batch_means"][1])
    for result in results:
        torch.testing.assert_close(result["ema"], expected)


def test_folded_model_equals_lite_model_and_is_a_plain_architecture():
    lite = trained_lite()
    plain = lite.merge_and_unload().eval()
    assert not any(isinstance(m, AggregatedLayer) for m in plain.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected, folded = lite(x), plain(x)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    fresh = resnet_small(num_classes=5, depth=10, width=4)
    assert set(fresh.state_dict()) == set(plain.state_dict())
    fresh.load_state_dict(plain.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), folded)
    assert lite.finalize().state_dict().keys() == plain.state_dict().keys()
    assert any(isinstance(m, AggregatedLayer) for m in lite.modules())  # folding leaves Lite intact


def test_folded_model_save_load_round_trip_keeps_bn_buffers(tmp_path):
    plain = trained_lite().merge_and_unload().eval()
    save_folded(plain, tmp_path / "folded")
    loaded = load_folded(tmp_path / "folded", lambda: resnet_small(num_classes=7, depth=10, width=4)).eval()
    assert loaded.fc.out_features == 5
    for name, tensor in plain.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), plain(x))
    with pytest.raises(CheckpointError):
        ZooTuning.load_pretrained(tmp_path / "folded", tiny_zoo())  # a plain model, not Zoo-Tuning


def test_lite_save_load_round_trip_keeps_temporal_ensemble(tmp_path):
    lite = trained_lite()
    lite.save_pretrained(tmp_path / "lite")
    loaded = ZooTuning.load_pretrained(tmp_path / "lite", tiny_zoo()).eval()
    for name, gates in lite.lite_gates().items():
        assert torch.equal(loaded.lite_gates()[name], gates)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), lite(x))
