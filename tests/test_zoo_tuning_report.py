"""Nothing left out silently: the layer report, type names, attention, conv heads (issue 14).

The models are tiny stand-ins, written here, for what torchvision and timm do (the interop lane runs
the real libraries): a ViT-like block with nn.MultiheadAttention, a head that is a 1x1 convolution
on pooled features (BiT), a convolution subclass with a forward of its own.
"""

import re
import warnings

import pytest
import torch
from torch import nn

from zootune.errors import ZootuneError
from zootune.methods.zoo_tuning import ZooTuning
from zootune.models import resnet_small
from zootune.models.resnet import Bottleneck, ResNet
from zootune.models.heads import find_head_name, head_in_features


class AttentionBlock(nn.Module):
    """Patch embedding (conv), one attention block and an MLP on tokens, a Linear head."""

    def __init__(self, dim=8, classes=5):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        h = self.norm(tokens)
        tokens = tokens + self.attn(h, h, h, need_weights=False)[0]
        tokens = tokens + self.mlp(tokens)
        return self.head(tokens.mean(1))


class PointwiseHeadNet(nn.Module):
    """BiT-like: conv body, global pooling kept as a map, a 1x1 conv head, then flatten."""

    def __init__(self, classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.GroupNorm(2, 16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(16, classes, 1)
        self.flatten = nn.Flatten(1)

    def forward(self, x):
        return self.flatten(self.fc(self.pool(self.body(x))))


class DoubledConv(nn.Conv2d):
    def forward(self, x):  # not the plain conv: zootune must not pretend to compute it
        return 2 * super().forward(x)


def zoo_of(make, m=2):
    models = []
    for seed in range(m):
        torch.manual_seed(seed)
        models.append(make())
    return models


@pytest.mark.filterwarnings("ignore:Zoo-Tuning aggregates only")
def test_report_lists_every_module_with_parameters_and_why():
    zoo = zoo_of(lambda: resnet_small(num_classes=7, depth=10, width=4))
    model = ZooTuning(zoo, num_outputs=3, exclude="layer4.*")
    report = model.report
    convs = {n for n, m in zoo[0].named_modules() if isinstance(m, nn.Conv2d)}
    norms = {n for n, m in zoo[0].named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert set(report.aggregated) == {n for n in convs if not n.startswith("layer4.")}
    assert set(report.aggregated) == set(model.config.aggregated_layers)
    averaged = report.averaged
    assert set(averaged) == norms | {n for n in convs if n.startswith("layer4.")}
    assert all("exclude" in averaged[n] for n in convs if n.startswith("layer4."))
    assert all("normalisation" in averaged[n] and "reset" in averaged[n] for n in norms)
    assert [layer.name for layer in report.of("new head")] == ["fc"]
    # the fraction, counted here from the member's own layers
    params = {n: sum(p.numel() for p in m.parameters(recurse=False)) for n, m in zoo[0].named_modules()}
    body = sum(v for n, v in params.items() if n != "fc")
    assert report.aggregated_fraction() == pytest.approx(sum(params[n] for n in report.aggregated) / body)
    text = report.summary()
    assert "exclude" in text and "new head: fc" in text


def test_attention_out_proj_is_left_out_with_the_reason_and_the_model_runs():
    # torchvision's vit_b_16 with Linear targets failed at the first forward: nn.MultiheadAttention
    # reads out_proj.weight directly, and an aggregation layer has no .weight.
    zoo = zoo_of(AttentionBlock)
    model = ZooTuning(zoo, num_outputs=3, target_types=("conv", "linear"), formulation="grouped")
    assert "attn.out_proj" not in model.report.aggregated
    assert "reads out_proj.weight directly" in model.report.averaged["attn.out_proj"]
    assert {"patch", "mlp.0", "mlp.2"} <= set(model.report.aggregated)
    out = model(torch.randn(2, 3, 8, 8))
    out.sum().backward()
    assert out.shape == (2, 3)


def test_warns_when_most_parameters_are_only_averaged_and_says_how_to_change_it():
    zoo = zoo_of(AttentionBlock)
    with pytest.warns(UserWarning, match=r"aggregates only .*--aggregate"):
        model = ZooTuning(zoo, num_outputs=3)  # default: convolutions only -> the patch embedding alone
    assert model.report.aggregated == ["patch"]
    assert model.report.aggregated_fraction() < 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ResNet is almost all convolutions: no warning
        ZooTuning(zoo_of(lambda: resnet_small(num_classes=7, depth=10, width=4)), num_outputs=3)


@pytest.mark.filterwarnings("ignore:Zoo-Tuning aggregates only")
def test_target_types_by_name_and_unknown_names_refused():
    zoo = zoo_of(AttentionBlock)
    by_name = ZooTuning(zoo, num_outputs=3, target_types=["Linear"], formulation="grouped")
    by_class = ZooTuning(zoo, num_outputs=3, target_types=[nn.Linear], formulation="grouped")
    assert by_name.report.aggregated == by_class.report.aggregated == ["mlp.0", "mlp.2"]
    assert by_name.config.target_types == ["Linear"]
    with pytest.raises(ZootuneError, match="unknown layer type .lnear. to aggregate"):
        ZooTuning(zoo, num_outputs=3, target_types=["lnear"])


def test_conv_subclass_with_its_own_forward_is_listed_not_aggregated():
    def make():
        model = resnet_small(num_classes=7, depth=10, width=4)
        model.conv1 = DoubledConv(3, 4, 3, padding=1, bias=False)
        return model
    model = ZooTuning(zoo_of(make), num_outputs=3)
    assert "conv1" not in model.report.aggregated
    assert "own forward" in model.report.averaged["conv1"]
    assert type(model.model.conv1) is DoubledConv  # kept, averaged over the sources


def test_final_pointwise_conv_is_the_head_and_lite_folds_into_the_same_layout():
    zoo = zoo_of(PointwiseHeadNet)
    assert find_head_name(zoo[0]) == "fc" and head_in_features(zoo[0]) == 16
    model = ZooTuning(zoo, num_outputs=4, lite=True, formulation="grouped")  # Lite: shared kernel
    assert isinstance(model.model.fc, nn.Conv2d) and model.model.fc.out_channels == 4
    x = torch.randn(4, 3, 8, 8)
    model.train()
    model(x)
    model.eval()
    plain = model.merge_and_unload()
    fresh = PointwiseHeadNet(classes=4)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x))
    # members whose heads differ (another number of classes) still make a zoo: the head is replaced
    other = PointwiseHeadNet(classes=3)
    assert ZooTuning([zoo[0], other], num_outputs=2).model.fc.out_channels == 2


def test_named_conv_head_and_headless_resnet():
    zoo = zoo_of(PointwiseHeadNet)
    model = ZooTuning(zoo, num_outputs=4, head_name="fc")
    assert model.report.of("new head")[0].name == "fc"
    headless = ResNet(Bottleneck, (1, 1, 1, 1), widths=(2, 4, 8, 16))
    headless.fc = nn.Identity()
    # the last 1x1 conv of a bottleneck is followed by its norm: not a head
    with pytest.raises(ZootuneError, match="cannot find a head"):
        find_head_name(headless)


def members_with_own_statistics(m=3):
    """Tiny ResNets whose norm layers hold statistics and affine values of their own, as pretrained
    members do (a fresh model's are 0/1 in every member, which would hide which member's are used)."""
    zoo = zoo_of(lambda: resnet_small(num_classes=7, depth=10, width=4), m)
    with torch.no_grad():
        for i, member in enumerate(zoo):
            for module in member.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.5, 0.5)
                    module.running_mean.uniform_(-1, 1)
                    module.running_var.uniform_(0.5, 2)
                    module.num_batches_tracked.fill_(10 + i)
    return zoo


@pytest.mark.parametrize("options, action, start, norm_words", [
    (dict(variant="paper"), "averaged", None, ["affine = mean over the sources", "running statistics reset"]),
    (dict(variant="paper", keep_bn_stats=True), "averaged", None, ["affine = mean", "statistics kept (mean"]),
    (dict(variant="robust"), "averaged", None, ["affine = mean over the sources", "running statistics reset"]),
    # a start member with the mean norms: the paper's start on a member, or the robust one asked for it
    (dict(variant="paper", start_member=1), "averaged", None, ["affine = mean over the sources", "reset"]),
    (dict(variant="robust", start_member=1, norm_init="mean"), "averaged", None, ["affine = mean", "reset"]),
    (dict(variant="robust", member_scores=[0.1, 0.9, 0.5], prune_margin=float("inf")), "copied", 1,
     ["affine and running statistics = the start member's (zoo member 1)"]),
    (dict(variant="robust", start_member=2, keep_members=[0, 2], keep_bn_stats=True), "copied", 2,
     ["affine and running statistics = the start member's (zoo member 2)"]),
    (dict(variant="paper", start_member=0, norm_init="start"), "copied", 0,
     ["affine and running statistics = the start member's (zoo member 0)"]),
])
def test_report_says_what_the_untargeted_modules_hold_and_the_model_holds_it(options, action, start, norm_words):
    zoo = members_with_own_statistics()
    heading = ("averaged over the sources" if start is None
               else f"copied from the start member (zoo member {start})")
    with pytest.warns(UserWarning, match=re.escape(f"the rest is {heading}")):  # layer4 left out: most parameters
        model = ZooTuning(zoo, num_outputs=3, exclude="layer4.*", **options)
    report = model.report
    kept = [zoo[i] for i in model.config.kept_members]
    assert report.start_member == start
    untargeted = report.untargeted
    assert untargeted and {layer.action for layer in report.layers if layer.name in untargeted} == {action}
    built = dict(model.model.named_modules())
    for name in untargeted:
        module = built[name]
        reason = untargeted[name]
        if isinstance(module, nn.BatchNorm2d):
            assert all(words in reason for words in norm_words), reason
            assert ("mean" in reason) == (start is None) and ("reset" in reason) == (
                start is None and not options.get("keep_bn_stats")), reason
        # what the model holds is what the report says: the start member's tensors, or the mean
        for key, value in {**dict(module.named_parameters(recurse=False)),
                           **dict(module.named_buffers(recurse=False))}.items():
            sources = [getattr(m.get_submodule(name), key) for m in kept]
            if start is not None:
                assert torch.equal(value, getattr(zoo[start].get_submodule(name), key)), (name, key)
            elif key == "num_batches_tracked" or (key.startswith("running_") and not options.get("keep_bn_stats")):
                reset = {"running_mean": 0.0, "running_var": 1.0, "num_batches_tracked": 0}[key]
                assert bool((value == reset).all()), (name, key)
            else:
                torch.testing.assert_close(value, torch.stack([s.detach() for s in sources]).mean(0))
    text = report.summary()
    lines = [line for line in text.splitlines()[1:] if not line.strip().startswith("new head")]
    assert lines and all(line.strip().startswith(heading) for line in lines), text
    assert ("mean over the sources" in text) == (start is None), text
