"""Architectures shipped with zootune (no torchvision/timm needed) and a name -> builder registry.

The registry knows every architecture the docs name without importing the code that defines it:
``minizoo_resnet10_w8`` (the MiniZoo's) and ``minatar_qnet`` (the RL zoo's) are deferred builders
that import their module when called. ``timm:ARCH`` and ``torchvision:ARCH`` build the libraries'
architectures (:mod:`zootune.models.library`).
"""

from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from zootune.errors import ZootuneError
from zootune.models.resnet import ARCHITECTURES as _RESNETS
from zootune.models.resnet import ResNet, resnet18, resnet34, resnet50, resnet101, resnet_small
from zootune.models.mixer import MLPMixer, mixer_tiny32
from zootune.models.vit import VisionTransformer, vit_tiny32

from zootune.models.library import build_library_model, is_library_architecture


class DeferredBuilder:
    """``module:function``, imported when first called (picklable, no import at registration)."""

    def __init__(self, module: str, function: str):
        self.module, self.function = module, function

    def __call__(self, **kwargs) -> nn.Module:
        return getattr(importlib.import_module(self.module), self.function)(**kwargs)

    def __repr__(self) -> str:
        return f"DeferredBuilder({self.module}:{self.function})"


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = dict(_RESNETS)
ARCHITECTURES.update(
    resnet_small=resnet_small, vit_tiny32=vit_tiny32, mixer_tiny32=mixer_tiny32,
    # defined next to the data they were made for; registered here so that every name works at once
    minizoo_resnet10_w8=DeferredBuilder("zootune.minizoo.store", "minizoo_resnet"),
    minatar_qnet=DeferredBuilder("zootune.rl.qnet", "minatar_qnet"),
)


def register_architecture(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make ``builder(num_classes=..., **kw)`` available as ``--arch name`` and ``build_model(name)``."""
    ARCHITECTURES[name] = builder


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered architecture, or a library one (``timm:ARCH``, ``torchvision:ARCH``), by name."""
    if name not in ARCHITECTURES and is_library_architecture(name):
        return build_library_model(name, **kwargs)
    try:
        builder = ARCHITECTURES[name]
    except KeyError:
        raise ZootuneError(
            f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}, "
            "timm:ARCH, torchvision:ARCH"
        ) from None
    return builder(**kwargs)


__all__ = [
    "ARCHITECTURES", "DeferredBuilder", "ResNet", "build_library_model", "build_model", "is_library_architecture",
    "register_architecture",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet_small",
    "VisionTransformer", "vit_tiny32", "MLPMixer", "mixer_tiny32",
]
