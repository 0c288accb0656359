"""Architectures shipped with zootune (no torchvision/timm needed) and a name -> builder registry.

The registry knows every architecture the docs name without importing the code that defines it:
``minizoo_resnet10_w8`` (the MiniZoo's) and ``minatar_qnet`` (the RL zoo's) are deferred builders
that import their module when called. ``timm:NAME`` and ``torchvision:NAME`` build the libraries'
architectures (:func:`resolve_arch`).

Every registered architecture declares its options in :data:`ARCH_OPTIONS`
(:mod:`zootune.models.arch_options`); :func:`resolve_arch_options` checks options against that
table, or against the builder's signature for the libraries' and ``module:function`` architectures.
"""

from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from zootune.errors import UntrustedCodeError, ZootuneError
from zootune.models.arch_options import ARCH_OPTIONS
from zootune.models.resnet import ARCHITECTURES as _RESNETS
from zootune.models.resnet import ResNet, resnet18, resnet34, resnet50, resnet101, resnet_small
from zootune.models.mixer import MLPMixer, mixer_tiny32
from zootune.models.vit import VisionTransformer, vit_tiny32
from zootune.options import check_kwargs


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


def register_architecture(name: str, builder: Callable[..., nn.Module], options: type | None = None) -> None:
    """Make ``builder(num_classes=..., **kw)`` available as ``--arch name`` and ``build_model(name)``.

    ``options``: its option table (a dataclass, see :mod:`zootune.models.arch_options`); without one,
    options are checked against ``builder``'s signature only.
    """
    ARCHITECTURES[name] = builder
    if options is None:
        ARCH_OPTIONS.pop(name, None)
    else:
        ARCH_OPTIONS[name] = options


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered architecture, or a library's (``timm:NAME``, ``torchvision:NAME``), by name;
    ``kwargs`` are checked first (:func:`resolve_arch_options`)."""
    if name not in ARCHITECTURES and name.partition(":")[0] not in ARCH_NAMESPACES:
        raise ZootuneError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    builder, checked = resolve_arch_options(name, kwargs)
    return builder(**checked)


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


def resolve_arch(spec: str, *, trust_code: bool = False, origin: str = "--arch") -> Callable[..., nn.Module]:
    """The builder named by ``spec``: a registered architecture (``resnet50``), a model of a library's
    own registry (``timm:convnext_atto``, ``torchvision:resnet18``), or -- only with
    ``trust_code=True`` -- ``module:function``, imported and called. ``origin`` says where the name
    came from, for the message that refuses untrusted code."""
    if not isinstance(spec, str) or not spec:
        raise ZootuneError(f"{origin}: an architecture must be a name, got {spec!r}")
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in ARCH_NAMESPACES:
        return _library_builder(prefix, rest)
    if sep:
        if not trust_code:
            raise UntrustedCodeError(
                f"{origin} names code to import ({spec!r}); zootune never imports code named in a file or "
                "option unless told to: pass --trust-code (trust_code=True in Python) if you trust its source")
        import importlib

        try:
            module = importlib.import_module(prefix)
        except ImportError as e:
            raise ZootuneError(f"cannot import module {prefix!r} for {origin} {spec}: {e}") from None
        builder = getattr(module, rest, None)
        if not callable(builder):
            raise ZootuneError(f"module {prefix!r} has no callable {rest!r} ({origin} {spec})")
        return builder
    if spec not in ARCHITECTURES:
        raise ZootuneError(
            f"unknown architecture {spec!r} ({origin}); known: {', '.join(sorted(ARCHITECTURES))}, "
            f"or {'/'.join(ARCH_NAMESPACES)}:NAME")
    return ARCHITECTURES[spec]


def resolve_arch_options(spec: str, arch_kwargs: dict | None, *, trust_code: bool = False,
                         origin: str = "--arch") -> tuple[Callable[..., nn.Module], dict]:
    """The builder named by ``spec`` (:func:`resolve_arch`) and ``arch_kwargs`` checked for it before
    anything is built: against the architecture's option table (:data:`ARCH_OPTIONS`: names, types,
    ranges, names the architecture fixes) when it is registered with one, else against the builder's
    signature (``timm:``, ``torchvision:``, ``module:function``). :class:`zootune.errors.OptionError`
    naming the architecture, the option and what is valid."""
    builder = resolve_arch(spec, trust_code=trust_code, origin=origin)
    table = ARCH_OPTIONS.get(spec) if spec in ARCHITECTURES else None
    return builder, check_kwargs(table or builder, arch_kwargs, what=f"architecture {spec!r}")


__all__ = [
    "ARCHITECTURES", "ARCH_NAMESPACES", "ARCH_OPTIONS", "DeferredBuilder", "ResNet", "build_model",
    "register_architecture", "resolve_arch", "resolve_arch_options",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet_small",
    "VisionTransformer", "vit_tiny32", "MLPMixer", "mixer_tiny32",
]
