"""The documented hook through which pretext heads see a backbone.

A pretext head reads either

- **pooled features** (B, D): ``model.forward_features(x)`` (zootune's ResNets, ViT and MLP-Mixer
  define it), or
- a **feature map** (B, C, h, w): ``model.forward_feature_map(x)`` if the model defines it (a ViT or
  Mixer can return its patch tokens reshaped to the patch grid), else, for a torchvision-layout
  ResNet (``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1``..``layer4``), the output of
  ``layer4``.

Dense pretext tasks (segmentation, keypoint heatmaps) use the feature map; image-level tasks
(classification, contrastive, counting) use pooled features. Any model giving these two functions can
be pretrained by :func:`zootune.minizoo.pretrain`.
"""

from __future__ import annotations

import torch
from torch import nn

from zootune.errors import ZootuneError

_RESNET_PARTS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def feature_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) features for dense pretext heads (see the module docstring)."""
    if hasattr(model, "forward_feature_map"):
        return model.forward_feature_map(x)
    if all(hasattr(model, part) for part in _RESNET_PARTS):
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        return model.layer4(model.layer3(model.layer2(model.layer1(x))))
    raise ZootuneError(
        f"{type(model).__name__} has no forward_feature_map(x) -> (B, C, h, w) and is not a "
        "torchvision-layout ResNet; define forward_feature_map to pretrain it on dense tasks"
    )


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, D) features for image-level pretext heads."""
    if hasattr(model, "forward_features"):
        return model.forward_features(x)
    return feature_map(model, x).mean(dim=(2, 3))
