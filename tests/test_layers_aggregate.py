"""Every formulation of the aggregation layer equals a plain per-sample loop (outputs and gradients),
in float64 and under bf16 autocast; the eval-time cache is invalidated when a parameter changes;
formulations are chosen by an explicit tune() step, never inside forward."""

import contextlib
import random
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from zootune.layers import AggregatedLayer, Gate, autotune

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

# torch warns that padding="same" with an even kernel copies the input; that is the case under test.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


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
    """(layer factory, input shape, m, align, gate, channels_last) over Conv1d/2d/3d and Linear."""
    kind = draw(st.sampled_from(["conv1d", "conv2d", "conv2d", "conv3d", "linear"]))
    m = draw(st.integers(1, 3))
    batch = draw(st.integers(1, 3))
    bias = draw(st.booleans())
    align = draw(st.booleans())
    gate = draw(st.sampled_from(["sigmoid", "softmax"]))
    channels_last = False
    if kind == "linear":
        c_in, c_out = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        tokens = draw(st.sampled_from([(), (2,), (2, 3)]))
        make = lambda: nn.Linear(c_in, c_out, bias=bias)
        shape = (batch, *tokens, c_in)
    else:
        dims = int(kind[4])
        groups = draw(st.sampled_from([1, 2]))
        c_in, c_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
        kernel = draw(st.integers(1, 3 if dims < 3 else 2))
        dilation = draw(st.integers(1, 2))
        padding = draw(st.sampled_from([0, 1, 2, "same", "valid"]))
        stride = 1 if padding == "same" else draw(st.integers(1, 2))  # torch: "same" needs stride 1
        pads = padding != 0 and padding != "valid"
        mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "circular"])) if pads else "zeros"
        amount = dilation * (kernel - 1) if padding == "same" else (0 if padding == "valid" else padding)
        smallest = dilation * (kernel - 1) + 1 + max(0, 2 - amount)
        size = draw(st.integers(smallest, max(smallest, 7 if dims < 3 else 4)))
        size = max(size, amount + 1)  # reflect padding needs size > padding
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        make = lambda: cls(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation,
                           groups=groups, bias=bias, padding_mode=mode)
        shape = (batch, c_in, *(size,) * dims)
        channels_last = dims in (2, 3) and draw(st.booleans())
    return make, shape, m, align, gate, channels_last


def _input(shape, channels_last, dtype=torch.float64):
    x = torch.randn(*shape, dtype=dtype)
    if channels_last:  # NHWC / NDHWC strides: the layout a channels-last model hands every layer
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x.requires_grad_(True)


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
    make, shape, m, align, gate, channels_last = case
    torch.manual_seed(seed)
    layer, template = _perturbed_layer(make, m, align, gate)
    x = _input(shape, channels_last)
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
    make, shape, m, _, gate, channels_last = case
    torch.manual_seed(seed)
    sources = [make().double() for _ in range(m)]
    layer = AggregatedLayer(sources, align=True, gate=gate, lite=True).double()
    with torch.no_grad():
        layer.align.weight.add_(0.3 * torch.randn_like(layer.align.weight))
    x = _input(shape, channels_last)
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


# ------------------------------------------------------------------ bf16 autocast


# The tolerance is the textbook forward-error bound of a low-precision sum of products: each result
# r = sum_k prod_j f_kj, computed with every factor rounded to bf16 (unit roundoff u = 2^-9) and a
# few intermediates rounded again, is within c u sum_k prod_j |f_kj| of the exact value, however much
# the terms cancel (a gradient summed over a few samples can be a small difference of large terms).
# All formulations compute the same polynomial in (x, a, W, b, T), so the magnitude polynomial --
# the same computation on |x|, |a|, |W|, |b|, |T| and |dL/dy| -- gives that sum of |terms| for the
# output and for every gradient, elementwise. We allow c u = BF16_BOUND = 8 x 2^-8 (two roundings
# of each factor, up to three rounded intermediates, and slack); the largest ratio seen over 500
# random layers was below 1/2 of it. The gate itself runs in fp32 (within 1e-5 of float64); the
# gradients of its parameters are computed in fp32 from dL/da, which is checked here, and that
# backward is checked exactly in float64 above. A formulation that drops a gate, a source or the
# alignment, or casts the wrong tensor, misses by orders of magnitude more.
BF16_BOUND = 8 * 2.0**-8


class _GateOutput:
    """Keeps the gate's output of the last forward (to differentiate with respect to it)."""

    def __init__(self, layer):
        self.value = None
        layer.gate.register_forward_hook(lambda module, args, out: setattr(self, "value", out))


def _magnitudes(layer: AggregatedLayer, x: torch.Tensor, grad_out: torch.Tensor):
    """The magnitude polynomial (float64): |y| bound for the output, and for the gradients of x, the
    bank, the bias bank, the alignment and the per-sample gate a (B, m), in that order."""
    with torch.no_grad():
        a = layer.gate(x)
        if layer.lite:
            a = a.mean(0, keepdim=True).expand_as(a)
    leaves = [t.detach().abs().requires_grad_(True) if t is not None else None
              for t in (x, layer.bank, layer.bias_bank, layer._align_weight(), a)]
    name = layer.applicable_formulations()[0]  # per-sample kernels: one of several equal polynomials
    with torch.enable_grad():
        out = layer._formulation(name)(layer._pad(leaves[0]), leaves[4], *leaves[1:4])
        present = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(out, present, grad_out.abs()))
    bounds = [next(grads) if t is not None else None for t in leaves]
    if layer.lite:  # a = mean_b a(x_b): each sample's gate output gets the mean gradient
        bounds[4] = bounds[4].mean(0, keepdim=True).expand_as(bounds[4])
    # dL/dx also flows through the gate a(x): |J_gate|^T applied to the bound on dL/da
    bounds[0] = bounds[0] + _gate_magnitude_backward(layer.gate, x, bounds[4] / (x.shape[0] if layer.lite else 1))
    return out.detach(), bounds


def _gate_magnitude_backward(gate: Gate, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """|J|^T delta for the gate's Jacobian J = d a / d x (delta >= 0, (B, m)): the gate's backward
    with every factor replaced by its absolute value."""
    with torch.no_grad():
        pooled = gate.pool(x)
        hidden = pooled @ gate.reduce.weight.T
        logits = torch.relu(hidden) @ gate.expand.weight.T + gate.expand.bias
        if gate.activation == "sigmoid":
            s = torch.sigmoid(logits)
            d = s * (1 - s) * delta
        else:
            a = torch.softmax(logits, -1)
            d = a * delta + a * (a * delta).sum(-1, keepdim=True)
        d = ((d @ gate.expand.weight.abs()) * (hidden > 0)) @ gate.reduce.weight.abs()  # (B, C)
        if x.dim() <= 2:
            return d.view_as(x)
        if gate.channels_last:  # Linear inputs (B, *, C): mean over the tokens
            tokens = x[0].numel() // x.shape[-1]
            return (d / tokens).view(x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1]).expand_as(x)
        positions = x[0, 0].numel()
        return (d / positions).view(*x.shape[:2], *([1] * (x.dim() - 2))).expand_as(x)


def _within_bound(got, want, magnitude, what):
    excess = ((got.double() - want.double()).abs() - BF16_BOUND * magnitude).max().item()
    assert excess <= 1e-12, f"{what}: beyond {BF16_BOUND:.3g} x sum of |terms| by {excess:.3g}"


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def no_tf32():
    """fp32 on a GPU means fp32 here (TF32 convolutions would round to 10 bits)."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=layer_cases(), lite=st.booleans(), seed=st.integers(0, 2**16))
def test_every_formulation_under_bf16_autocast_agrees_with_float64(device, no_tf32, case, lite, seed):
    """fp32 parameters, forward under torch.autocast(device, bf16): outputs and the gradients of the
    input, the bank, the bias bank, the alignment and the gate output, for each training formulation
    and the eval path (Lite: shared and outputs in training, the folded kernel in eval), against the
    same layer in float64, elementwise within the bound above. (CUDA when a GPU is present.)"""
    make, shape, m, align, gate, channels_last = case
    torch.manual_seed(seed)
    layer, _ = _perturbed_layer(make, m, align or lite, gate)
    layer.lite = lite
    layer.to(device)
    reference = _double_copy(layer)
    layer.float()
    gate_out, gate_ref = _GateOutput(layer), _GateOutput(reference)
    x = _input(shape, channels_last, dtype=torch.float32).detach().to(device).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    checked = ["input", "bank", "bias_bank", "align.weight", "gate output"]
    for name in layer.candidate_formulations("train"):
        for module in (layer, reference):
            module.formulation = name if not lite else ("outputs" if name == "outputs" else "grouped")
        want = reference(x64)
        grad_out = torch.randn_like(want)
        leaves = [x64, reference.bank, reference.bias_bank, reference._align_weight(), gate_ref.value]
        want_grads = torch.autograd.grad(want, [t for t in leaves if t is not None], grad_out)
        magnitude, magnitude_grads = _magnitudes(reference, x64.detach(), grad_out)
        with torch.autocast(device, dtype=torch.bfloat16):
            got = layer(x)
        assert got.dtype == torch.bfloat16, name  # the layer's work ran in bf16...
        assert gate_out.value.dtype == torch.float32  # ...and the gate in fp32
        torch.testing.assert_close(gate_out.value.double(), gate_ref.value.detach(), rtol=1e-5, atol=1e-6)
        _within_bound(got, want, magnitude, f"{name}: output")
        got_leaves = [x, layer.bank, layer.bias_bank, layer._align_weight(), gate_out.value]
        got_grads = torch.autograd.grad(got, [t for t in got_leaves if t is not None], grad_out.to(got.dtype))
        present = [what for what, t in zip(checked, got_leaves) if t is not None]
        bounds = [b for b in magnitude_grads if b is not None]
        for what, g, w, bound in zip(present, got_grads, want_grads, bounds):
            assert g.dtype == torch.float32, what  # fp32 leaves keep fp32 gradients
            _within_bound(g, w, bound, f"{name}: grad of {what}")
    for module in (layer, reference):
        module.eval()
    with torch.no_grad():
        want = reference(x64)
        magnitude, _ = _magnitudes(reference, x64.detach(), torch.ones_like(want))
        with torch.autocast(device, dtype=torch.bfloat16):
            _within_bound(layer(x), want, magnitude, "eval")
            _within_bound(layer(x), want, magnitude, "eval, cached")
        # The cache holds the bank in the parameters' dtype: the same layer without autocast is fp32.
        plain = layer(x)
        assert plain.dtype == torch.float32
        _within_bound(plain, want, magnitude / 2**15, "eval without autocast (fp32)")


def _double_copy(layer: AggregatedLayer) -> AggregatedLayer:
    import copy

    twin = copy.deepcopy(layer).double()
    twin._eval_cache = None
    return twin


def test_lite_model_trains_and_evaluates_under_bf16_autocast():
    """The failure reported with Lite under autocast: tensordot(gate bf16, bank fp32) in the shared
    kernel. Every Lite and full formulation runs a training step and an eval pass under bf16."""
    torch.manual_seed(0)
    x = torch.randn(4, 4, 8, 8)
    for lite in (True, False):
        for formulation in ("auto", *FORMULATIONS_FOR_TEST):
            layer = AggregatedLayer([nn.Conv2d(4, 6, 3, padding=1) for _ in range(3)], lite=lite,
                                    formulation=formulation)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = layer(x)
            out.float().sum().backward()
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters()
                       if p.requires_grad and p is not layer.gate.reduce.weight)
            layer.eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                assert torch.isfinite(layer(x).float()).all()


FORMULATIONS_FOR_TEST = ("grouped", "bmm", "stacked", "outputs")


# ------------------------------------------------------------------ eval-time kernel cache


def check_cache_follows_parameters(layer: AggregatedLayer, template: nn.Module, x: torch.Tensor) -> None:
    """After every kind of parameter or buffer change, the next eval output is the fresh one."""
    layer.eval()

    def expected():
        if layer.lite:  # eval of Lite: the kernel folded with the ensemble gate for every input
            weight, bias = layer.fold(layer.gate_ema)
            return CONV[weight.dim() - 2](x, weight, bias, template.stride, template.padding,
                                          template.dilation, template.groups)
        return naive_forward(layer, template, x)

    with torch.no_grad():
        first = layer(x)
        torch.testing.assert_close(first, expected(), rtol=1e-10, atol=1e-10)
        changes = [
            ("bank scaled in place", lambda: layer.bank.mul_(1.5)),
            ("alignment changed in place", lambda: layer.align.weight.add_(0.1)),
            ("bias bank changed in place", lambda: layer.bias_bank.sub_(0.2)),
            ("load_state_dict", lambda: layer.load_state_dict(
                {k: (v * 0.7 if v.is_floating_point() else v) for k, v in layer.state_dict().items()})),
            ("bank rebound to a new tensor", lambda: setattr(layer.bank, "data", layer.bank.data * 2)),
        ]
        if layer.lite:
            changes.append(("Lite ensemble gate updated", lambda: layer.gate_ema.copy_(
                torch.linspace(0.1, 1.0, layer.num_sources, dtype=layer.gate_ema.dtype))))
        previous = first
        for what, change in changes:
            change()
            now = layer(x)
            assert not torch.allclose(now, previous), f"eval output unchanged after: {what}"
            torch.testing.assert_close(now, expected(), rtol=1e-10, atol=1e-10, msg=what)
            previous = now


@pytest.mark.parametrize("lite", [False, True], ids=["full", "lite"])
def test_eval_cache_is_invalidated_by_every_parameter_change(lite):
    torch.manual_seed(3)
    sources = [nn.Conv2d(3, 4, 3, padding=1).double() for _ in range(3)]
    layer = AggregatedLayer(sources, align=True, lite=lite).double()
    with torch.no_grad():
        layer.gate.expand.weight.normal_()
    check_cache_follows_parameters(layer, sources[0], torch.randn(2, 3, 6, 6, dtype=torch.float64))


class _NeverInvalidated(AggregatedLayer):
    """A planted bug: the cache is built once and never rebuilt."""

    def _cached(self, build):
        if self._eval_cache is None:
            self._eval_cache = (None, build())
        return self._eval_cache[1]


@pytest.mark.parametrize("lite", [False, True], ids=["full", "lite"])
def test_cache_check_catches_a_cache_that_never_invalidates(lite):
    torch.manual_seed(3)
    sources = [nn.Conv2d(3, 4, 3, padding=1).double() for _ in range(3)]
    layer = _NeverInvalidated(sources, align=True, lite=lite).double()
    with pytest.raises(AssertionError, match="unchanged after"):
        check_cache_follows_parameters(layer, sources[0], torch.randn(2, 3, 6, 6, dtype=torch.float64))


# ------------------------------------------------------------------ choosing formulations


def test_measure_times_each_survivor_and_skips_hopeless_candidates():
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
    choice = autotune.measure(candidates, macs)
    assert choice.chosen == "fast" and set(choice.seconds) == {"fast", "slow"}
    assert calls["hopeless"] == 0 and calls["fast"] == calls["slow"] == 1 + autotune.MEASURE_REPEATS
    # one survivor of the pruning: chosen without running anything
    calls = {name: 0 for name in calls}
    choice = autotune.measure(candidates, {"fast": 1.0, "slow": 10.0, "hopeless": 100.0})
    assert choice.chosen == "fast" and choice.seconds == {} and calls == {"fast": 0, "slow": 0, "hopeless": 0}


def _tiny_net(lite=False, formulation="auto"):
    torch.manual_seed(0)
    return nn.Sequential(
        AggregatedLayer([nn.Conv2d(3, 8, 3, padding=1) for _ in range(3)], lite=lite, formulation=formulation),
        nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
        AggregatedLayer([nn.Conv2d(8, 8, 1, stride=2) for _ in range(3)], lite=lite, formulation=formulation),
    )


@pytest.mark.parametrize("lite", [False, True], ids=["full", "lite"])
def test_tune_stores_choices_on_layers_and_changes_nothing_else(lite):
    net = _tiny_net(lite)
    x = torch.randn(6, 3, 8, 8)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    report = autotune.tune(net, x, mode="time", phases=("train", "eval"))
    # no random numbers drawn from any global stream, no parameter, buffer or mode changed
    after = (torch.rand(1).item(), random.random(), np.random.rand())
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    assert after == (torch.rand(1).item(), random.random(), np.random.rand())
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert net.training and all(p.grad is None for p in net.parameters())
    layers = autotune.aggregated_layers(net)
    assert set(report) == set(layers) == {"0", "4"}
    for name, layer in layers.items():
        assert layer.formulation_choice["train"] == report[name]["train"].chosen
        assert layer.formulation_choice["train"] in layer.candidate_formulations("train")
        assert layer.formulation_choice["eval"] in layer.candidate_formulations("eval")
        choice = report[name]["train"]
        if choice.seconds:  # several candidates within PRUNE_FACTOR of the cheapest: the fastest
            assert choice.chosen == min(choice.seconds, key=choice.seconds.get)
        else:  # one survivor: the cheapest by multiply-adds, nothing timed
            assert choice.chosen == autotune.by_fewest_macs(list(choice.macs), choice.macs)
    # The choices live on this model's layers only: a second model is untouched.
    other = _tiny_net(lite)
    assert autotune.formulation_choices(other) == {}
    # ...and the forward runs exactly the stored formulation.
    ran = []
    originals = {}
    for layer in layers.values():
        originals[layer] = layer._formulation
        layer._formulation = lambda n, layer=layer: (ran.append((layer, n)), originals[layer](n))[1]
    net(x)
    assert ran == [(layer, layer.formulation_choice["train"]) for layer in layers.values()]


def test_untuned_forward_takes_the_fewest_macs_and_macs_mode_stores_nothing():
    net = _tiny_net()
    x = torch.randn(6, 3, 8, 8)
    report = autotune.tune(net, x, mode="macs")
    assert autotune.formulation_choices(net) == {}
    for name, layer in autotune.aggregated_layers(net).items():
        macs = report[name]["train"].macs
        assert report[name]["train"].chosen == autotune.by_fewest_macs(layer.candidate_formulations("train"), macs)
        assert not report[name]["train"].seconds
    # The untuned forward applies the same rule per call.
    ran = []
    for layer in autotune.aggregated_layers(net).values():
        original = layer._formulation
        layer._formulation = lambda n, original=original: (ran.append(n), original(n))[1]
    net(x)
    assert ran == [report["0"]["train"].chosen, report["4"]["train"].chosen]


def test_choices_round_trip_and_bad_choices_are_refused():
    net = _tiny_net()
    autotune.tune(net, torch.randn(4, 3, 8, 8))
    choices = autotune.formulation_choices(net)
    fresh = _tiny_net()
    autotune.load_formulation_choices(fresh, choices)
    assert autotune.formulation_choices(fresh) == choices
    with pytest.raises(ValueError, match="does not have"):
        autotune.load_formulation_choices(fresh, {"nope": {"train": "grouped"}})
    with pytest.raises(ValueError, match="does not apply"):
        autotune.load_formulation_choices(fresh, {"0": {"train": "bmm"}})  # a 3x3 conv has no bmm
    autotune.clear_choices(fresh)
    assert autotune.formulation_choices(fresh) == {}


def test_tune_skips_layers_with_a_fixed_formulation():
    net = _tiny_net(formulation="stacked")
    assert autotune.tune(net, torch.randn(4, 3, 8, 8)) == {}


@contextlib.contextmanager
def forbid_backward_and_timing_inside_forward():
    """Counts every autograd backward/grad call and every clock read that happens while an
    AggregatedLayer.forward is on the stack; yields the list of offences."""
    offences, depth = [], [0]
    real_backward, real_grad = torch.autograd.backward, torch.autograd.grad
    real_clock = time.perf_counter

    def enter(module, args):
        if isinstance(module, AggregatedLayer):
            depth[0] += 1

    def leave(module, args, output):
        if isinstance(module, AggregatedLayer):
            depth[0] -= 1

    def guard(name, fn):
        def wrapped(*args, **kwargs):
            if depth[0]:
                offences.append(name)
            return fn(*args, **kwargs)
        return wrapped

    # Global hooks fire around every module's forward, subclasses' own forwards included.
    handles = [nn.modules.module.register_module_forward_pre_hook(enter),
               nn.modules.module.register_module_forward_hook(leave, always_call=True)]
    torch.autograd.backward = guard("backward", real_backward)
    torch.autograd.grad = guard("grad", real_grad)
    time.perf_counter = guard("perf_counter", real_clock)
    try:
        yield offences
    finally:
        for handle in handles:
            handle.remove()
        torch.autograd.backward, torch.autograd.grad = real_backward, real_grad
        time.perf_counter = real_clock


@pytest.mark.parametrize("lite", [False, True], ids=["full", "lite"])
def test_forward_never_times_or_starts_a_backward(lite):
    net = _tiny_net(lite)
    x = torch.randn(6, 3, 8, 8)
    with forbid_backward_and_timing_inside_forward() as offences:
        net(x).sum().backward()  # untuned: the multiply-add rule
        autotune.tune(net, x)  # tuning outside forward times and runs backward passes: allowed
        net(x).sum().backward()  # tuned
        net.eval()
        with torch.no_grad():
            net(x)
    assert offences == []


def test_the_guard_catches_a_backward_inside_forward():
    """Guards the test above: a layer that measured inside forward (as the old autotuner did)."""

    class MeasuresInForward(AggregatedLayer):
        def forward(self, x):
            probe = x.detach().requires_grad_(True)
            start = time.perf_counter()
            super().forward(probe).sum().backward()
            time.perf_counter() - start
            return super().forward(x)

    layer = MeasuresInForward([nn.Conv2d(3, 4, 3) for _ in range(2)])
    with forbid_backward_and_timing_inside_forward() as offences:
        layer(torch.randn(2, 3, 6, 6))
    assert "backward" in offences and "perf_counter" in offences
