"""Fisher-weighted merging: the merge rule, the per-example Fisher, and the method end to end."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zootune.data.datasets import DatasetSplits, ImageDataset
from zootune.errors import ZootuneError
from zootune.methods.fisher_merge import (
    diagonal_fisher,
    fisher_weighted_average,
    reestimate_norm_statistics,
)
from zootune.methods.registry import build_method
from zootune.methods.soup import uniform_soup
from zootune.models import resnet_small
from zootune.tasks import ClassificationTask


def tiny_members(m=3, seed=0):
    torch.manual_seed(seed)
    return [resnet_small(num_classes=3, depth=10, width=4) for _ in range(m)]


def params_of(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def test_equal_fishers_give_the_uniform_average():
    members = tiny_members()
    fisher = {n: torch.rand_like(p) for n, p in members[0].named_parameters()}
    merged = fisher_weighted_average(members, [fisher, fisher, fisher], epsilon=0.0)
    soup = uniform_soup(members, head_name="fc")
    for name, value in params_of(merged).items():
        expected = torch.stack([params_of(m)[name] for m in members]).mean(0)
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
        if not name.startswith("fc."):
            torch.testing.assert_close(value, params_of(soup)[name], rtol=1e-6, atol=1e-7)


def test_a_fisher_zero_in_all_members_but_one_gives_that_member():
    members = tiny_members()
    ones = {n: torch.ones_like(p) for n, p in members[0].named_parameters()}
    zeros = {n: torch.zeros_like(p) for n in ones for p in [ones[n]]}
    merged = fisher_weighted_average(members, [zeros, ones, zeros], epsilon=0.0)
    for name, value in params_of(merged).items():
        assert torch.equal(value, params_of(members[1])[name]), name
    # epsilon > 0: a parameter no member cares about falls back to the plain mean
    merged = fisher_weighted_average(members, [zeros, zeros, zeros], epsilon=1e-8)
    expected = torch.stack([params_of(m)["conv1.weight"] for m in members]).mean(0)
    torch.testing.assert_close(params_of(merged)["conv1.weight"], expected)
    with pytest.raises(ZootuneError, match="zero in every member"):
        fisher_weighted_average(members, [zeros, zeros, zeros], epsilon=0.0)


def test_fisher_is_the_mean_of_squared_per_example_gradients():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    model[1].running_mean.uniform_(-0.5, 0.5)  # eval-mode statistics that are not the identity
    x, y = torch.randn(7, 3, 6, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    fisher = diagonal_fisher(model, x, y, batch_size=3, skip={"5.weight", "5.bias"})
    # the plain way: one example at a time, ordinary autograd, squared, averaged
    reference = {n: torch.zeros_like(p) for n, p in model.named_parameters() if not n.startswith("5.")}
    model.eval()
    for i in range(7):
        model.zero_grad()
        F.log_softmax(model(x[i:i + 1]), dim=-1)[0, y[i]].backward()
        for n in reference:
            reference[n] += dict(model.named_parameters())[n].grad.square() / 7
    assert set(fisher) == set(reference)
    for n in reference:
        torch.testing.assert_close(fisher[n], reference[n], rtol=1e-4, atol=1e-7)
    # not the square of the batch gradient (what a wrong implementation would compute)
    model.zero_grad()
    F.log_softmax(model(x), dim=-1).gather(1, y[:, None]).mean().backward()
    assert not torch.allclose(fisher["0.weight"], model[0].weight.grad.square(), rtol=1e-2)


def test_norm_statistics_are_re_estimated_on_the_inputs():
    bn = nn.Sequential(nn.BatchNorm2d(3))
    bn[0].running_mean.fill_(5.0)
    x = torch.randn(40, 3, 4, 4) * 2 + 1
    reestimate_norm_statistics(bn, x, batch_size=40)
    torch.testing.assert_close(bn[0].running_mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(bn[0].running_var, x.var((0, 2, 3), unbiased=True))
    assert bn[0].momentum == 0.1  # restored


def test_fisher_merge_builds_trains_and_needs_data():
    members = tiny_members()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 3, 16, 16, generator=g), torch.arange(24) % 2
    splits = DatasetSplits(ImageDataset(x, y), ImageDataset(x[:8], y[:8]), ImageDataset(x[:8], y[:8]), 2, "t")
    task = ClassificationTask(2)
    model = build_method("fisher-merge", members, task, data=splits, options={"num_examples": 24})
    before = copy.deepcopy(model.state_dict())
    loss = task.loss(model(x[:8]), y[:8])
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    plain = model.finalize()
    # a plain model of the zoo's architecture, with the task's head
    assert set(plain.state_dict()) == set(members[0].state_dict()) and plain.fc.out_features == 2
    assert set(before) == {f"model.{k}" for k in plain.state_dict()}
    # merged, not a copy of one member
    conv = plain.state_dict()["conv1.weight"]
    assert all(not torch.equal(conv, m.state_dict()["conv1.weight"]) for m in members)
    with pytest.raises(ZootuneError, match="needs the target's training data"):
        build_method("fisher-merge", members, task)
    with pytest.raises(ZootuneError, match="num_examples"):
        build_method("fisher-merge", members, task, data=splits, options={"num_examples": 0})


def batch_statistics(model, x):
    """Per BatchNorm layer: (mean, unbiased variance) of its input over the batch ``x``, computed
    from a train-mode forward pass (each layer normalises by its batch statistics, as while
    re-estimating)."""
    model = copy.deepcopy(model).train()
    stats, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            def record(module, inputs, name=name):
                stats[name] = (inputs[0].mean((0, 2, 3)), inputs[0].var((0, 2, 3), unbiased=True))
            hooks.append(module.register_forward_pre_hook(record))
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return stats


def test_fisher_merge_model_carries_norm_statistics_re_estimated_on_the_target():
    members = tiny_members()
    for i, member in enumerate(members):  # pretrained members: statistics of their own source data
        for module in member.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.num_batches_tracked.fill_(100 + i)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(24, 3, 16, 16, generator=g) * 1.5 + 0.5, torch.arange(24) % 2
    splits = DatasetSplits(ImageDataset(x, y), ImageDataset(x[:8], y[:8]), ImageDataset(x[:8], y[:8]), 2, "t")
    # the registry's build, what `zootune fit` / `run` hand to the engine; every training image is
    # used (num_examples >= 24) in one batch (<= 64), so the statistics do not depend on the order
    built = build_method("fisher-merge", members, ClassificationTask(2), data=splits, seed=0)
    plain = built.finalize()
    expected = batch_statistics(plain, x)  # the merged weights' statistics on the target images
    norms = {n: m for n, m in plain.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert set(norms) == set(expected) and norms
    for name, module in norms.items():
        mean, var = expected[name]
        torch.testing.assert_close(module.running_mean, mean, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(module.running_var, var, rtol=1e-4, atol=1e-5, msg=name)
        assert int(module.num_batches_tracked) == 1, name
        assert module.momentum == 0.1, name  # the engine trains with the usual running average
