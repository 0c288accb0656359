"""zootune's ResNets are torchvision's: the same keys in the same order, strict loads both ways, and
the same outputs (exactly) in train and eval mode -- so torchvision checkpoints load as they are."""

from __future__ import annotations

import pytest
import torch
from interop_helpers import images, needs_torchvision

from zootune.models import build_model


@needs_torchvision
@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_zootune_resnet_equals_torchvision(arch):
    import torchvision

    torch.manual_seed(0)
    theirs = torchvision.models.get_model(arch, weights=None, num_classes=10)
    ours = build_model(arch, num_classes=10)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = images(2)
    for train in (True, False):
        ours.train(train), theirs.train(train)
        with torch.no_grad():
            assert torch.equal(ours(x), theirs(x)), f"{arch}, train={train}"
