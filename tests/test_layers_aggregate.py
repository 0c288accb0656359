"""Every formulation of the aggregation layer equals a plain per-sample loop (outputs and gradients)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from zootune.layers import AggregatedLayer, Gate, autotune

CONV = {1: F.conv1d, 2: F.conv2d}


def naive_forward(layer: AggregatedLayer, template: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """y_b = (sum_i a_i(x_b) T_i W_i) * x_b + sum_i a_i(x_b) T_i b_i, one sample at a time."""
    a = layer.gate(x)
    outputs = []
    for b in range(x.shape[0]):
        weight = 0
        bias = 0 if layer.bias_bank is not None else None
        for i in range(layer.num_sources):
            w_i, b_i = layer.bank[i], (layer.bias_bank[i] if layer.bias_bank is not None else None)
            if layer.align is not None:
                t_i = layer.align.weight[i]
                w_i = (t_i @ w_i.reshape(w_i.shape[0], -1)).reshape(w_i.shape)
                b_i = t_i @ b_i if b_i is not None else None
            weight = weight + a[b, i] * w_i
            if bias is not None:
                bias = bias + a[b, i] * b_i
        sample = x[b:b + 1]
        if isinstance(template, nn.Linear):
            outputs.append(F.linear(sample, weight, bias))
        else:
            if template.padding_mode != "zeros":
                sample = F.pad(sample, template._reversed_padding_repeated_twice, mode=template.padding_mode)
                padding = 0
            else:
                padding = template.padding
            outputs.append(CONV[weight.dim() - 2](sample, weight, bias, template.stride, padding,
                                                  template.dilation, template.groups))
    return torch.cat(outputs)


@st.composite
def layer_cases(draw):
    kind = draw(st.sampled_from(["conv1d", "conv2d", "linear"]))
    m = draw(st.integers(1, 3))
    batch = draw(st.integers(1, 3))
    bias = draw(st.booleans())
    align = draw(st.booleans())
    gate = draw(st.sampled_from(["sigmoid", "softmax"]))
    if kind == "linear":
        c_in, c_out = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        tokens = draw(st.sampled_from([(), (2,), (2, 3)]))
        make = lambda: nn.Linear(c_in, c_out, bias=bias)  # noqa: E731
        shape = (batch, *tokens, c_in)
    else:
        dims = 1 if kind == "conv1d" else 2
        groups = draw(st.sampled_from([1, 2]))
        c_in, c_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
        kernel = draw(st.integers(1, 3))
        stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        padding = draw(st.integers(0, 2))
        mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "circular"])) if padding else "zeros"
        size = draw(st.integers(dilation * (kernel - 1) + 1 + max(0, 2 - padding), 7))
        size = max(size, padding + 1)  # reflect padding needs size > padding
        cls = nn.Conv1d if dims == 1 else nn.Conv2d
        make = lambda: cls(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation,  # noqa: E731
                           groups=groups, bias=bias, padding_mode=mode)
        shape = (batch, c_in, *(size,) * dims)
    return make, shape, m, align, gate


def _perturbed_layer(make, m, align, gate):
    sources = [make().double() for _ in range(m)]
    layer = AggregatedLayer(sources, align=align, gate=gate).double()
    with torch.no_grad():
        if layer.align is not None:  # away from the identity so alignment is really exercised
            layer.align.weight.add_(0.3 * torch.randn_like(layer.align.weight))
        layer.gate.expand.bias.normal_()
        layer.gate.expand.weight.normal_()  # per-sample gates differ (V starts at 0)
    return layer, sources[0]


@settings(max_examples=30, deadline=None)
@given(case=layer_cases(), seed=st.integers(0, 2**16))
def test_every_formulation_equals_per_sample_loop(case, seed):
    make, shape, m, align, gate = case
    torch.manual_seed(seed)
    layer, template = _perturbed_layer(make, m, align, gate)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    grad_out = None
    params = [p for p in layer.parameters()]

    expected = naive_forward(layer, template, x)
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, [x, *params], grad_out)
    for name in layer.applicable_formulations():
        layer.formulation = name
        out = layer(x)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10, msg=f"{name}: output")
        grads = torch.autograd.grad(out, [x, *params], grad_out)
        for (pname, _), got, want in zip([("input", None), *layer.named_parameters()], grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=f"{name}: grad of {pname}")
        with torch.no_grad():  # inference path: aligned bank computed once and cached
            layer.eval()
            torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10, msg=f"{name}: eval")
            torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10, msg=f"{name}: cached")
            layer.train()


@settings(max_examples=15, deadline=None)
@given(case=layer_cases(), seed=st.integers(0, 2**16))
def test_lite_training_formulations_equal_one_shared_kernel(case, seed):
    make, shape, m, _, gate = case
    torch.manual_seed(seed)
    sources = [make().double() for _ in range(m)]
    layer = AggregatedLayer(sources, align=True, gate=gate, lite=True).double()
    with torch.no_grad():
        layer.align.weight.add_(0.3 * torch.randn_like(layer.align.weight))
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    params = list(layer.parameters())
    # reference: the batch-mean gate folded into one kernel, written out plainly
    mean_gate = layer.gate(x).mean(0)
    weight = sum(mean_gate[i] * (layer.align.weight[i] @ layer.bank[i].reshape(layer.out_channels, -1))
                 for i in range(m)).reshape(layer.bank.shape[1:])
    bias = (sum(mean_gate[i] * (layer.align.weight[i] @ layer.bias_bank[i]) for i in range(m))
            if layer.bias_bank is not None else None)
    if isinstance(template := sources[0], nn.Linear):
        expected = F.linear(x, weight, bias)
    else:
        padded = F.pad(x, template._reversed_padding_repeated_twice, mode=template.padding_mode) \
            if template.padding_mode != "zeros" else x
        expected = CONV[weight.dim() - 2](padded, weight, bias, template.stride,
                                          template.padding if template.padding_mode == "zeros" else 0,
                                          template.dilation, template.groups)
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, [x, *params], grad_out)
    for name in ("shared", "outputs"):
        layer.formulation = name if name == "outputs" else "grouped"  # any non-"outputs" name: shared
        out = layer(x)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10, msg=f"{name}: output")
        grads = torch.autograd.grad(out, [x, *params], grad_out)
        for (pname, _), got, want in zip([("input", None), *layer.named_parameters()], grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=f"{name}: grad of {pname}")


def test_bmm_applies_only_to_unpadded_pointwise_convolutions():
    pointwise = AggregatedLayer([nn.Conv2d(4, 4, 1, stride=2) for _ in range(2)])
    padded = AggregatedLayer([nn.Conv2d(4, 4, 1, padding=1) for _ in range(2)])
    grouped = AggregatedLayer([nn.Conv2d(4, 4, 1, groups=2) for _ in range(2)])
    assert "bmm" in pointwise.applicable_formulations()
    assert "bmm" not in padded.applicable_formulations()
    assert "bmm" not in grouped.applicable_formulations()
    with pytest.raises(ValueError):
        padded._formulation("bmm")
    x = torch.randn(2, 4, 5, 5)
    padded.formulation = "bmm"  # a fixed model-wide choice falls back to per-sample kernels
    expected = padded._conv_grouped(x, padded.gate(x), *padded.aligned_bank(), None)
    torch.testing.assert_close(padded(x), expected)


def test_gate_is_pool_mlp_sigmoid_with_reference_init():
    torch.manual_seed(1)
    gate = Gate(8, 3)
    assert gate.reduce.weight.shape == (8 // 4 + 1, 8) and gate.reduce.bias is None
    assert torch.all(gate.expand.bias == 0) and torch.all(gate.expand.weight == 0)
    h = torch.randn(5, 8, 4, 6)
    torch.testing.assert_close(gate(h), torch.full((5, 3), 0.5))  # every input starts at 1/2
    gate = Gate(8, 3, zero_init=False)  # the reference's init: kaiming like U
    assert gate.expand.weight.abs().min() > 0
    h = torch.randn(5, 8, 4, 6)
    pooled = h.mean(dim=(2, 3))
    manual = torch.sigmoid(torch.relu(pooled @ gate.reduce.weight.T) @ gate.expand.weight.T + gate.expand.bias)
    torch.testing.assert_close(gate(h), manual)
    softmax = Gate(8, 3, "softmax", zero_init=False)
    torch.testing.assert_close(softmax(h).sum(1), torch.ones(5))
    torch.testing.assert_close(Gate(8, 3, "softmax")(h), torch.full((5, 3), 1 / 3))
    # kaiming fan_out: std sqrt(2 / fan_out), checked on a wide layer where the sample std is tight
    wide = Gate(4000, 3)
    assert abs(wide.reduce.weight.std().item() - (2 / wide.reduce.weight.shape[0]) ** 0.5) < 0.003


def test_alignment_starts_at_identity_so_sources_are_unchanged():
    sources = [nn.Conv2d(3, 5, 3) for _ in range(2)]
    layer = AggregatedLayer(sources, align=True)
    bank, bias = layer.aligned_bank()
    torch.testing.assert_close(bank, torch.stack([s.weight for s in sources]))
    torch.testing.assert_close(bias, torch.stack([s.bias for s in sources]))


def test_autotune_measures_once_and_skips_hopeless_candidates():
    autotune.clear_cache()
    calls = {"fast": 0, "slow": 0, "hopeless": 0}

    def runner(name, seconds):
        def run():
            calls[name] += 1
            x = torch.zeros(1)
            for _ in range(seconds):
                x = x + 1
        return run

    candidates = {"fast": runner("fast", 1), "slow": runner("slow", 20000), "hopeless": runner("hopeless", 1)}
    macs = {"fast": 1.0, "slow": 1.0, "hopeless": 100.0}
    assert autotune.choose("k", candidates, macs) == "fast"
    assert calls["hopeless"] == 0 and calls["fast"] == calls["slow"] == 1 + autotune.MEASURE_REPEATS
    assert autotune.choose("k", candidates, macs) == "fast"
    assert calls["fast"] == 1 + autotune.MEASURE_REPEATS  # cached: not measured again
    chosen, timings = autotune.measured_choices()["k"]
    assert chosen == "fast" and set(timings) == {"fast", "slow"}


def test_auto_layer_records_a_choice_and_keeps_the_rng_stream():
    autotune.clear_cache()
    layer = AggregatedLayer([nn.Conv2d(4, 6, 3, padding=1) for _ in range(3)])
    x = torch.randn(2, 4, 6, 6)
    torch.manual_seed(5)
    layer(x).sum().backward()
    after_auto = torch.rand(1)
    torch.manual_seed(5)
    expected = torch.rand(1)
    assert after_auto == expected  # measuring drew no random numbers
    ((chosen, timings),) = autotune.measured_choices().values()
    assert chosen in layer.applicable_formulations() and chosen in timings


def test_by_macs_chooses_the_cheapest_estimate_without_timing():
    autotune.clear_cache()
    calls = {"a": 0, "b": 0, "c": 0}

    def runner(name):
        def run():
            calls[name] += 1
        return run

    candidates = {name: runner(name) for name in calls}
    with autotune.by_macs():
        assert autotune.choose("k", candidates, {"a": 3.0, "b": 2.0, "c": 2.0}) == "b"  # tie: first
        assert autotune.choose("k", candidates, {"a": 1.0, "b": 2.0, "c": 2.0}) == "a"  # not cached
    assert calls == {"a": 0, "b": 0, "c": 0} and "k" not in autotune.measured_choices()
