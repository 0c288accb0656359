"""The shipped ResNets must have torchvision's exact state_dict layout."""

import torch

from zootune.models import resnet18, resnet50, resnet101, resnet_small

# Parameter counts of torchvision's resnet18/50/101 with a 1000-way head (torchvision docs).
TORCHVISION_PARAMS = {resnet18: 11_689_512, resnet50: 25_557_032, resnet101: 44_549_160}


def test_parameter_counts_match_torchvision():
    for builder, count in TORCHVISION_PARAMS.items():
        assert sum(p.numel() for p in builder().parameters()) == count


def test_resnet50_key_layout():
    sd = resnet50().state_dict()
    assert len(sd) == 320
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["fc.weight"].shape == (1000, 2048)
    # v1.5: the stride of a Bottleneck sits on the 3x3 conv
    assert resnet50().layer2[0].conv2.stride == (2, 2)


def test_small_resnet_runs_on_32px_and_keeps_layout():
    model = resnet_small(num_classes=7).eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    keys = set(model.state_dict())
    assert {"conv1.weight", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight", "fc.bias"} <= keys
