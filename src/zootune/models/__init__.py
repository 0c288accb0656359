"""Architectures shipped with zootune (no torchvision/timm needed) and a name -> builder registry.

The registry knows every architecture the docs name without importing the code that defines it:
``minizoo_resnet10_w8`` (the MiniZoo's) and ``minatar_qnet`` (the RL zoo's) are deferred builders
that import their module when called. ``timm:NAME`` and ``torchvision:NAME`` build the libraries'
architectures (:func:`resolve_arch`).
"""

from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from zootune.errors import UntrustedCodeError, ZootuneError
from zootune.models.resnet import ARCHITECTURES as _RESNETS
from zootune.models.resnet import ResNet, resnet18, resnet34, resnet50, resnet101, resnet_small
from zootune.models.mixer import MLPMixer, mixer_tiny32
from zootune.models.vit import VisionTransformer, vit_tiny32



class DeferredBuilder:
    """``module:function`` of zootune itself, imported when first called (picklable; registering it
    imports nothing)."""

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
    """Build a registered architecture, or a library's (``timm:NAME``, ``torchvision:NAME``), by name."""
    if name not in ARCHITECTURES and name.partition(":")[0] in ARCH_NAMESPACES:
        return resolve_arch(name)(**kwargs)
    try:
        builder = ARCHITECTURES[name]
    except KeyError:
        raise ZootuneError(
            f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
    return builder(**kwargs)


def _library_builder(library: str, name: str) -> Callable[..., nn.Module]:
    """A builder from a model library's own registry (no arbitrary import: only names it registers)."""
    import importlib

    try:
        module = importlib.import_module(library)
    except ImportError:
        raise ZootuneError(f"architecture {library}:{name} needs {library}, which is not installed "
                           f"(pip install {library})") from None
    if library == "timm":
        if not module.is_model(name):
            raise ZootuneError(f"timm has no model {name!r} (timm.list_models() lists them)")
        return lambda **kw: module.create_model(name, pretrained=False, **kw)
    if name not in module.models.list_models():
        raise ZootuneError(f"torchvision has no model {name!r} (torchvision.models.list_models() lists them)")
    return lambda **kw: module.models.get_model(name, weights=None, **kw)


ARCH_NAMESPACES = ("timm", "torchvision")


def resolve_arch(spec: str, *, trust_code: bool = False, source: str = "--arch") -> Callable[..., nn.Module]:
    """The builder named by ``spec``: a registered architecture (``resnet50``), a model of a library's
    own registry (``timm:convnext_atto``, ``torchvision:resnet18``), or -- only with
    ``trust_code=True`` -- ``module:function``, imported and called. ``source`` says where the name
    came from, for the message that refuses untrusted code."""
    if not isinstance(spec, str) or not spec:
        raise ZootuneError(f"{source}: an architecture must be a name, got {spec!r}")
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in ARCH_NAMESPACES:
        return _library_builder(prefix, rest)
    if sep:
        if not trust_code:
            raise UntrustedCodeError(
                f"{source} names code to import ({spec!r}); zootune never imports code named in a file or "
                "option unless told to: pass --trust-code (trust_code=True in Python) if you trust its source")
        import importlib

        try:
            module = importlib.import_module(prefix)
        except ImportError as e:
            raise ZootuneError(f"cannot import module {prefix!r} for {source} {spec}: {e}") from None
        builder = getattr(module, rest, None)
        if not callable(builder):
            raise ZootuneError(f"module {prefix!r} has no callable {rest!r} ({source} {spec})")
        return builder
    if spec not in ARCHITECTURES:
        raise ZootuneError(
            f"unknown architecture {spec!r} ({source}); known: {', '.join(sorted(ARCHITECTURES))}, "
            f"or {'/'.join(ARCH_NAMESPACES)}:NAME")
    return ARCHITECTURES[spec]


__all__ = [
    "ARCHITECTURES", "ARCH_NAMESPACES", "DeferredBuilder", "ResNet", "build_model", "register_architecture",
    "resolve_arch",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet_small",
    "VisionTransformer", "vit_tiny32", "MLPMixer", "mixer_tiny32",
]
