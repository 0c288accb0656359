"""Layers the libraries write their own way, and the report of what Zoo-Tuning left out (issue 14).

- timm's Conv2dSame (tf_* models) and StdConv2d / StdConv2dSame (BiT) used to be skipped without a
  word; they are aggregated now, and each is checked here against timm's OWN layer run one sample at
  a time with the aggregated kernel (for StdConv the per-source standardisation is done by hand,
  timm's layer applies the outer one itself).
- torchvision's vit_b_16 with Linear targets built, then failed at the first forward
  (nn.MultiheadAttention reads out_proj.weight); a ViT with the default targets aggregated its patch
  embedding alone and said nothing.
- BiT's head is a 1x1 convolution: "cannot find a head in ResNetV2", and head_name= did not help.
"""

from __future__ import annotations

import copy

import pytest
import torch
from interop_helpers import CLASSES, FAMILIES, build, images, needs_timm, needs_torchvision
from torch import nn

from zootune.layers import AggregatedLayer
from zootune.layers.variants import standardize
from zootune.methods.zoo_tuning import ZooTuning
from zootune.models.heads import find_head_name


def timm_layer(kind: str):
    from timm.layers import Conv2dSame, StdConv2d, StdConv2dSame

    return {
        "Conv2dSame k3 s2": lambda: Conv2dSame(4, 6, 3, stride=2),
        "Conv2dSame k5 s1": lambda: Conv2dSame(4, 6, 5, bias=False),
        "StdConv2d k3": lambda: StdConv2d(4, 6, 3, eps=1e-8),
        "StdConv2d k1 s2": lambda: StdConv2d(4, 6, 1, stride=2),
        "StdConv2dSame k3 s2 (dynamic)": lambda: StdConv2dSame(4, 6, 3, stride=2),
        "StdConv2dSame k3 s1 (static)": lambda: StdConv2dSame(4, 6, 3),
    }[kind]


@needs_timm
@pytest.mark.parametrize("kind", ["Conv2dSame k3 s2", "Conv2dSame k5 s1", "StdConv2d k3", "StdConv2d k1 s2",
                                  "StdConv2dSame k3 s2 (dynamic)", "StdConv2dSame k3 s1 (static)"])
@pytest.mark.parametrize("lite", [False, True])
def test_timm_variant_layers_aggregate_as_timm_computes_them(kind, lite):
    sources = [timm_layer(kind)().double() for _ in range(3)]
    with torch.no_grad():
        for s in sources:  # raw weights with per-channel offsets and scales
            s.weight.mul_(3).add_(torch.randn(s.weight.shape[0], 1, 1, 1, dtype=torch.float64))
    layer = AggregatedLayer(sources, align=True, lite=lite, formulation="grouped").double()
    with torch.no_grad():
        layer.align.weight.add_(0.2 * torch.randn_like(layer.align.weight))
        layer.gate.expand.weight.normal_()
    x = torch.randn(3, 4, 7, 9, dtype=torch.float64)
    standardized = hasattr(sources[0], "eps")
    layer.eval()
    with torch.no_grad():
        got = layer(x)
        gates = layer.gate_ema.expand(3, -1) if lite else layer.gate(x)
        rows = []
        for b in range(3):
            kernel = 0
            for i, source in enumerate(sources):
                w = standardize(source.weight, source.eps, 0) if standardized else source.weight
                kernel = kernel + gates[b, i] * (layer.align.weight[i] @ w.reshape(6, -1)).reshape(w.shape)
            reference = copy.deepcopy(sources[0])
            reference.weight.copy_(kernel)
            if reference.bias is not None:
                reference.bias.copy_(sum(gates[b, i] * layer.align.weight[i] @ s.bias for i, s in enumerate(sources)))
            rows.append(reference(x[b:b + 1]))  # timm's own forward: padding and outer standardisation
        torch.testing.assert_close(got, torch.cat(rows), rtol=1e-9, atol=1e-9)
        if lite:
            plain = layer.merge()
            assert type(plain) is type(sources[0])
            torch.testing.assert_close(plain(x), got, rtol=1e-9, atol=1e-9)


@needs_timm
@pytest.mark.parametrize("name, variant", [("timm_tf_efficientnet_b0", "Conv2dSame"),
                                           ("timm_resnetv2_50x1_bit", "StdConv2d")])
def test_variant_layers_of_real_models_are_aggregated_not_skipped(name, variant):
    family = FAMILIES[name]
    members = [build(family, seed) for seed in range(2)]
    model = ZooTuning(members, num_outputs=CLASSES, formulation="grouped")
    convs = [n for n, m in members[0].named_modules() if isinstance(m, nn.Conv2d) and n != model.config.head_name]
    variants = [n for n in convs if type(members[0].get_submodule(n)).__name__ == variant]
    assert variants, f"no {variant} in {name}"
    assert set(convs) <= set(model.report.aggregated)
    assert not any("own forward" in reason for reason in model.report.averaged.values())


@pytest.fixture(scope="module")
def vit_b_16_members():
    return [build(FAMILIES["tv_vit_b_16"], seed) for seed in range(2)]


@needs_torchvision
def test_vit_b_16_aggregates_linear_layers_except_attention_out_proj(vit_b_16_members):
    # (test_families trains this configuration a step: it failed with AttributeError:
    # 'AggregatedLayer' object has no attribute 'weight')
    model = ZooTuning(vit_b_16_members, num_outputs=CLASSES, target_types=("conv", "linear"), formulation="grouped")
    out_projs = [n for n in model.report.averaged if n.endswith("self_attention.out_proj")]
    assert len(out_projs) == 12
    assert all("reads out_proj.weight directly" in model.report.averaged[n] for n in out_projs)
    assert "encoder.layers.encoder_layer_0.mlp.0" in model.report.aggregated
    with torch.no_grad():
        assert model.eval()(images()).shape == (4, CLASSES)


@needs_torchvision
def test_vit_with_default_targets_warns_and_the_report_says_why(vit_b_16_members):
    members = vit_b_16_members
    with pytest.warns(UserWarning, match=r"aggregates only 0\.\d% .*Linear layers are not in target_types"):
        model = ZooTuning(members, num_outputs=CLASSES, formulation="grouped")
    assert model.report.aggregated == ["conv_proj"]
    assert "Linear layers are not in target_types" in model.report.summary()


@needs_timm
def test_bit_head_is_its_final_pointwise_conv_or_named():
    members = [build(FAMILIES["timm_resnetv2_50x1_bit"], seed) for seed in range(2)]
    assert find_head_name(members[0]) == "head.fc"
    for head_name in (None, "head.fc"):
        model = ZooTuning(members, num_outputs=CLASSES, head_name=head_name, lite=True, formulation="grouped")
        head = model.model.get_submodule("head.fc")
        assert isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1) and head.out_channels == CLASSES
        assert model(images()).shape == (4, CLASSES)
