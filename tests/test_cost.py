"""Cost accounting: FLOPs equal hand formulas, parameters equal known counts, measuring changes nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zootune.cost import Cost, count_cost, count_flops, count_macs, count_params, measure_cost
from zootune.models import resnet18, resnet50, resnet_small


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def conv_flops(batch, c_in, c_out, size, kernel, stride=1, padding=0, groups=1) -> int:
    """Hand formula: each output element is a dot product of length (C_in/groups)*k*k, 2 FLOPs per term."""
    out = conv_output_size(size, kernel, stride, padding)
    return 2 * batch * c_out * out * out * (c_in // groups) * kernel * kernel


def test_linear_flops_equal_hand_formula():
    layer = nn.Linear(24, 10)
    x = torch.randn(5, 24)
    assert count_flops(layer, x) == 2 * 5 * 24 * 10
    assert count_macs(layer, x) == 5 * 24 * 10


@pytest.mark.parametrize("stride,padding,groups", [(1, 1, 1), (2, 0, 1), (1, 1, 4)])
def test_conv_flops_equal_hand_formula(stride, padding, groups):
    layer = nn.Conv2d(8, 12, 3, stride=stride, padding=padding, groups=groups)
    x = torch.randn(3, 8, 9, 9)
    assert count_flops(layer, x) == conv_flops(3, 8, 12, 9, 3, stride, padding, groups)


@pytest.mark.parametrize("groups", [1, 4])
def test_backward_flops_count_each_gradient_once(groups):
    """conv -> relu -> conv, input without grad: conv1 needs its weight gradient only, conv2 its
    weight and input gradients; each costs one forward of that conv (groups included, unlike
    torch's own formula, which multiplies the weight gradient by ``groups``)."""
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=False), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=False))
    x = torch.randn(2, 8, 6, 6)
    one_conv = conv_flops(2, 8, 8, 6, 3, 1, 1, groups)
    assert count_flops(model, x) == 2 * one_conv
    assert count_flops(model, x, backward=True) == 2 * one_conv + (1 + 2) * one_conv
    # Frozen first layer: nothing before conv2 needs a gradient, so conv2 needs its weight's only.
    model[0].weight.requires_grad_(False)
    assert count_flops(model, x, backward=True) == 2 * one_conv + one_conv


def test_params_of_resnet18_and_trainable_only():
    model = resnet18()
    assert count_params(model) == 11_689_512
    for p in model.fc.parameters():
        p.requires_grad_(False)
    assert count_params(model, trainable_only=True) == 11_689_512 - (512 * 1000 + 1000)
    assert count_params(model) == 11_689_512


def test_resnet50_at_224_is_about_4_1_g_macs():
    # Shapes are all FlopCounterMode needs: the meta device skips the arithmetic.
    with torch.device("meta"):
        model = resnet50(num_classes=100)
        x = torch.empty(1, 3, 224, 224)
    macs = count_macs(model, x, train_mode=False)
    assert 4.05e9 < macs < 4.15e9  # the paper's Table 1: 4.12 "GFLOPs" (multiply-accumulates)
    assert count_flops(model, x, train_mode=False) == 2 * macs
    # 23.71M: a ResNet-50 backbone with a 100-way head, as the paper's Table 1 counts it.
    assert round(count_params(model) / 1e6, 2) == 23.71


def _state_snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()})


def test_measuring_leaves_buffers_grads_modes_and_rng_untouched():
    model = resnet_small(num_classes=5)
    model.eval()
    model.layer2.train()  # a mixed-mode model must come back mixed
    model(torch.randn(2, 3, 32, 32)).sum().backward()  # existing gradients must survive
    model.fc.weight.grad = None
    x = torch.randn(4, 3, 32, 32)
    before = _state_snapshot(model)
    grad_objects = {n: p.grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()

    cost = measure_cost(model, model, x)
    assert cost.train_gflops > 0 and cost.train_step_gflops > cost.train_gflops

    after = _state_snapshot(model)
    assert before[2] == after[2]
    for key, value in before[0].items():
        assert torch.equal(value, after[0][key]), key  # BN running stats and counters unchanged
    for name, grad in before[1].items():
        assert (grad is None) == (after[1][name] is None), name
        if grad is not None:
            assert torch.equal(grad, after[1][name]) and grad_objects[name] is model.get_parameter(name).grad
    assert torch.equal(rng, torch.get_rng_state())


class _RebindsBuffer(nn.Module):
    """Keeps a running average by rebinding its buffer (as a temporal gate average might)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.register_buffer("average", torch.zeros(4))

    def forward(self, x):
        if self.training:
            self.average = 0.9 * self.average + 0.1 * x.mean(0).detach()
        return nn.functional.dropout(self.layer(x), 0.5, self.training)


def test_rebound_buffer_is_restored():
    model = _RebindsBuffer()
    original = model.average
    count_flops(model, torch.randn(3, 4), backward=True, train_mode=True)
    assert model.average is original and torch.equal(original, torch.zeros(4))


def test_per_sample_numbers_do_not_depend_on_batch_size():
    width, size = 8, 16
    model = resnet_small(num_classes=7, width=width)
    one = measure_cost(model, model, torch.randn(1, 3, size, size))
    four = measure_cost(model, model, torch.randn(4, 3, size, size))
    for field in ("train_gflops", "train_step_gflops", "infer_gflops"):
        assert getattr(one, field) == pytest.approx(getattr(four, field), rel=1e-12), field
    # Per sample, forward = the network's convolutions and head, counted by hand.
    expected = conv_flops(1, 3, width, size, 3, 1, 1)
    c_in = width
    for stage, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
        stride = 1 if stage == 0 else 2
        out = conv_output_size(size, 3, stride, 1)
        expected += conv_flops(1, c_in, c_out, size, 3, stride, 1) + conv_flops(1, c_out, c_out, out, 3, 1, 1)
        if stride != 1 or c_in != c_out:
            expected += conv_flops(1, c_in, c_out, size, 1, stride, 0)
        c_in, size = c_out, out
    expected += 2 * 8 * width * 7
    assert one.infer_gflops == pytest.approx(expected / 2 / 1e9, rel=1e-12)


class _Distill(nn.Module):
    """Frozen teachers plus a trained student, as the paper's Distill baseline trains."""

    def __init__(self, teachers, student):
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        self.student = student
        for p in self.teachers.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        with torch.no_grad():
            soft = torch.stack([t(x) for t in self.teachers]).mean(0)
        return self.student(x), soft


def test_distill_counts_teachers_in_training_and_student_at_inference():
    teachers = [resnet_small(num_classes=3, width=8) for _ in range(2)]
    student = resnet_small(num_classes=3, width=8)
    x = torch.randn(2, 3, 16, 16)
    cost = measure_cost(_Distill(teachers, student), student, x)
    plain = count_cost(student, x)
    assert isinstance(cost, Cost)
    assert cost.train_params == 3 * count_params(student)
    assert cost.infer_params == count_params(student) == plain.train_params
    assert cost.train_gflops == pytest.approx(3 * plain.infer_gflops)
    assert cost.infer_gflops == pytest.approx(plain.infer_gflops)
    # Training step: teachers run forward only; the student runs forward and backward.
    assert cost.train_step_gflops == pytest.approx(2 * plain.infer_gflops + plain.train_step_gflops)
    assert set(cost.to_dict()) == {"train_gflops", "train_step_gflops", "train_params",
                                   "infer_gflops", "infer_params", "input_shape"}
    assert cost.to_dict()["input_shape"] == [3, 16, 16]


class ShapeTunedLinear(torch.nn.Module):
    """Does extra trial work the first time it sees an input shape, like Zoo-Tuning's autotuner."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 4)
        self.seen = set()

    def forward(self, x):
        if x.shape not in self.seen:
            self.seen.add(x.shape)
            for _ in range(3):  # "timing" three candidate formulations
                self.linear(x)
        return self.linear(x)


def test_once_per_shape_work_is_not_counted():
    steady = 2 * 5 * 8 * 4  # one Linear(8, 4) on a batch of 5
    assert count_flops(ShapeTunedLinear(), torch.randn(5, 8)) == steady
    # backward: the weight gradient only (the input needs none) = one more forward's worth
    assert count_flops(ShapeTunedLinear(), torch.randn(5, 8), backward=True) == 2 * steady
