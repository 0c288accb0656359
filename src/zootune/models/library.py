"""Architectures from timm and torchvision by name: ``timm:ARCH`` and ``torchvision:ARCH``.

``build_library_model("timm:convnext_atto", num_classes=10)`` is ``timm.create_model("convnext_atto",
pretrained=False, num_classes=10)``; ``"torchvision:resnet50"`` is
``torchvision.models.get_model("resnet50", weights=None, ...)``: random weights, nothing downloaded.
Pretrained members by name (``timm:resnet50.a1_in1k``) are :mod:`zootune.zoo.pretrained`'s. The
libraries are imported only when such a name is built.
"""

from __future__ import annotations

import importlib

from torch import nn

from zootune.errors import ZootuneError

LIBRARIES = {"timm": "timm", "torchvision": "torchvision"}


def is_library_architecture(name: str) -> bool:
    """Whether ``name`` is ``timm:ARCH`` or ``torchvision:ARCH``."""
    library, sep, arch = name.partition(":")
    return bool(sep) and library in LIBRARIES and bool(arch)


def import_library(library: str, what: str):
    try:
        return importlib.import_module(LIBRARIES[library])
    except ImportError as err:
        raise ZootuneError(f"{what} needs {library}, which is not installed here ({err}); "
                           f"`pip install {library}`") from None


def build_library_model(name: str, **kwargs) -> nn.Module:
    """A randomly initialised model of the library architecture ``name`` (``timm:ARCH``,
    ``torchvision:ARCH``); ``kwargs`` go to the library's builder (``num_classes=...``)."""
    library, _, arch = name.partition(":")
    if library not in LIBRARIES or not arch:
        raise ZootuneError(f"{name!r} is not a library architecture (timm:ARCH or torchvision:ARCH)")
    module = import_library(library, f"architecture {name!r}")
    if library == "timm":
        if not module.is_model(arch.partition(".")[0]):
            raise ZootuneError(f"timm has no architecture {arch!r} (see timm.list_models())")
        return module.create_model(arch, pretrained=False, **kwargs)
    from torchvision import models

    if arch not in models.list_models():
        raise ZootuneError(f"torchvision has no architecture {arch!r} (see torchvision.models.list_models())")
    return models.get_model(arch, weights=None, **kwargs)
