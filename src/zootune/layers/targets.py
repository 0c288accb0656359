"""Names of the layer types a zoo method aggregates (``target_types``; the CLI's ``--aggregate``).

``"conv"`` is Conv1d, Conv2d and Conv3d; ``"conv1d"``, ``"conv2d"``, ``"conv3d"`` and ``"linear"``
one type each. Subclasses count as their base type (timm's ``Conv2dSame`` is a Conv2d); whether a
subclass can be aggregated is :func:`zootune.layers.is_aggregatable`'s answer.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from zootune.errors import ZootuneError

LAYER_TYPE_NAMES: dict[str, tuple[type, ...]] = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv1d": (nn.Conv1d,), "conv2d": (nn.Conv2d,),
    "conv3d": (nn.Conv3d,), "linear": (nn.Linear,),
}


def resolve_layer_types(types: str | type | Iterable[str | type]) -> tuple[type, ...]:
    """Layer classes from classes and/or names (case-insensitive: ``"conv"``, ``"Linear"``, ``"Conv2d"``)."""
    if isinstance(types, (str, type)):
        types = [types]
    resolved: list[type] = []
    for item in types:
        if isinstance(item, type) and issubclass(item, nn.Module):
            found: tuple[type, ...] = (item,)
        elif isinstance(item, str) and item.strip().lower() in LAYER_TYPE_NAMES:
            found = LAYER_TYPE_NAMES[item.strip().lower()]
        else:
            raise ZootuneError(f"unknown layer type {item!r} to aggregate; use layer classes or the names "
                               f"{', '.join(LAYER_TYPE_NAMES)}")
        resolved += [t for t in found if t not in resolved]
    if not resolved:
        raise ZootuneError("no layer type to aggregate given: name at least one (e.g. conv, linear)")
    return tuple(resolved)
