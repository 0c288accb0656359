"""Convolution subclasses with a known variant forward ("same" padding, weight standardisation).

The two classes below are written here the way timm writes ``Conv2dSame`` and ``StdConv2d`` (the
interop lane checks zootune against timm's own classes); each aggregation is compared with a plain
per-sample loop: W^_b = kernel(sum_i a_i T_i source(W_i)), input padded, one conv per sample.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zootune.layers import AggregatedLayer, is_aggregatable
from zootune.layers.variants import LayerVariant, register_variant, same_padding, variant_of


def pad_same_plain(x, kernel, stride, dilation):
    ih, iw = x.shape[-2:]
    pad_h = max((math.ceil(ih / stride[0]) - 1) * stride[0] + (kernel[0] - 1) * dilation[0] + 1 - ih, 0)
    pad_w = max((math.ceil(iw / stride[1]) - 1) * stride[1] + (kernel[1] - 1) * dilation[1] + 1 - iw, 0)
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


def standardize_plain(w, eps):
    """Each output channel of a (C_out, ...) kernel to mean 0, variance 1 (biased), as BiT does."""
    rows = []
    for o in range(w.shape[0]):
        row = w[o]
        mean = row.mean()
        var = ((row - mean) ** 2).mean()
        rows.append((row - mean) / torch.sqrt(var + eps))
    return torch.stack(rows)


class SameConv(nn.Conv2d):
    """Like timm's Conv2dSame: TF "SAME" padding computed from the input size."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, padding=0, **kwargs)

    def forward(self, x):
        x = pad_same_plain(x, self.weight.shape[-2:], self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv(nn.Conv2d):
    """Like timm's StdConv2d: the kernel is standardised per output channel in every forward."""

    def __init__(self, *args, eps=1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x):
        weight = standardize_plain(self.weight, self.eps)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class OwnForwardConv(nn.Conv2d):
    """A subclass with a forward zootune knows nothing about."""

    def forward(self, x):
        return super().forward(x) * 2


register_variant(SameConv, lambda m: LayerVariant(
    "SameConv", same_padding=tuple(zip(m.kernel_size, m.stride, m.dilation))))
register_variant(StdConv, lambda m: LayerVariant("StdConv", standardize_eps=m.eps))


def naive(layer, template, x, source_transform, kernel_transform):
    a = layer.gate(x)
    out = []
    for b in range(x.shape[0]):
        weight = 0
        for i in range(layer.num_sources):
            w_i = source_transform(layer.bank[i])
            if layer.align is not None:
                w_i = (layer.align.weight[i] @ w_i.reshape(w_i.shape[0], -1)).reshape(w_i.shape)
            weight = weight + a[b, i] * w_i
        weight = kernel_transform(weight)
        bias = None
        if layer.bias_bank is not None:
            bias = sum(a[b, i] * (layer.align.weight[i] @ layer.bias_bank[i] if layer.align is not None
                                  else layer.bias_bank[i]) for i in range(layer.num_sources))
        sample = x[b:b + 1]
        if isinstance(template, SameConv):
            sample = pad_same_plain(sample, template.kernel_size, template.stride, template.dilation)
        out.append(F.conv2d(sample, weight, bias, template.stride, template.padding, template.dilation,
                            template.groups))
    return torch.cat(out)


CASES = {
    "same k3 s2": (lambda: SameConv(4, 6, 3, stride=2), 7),
    "same k3 s1 d2 g2": (lambda: SameConv(4, 6, 3, dilation=2, groups=2), 6),
    "same k1 s2": (lambda: SameConv(4, 6, 1, stride=2, bias=False), 5),
    "std k3": (lambda: StdConv(4, 6, 3, padding=1, bias=False), 5),
    "std k1 s2": (lambda: StdConv(4, 6, 1, stride=2), 6),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("align", [False, True])
def test_variant_aggregation_equals_per_sample_loop_outputs_and_gradients(case, align):
    make, size = CASES[case]
    sources = [make().double() for _ in range(3)]
    with torch.no_grad():
        for s in sources:  # raw weights with per-channel offsets and scales, as standardisation allows
            s.weight.mul_(torch.rand(s.weight.shape[0], 1, 1, 1, dtype=torch.float64) * 3)
            s.weight.add_(torch.randn(s.weight.shape[0], 1, 1, 1, dtype=torch.float64))
    layer = AggregatedLayer(sources, align=align).double()
    with torch.no_grad():
        if layer.align is not None:
            layer.align.weight.add_(0.3 * torch.randn_like(layer.align.weight))
        layer.gate.expand.weight.normal_()
    is_std = isinstance(sources[0], StdConv)
    source_t = (lambda w: standardize_plain(w, 1e-6)) if is_std else (lambda w: w)
    x = torch.randn(3, 4, size, size, dtype=torch.float64, requires_grad=True)
    expected = naive(layer, sources[0], x, source_t, source_t)
    grad_out = torch.randn_like(expected)
    params = list(layer.parameters())
    expected_grads = torch.autograd.grad(expected, [x, *params], grad_out)
    names = layer.applicable_formulations()
    if is_std:
        assert set(names) <= {"grouped", "bmm"}  # the outer standardisation is not linear in the kernel
    for name in names:
        layer.formulation = name
        out = layer(x)
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9, msg=name)
        for got, want in zip(torch.autograd.grad(out, [x, *params], grad_out), expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8, msg=name)


@pytest.mark.parametrize("case", CASES)
def test_lite_variant_folds_into_the_same_class_with_equal_outputs(case):
    make, size = CASES[case]
    sources = [make().double() for _ in range(2)]
    layer = AggregatedLayer(sources, align=True, lite=True).double()
    with torch.no_grad():
        layer.align.weight.add_(0.3 * torch.randn_like(layer.align.weight))
        layer.gate.expand.weight.normal_()
    x = torch.randn(4, 4, size, size, dtype=torch.float64)
    layer.train()
    for _ in range(3):  # training forwards: shared kernel, EMA of the batch gates
        layer(x)
    layer.eval()
    plain = layer.merge()
    assert type(plain) is type(sources[0])
    with torch.no_grad():
        torch.testing.assert_close(plain(x), layer(x), rtol=1e-9, atol=1e-9)


def test_one_standardised_source_reproduces_that_source():
    source = StdConv(4, 6, 3, padding=1, bias=False).double()  # a bias would be scaled by the gate
    with torch.no_grad():
        source.weight.mul_(5).add_(2)
    layer = AggregatedLayer([source], align=False).double()  # gate = sigmoid(0) = 1/2
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), source(x), rtol=1e-6, atol=1e-6)


def test_same_padding_matches_tensorflow_formula():
    # TF: out = ceil(i / s); total pad = max((out - 1) s + (k - 1) d + 1 - i, 0), split low/high.
    assert same_padding(7, 3, 2, 1) == (1, 1)
    assert same_padding(8, 3, 2, 1) == (0, 1)
    assert same_padding(5, 1, 2, 1) == (0, 0)
    assert same_padding(6, 3, 1, 2) == (2, 2)


def test_unknown_subclass_is_not_aggregatable_and_known_ones_are():
    assert not is_aggregatable(OwnForwardConv(2, 2, 3))
    assert variant_of(OwnForwardConv(2, 2, 3)) is None
    assert is_aggregatable(SameConv(2, 2, 3)) and is_aggregatable(StdConv(2, 2, 3))
    with pytest.raises(TypeError):
        AggregatedLayer([OwnForwardConv(2, 2, 3)])
