"""Architectures shipped with zootune (no torchvision/timm needed) and a name -> builder registry."""

from __future__ import annotations

from typing import Callable

from torch import nn

from zootune.errors import ZootuneError
from zootune.models.resnet import ARCHITECTURES as _RESNETS
from zootune.models.resnet import ResNet, resnet18, resnet34, resnet50, resnet101, resnet_small
from zootune.models.mixer import MLPMixer, mixer_tiny32
from zootune.models.vit import VisionTransformer, vit_tiny32

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = dict(_RESNETS)
ARCHITECTURES.update(vit_tiny32=vit_tiny32, mixer_tiny32=mixer_tiny32)


def register_architecture(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make ``builder(num_classes=..., **kw)`` available as ``--arch name`` and ``build_model(name)``."""
    ARCHITECTURES[name] = builder


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered architecture by name."""
    try:
        builder = ARCHITECTURES[name]
    except KeyError:
        raise ZootuneError(
            f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
    return builder(**kwargs)


__all__ = [
    "ARCHITECTURES", "ResNet", "build_model", "register_architecture",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet_small",
    "VisionTransformer", "vit_tiny32", "MLPMixer", "mixer_tiny32",
]
