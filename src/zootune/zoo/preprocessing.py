"""The preprocessing a pretrained checkpoint expects: mean, std, input size, interpolation, crop.

A checkpoint was trained on images prepared one way; feeding it images normalised with other
statistics shifts every first-layer activation. For zoos by name the values come from the library's
own pretrained configuration (timm: ``timm.data.resolve_data_config``; torchvision: the weights'
``transforms()``), never from zootune's fixed ImageNet statistics.

:func:`data_config` gives a plain dict ``{mean, std, input_size, interpolation, crop_pct}`` that a
data loader can take; :func:`disagreements` says where a zoo's members expect different inputs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from torch import nn


@dataclass(frozen=True)
class DataConfig:
    """Input preprocessing of a checkpoint.

    ``input_size`` is (C, H, W) of the network's input (the centre crop); ``crop_pct`` = crop side /
    resize side at evaluation (torchvision: 224 / 232 for ResNet-50 V2 weights); ``interpolation`` a
    lower-case name (``"bilinear"``, ``"bicubic"``); ``origin`` says where the values were read.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]
    interpolation: str
    crop_pct: float
    origin: str = ""

    def to_dict(self) -> dict[str, Any]:
        """``{mean, std, input_size, interpolation, crop_pct}``: what a data loader takes."""
        return {k: v for k, v in asdict(self).items() if k != "origin"}


def from_timm(model: nn.Module) -> DataConfig:
    """The data config timm resolves for a model built by timm (its ``pretrained_cfg``)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config(model=model)
    return DataConfig(
        mean=tuple(float(v) for v in cfg["mean"]), std=tuple(float(v) for v in cfg["std"]),
        input_size=tuple(int(v) for v in cfg["input_size"]), interpolation=str(cfg["interpolation"]),
        crop_pct=float(cfg["crop_pct"]),
        origin=f"timm pretrained_cfg of {getattr(model, 'pretrained_cfg', {}).get('architecture', '?')}"
               f".{getattr(model, 'pretrained_cfg', {}).get('tag', '')}",
    )


def from_torchvision(weights) -> DataConfig | None:
    """The data config of a torchvision weights enum member (``weights.transforms()``), or None when
    its transforms are not image classification ones (video, segmentation, ...)."""
    transforms = weights.transforms()
    needed = ("crop_size", "resize_size", "mean", "std", "interpolation")
    if not all(hasattr(transforms, name) for name in needed):
        return None
    crop, resize = transforms.crop_size[0], transforms.resize_size[0]
    interpolation = getattr(transforms.interpolation, "value", transforms.interpolation)
    return DataConfig(
        mean=tuple(float(v) for v in transforms.mean), std=tuple(float(v) for v in transforms.std),
        input_size=(3, int(crop), int(crop)), interpolation=str(interpolation).lower(),
        crop_pct=float(crop) / float(resize), origin=f"torchvision {type(weights).__name__}.{weights.name}.transforms()",
    )


def data_config(model_or_zoo) -> dict[str, Any] | None:
    """``{mean, std, input_size, interpolation, crop_pct}`` for a zoo loaded by name (its members'
    agreed config, member 0's when they differ), a zoo member, or a timm model; None when unknown
    (then the caller's defaults apply)."""
    config = getattr(model_or_zoo, "data_config", None)
    if isinstance(config, DataConfig):
        return config.to_dict()
    if isinstance(model_or_zoo, nn.Module) and isinstance(getattr(model_or_zoo, "pretrained_cfg", None), Mapping):
        try:
            return from_timm(model_or_zoo).to_dict()
        except ImportError:
            return None
    return None


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b))
    return a != b


def disagreements(configs: Sequence[DataConfig | None], names: Sequence[str]) -> list[str]:
    """One line per member whose preprocessing differs from the first member's that has one, naming
    the fields and both values (``[]`` when they all agree)."""
    known = [(name, config) for name, config in zip(names, configs) if config is not None]
    lines = [f"{name}: no preprocessing in its pretrained config" for name, config in zip(names, configs)
             if config is None]
    if not known:
        return lines
    reference_name, reference = known[0]
    for name, config in known[1:]:
        fields = [f"{field} {getattr(config, field)} (vs {getattr(reference, field)})"
                  for field in ("mean", "std", "input_size", "interpolation", "crop_pct")
                  if _differs(getattr(config, field), getattr(reference, field))]
        if fields:
            lines.append(f"{name} expects {', '.join(fields)} of {reference_name}")
    return lines
