"""``Hub``: a named collection of pretrained models of *different* architectures (beside
:class:`zootune.Zoo`, whose members share one), with where to read each model's features.

Hub methods (Hub-Pathway) take a hub; a zoo can be turned into one (:func:`as_hub`).
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from zootune.errors import ZootuneError
from zootune.models.features import FeatureEntry, FeatureFn, feature_extractor


def _per_member(value, names: list[str], what: str) -> list:
    """Expand ``value`` (None, one entry for all, a sequence per member, or a dict by name)."""
    m = len(names)
    if value is None or isinstance(value, str) or callable(value):
        return [value] * m
    if isinstance(value, Mapping):
        unknown = set(value) - set(names)
        if unknown:
            raise ZootuneError(f"{what} names unknown hub members {sorted(unknown)}; members: {names}")
        return [value.get(name) for name in names]
    value = list(value)
    if len(value) != m:
        raise ZootuneError(f"{what} has {len(value)} entries but the hub has {m} models")
    return value


class Hub(Sequence[nn.Module]):
    """A named ordered collection of pretrained models of any architectures and feature sizes.

    Args:
        models: the pretrained models (any ``nn.Module``), or a :class:`zootune.Zoo`.
        names: one name per model (default: the zoo's names, else ``"<index>_<class name>"``).
        feature_fns: where to read each model's features: a method name (``"forward_features"``)
            or a callable ``fn(model, x)``. One value for all models, a list per model, or a dict
            by name; ``None`` entries use the default.
        feature_names: names of submodules whose *input* is the feature (e.g. ``"fc"``); the forward
            stops there. Same forms as ``feature_fns``; give at most one of the two per model.

    Default entry point: ``forward_features`` when the model has one, else the input of its head
    (see :mod:`zootune.models.features`).
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        names: Sequence[str] | None = None,
        feature_fns: FeatureEntry | Sequence[FeatureEntry] | Mapping[str, FeatureEntry] = None,
        feature_names: str | Sequence[str | None] | Mapping[str, str] | None = None,
    ):
        if names is None:
            names = getattr(models, "names", None)
        models = list(models)
        if not models:
            raise ZootuneError("a hub needs at least one model")
        for i, model in enumerate(models):
            if not isinstance(model, nn.Module):
                raise ZootuneError(f"hub member {i} is a {type(model).__name__}, not an nn.Module")
        names = [f"{i}_{type(m).__name__}" for i, m in enumerate(models)] if names is None else list(names)
        if len(names) != len(models):
            raise ZootuneError(f"{len(names)} names given for {len(models)} hub models")
        if len(set(names)) != len(names):
            raise ZootuneError(f"hub member names must be unique, got {names}")
        self.models = models
        self.names = names
        fns = _per_member(feature_fns, names, "feature_fns")
        modules = _per_member(feature_names, names, "feature_names")
        self.extractors: list[FeatureFn] = [
            feature_extractor(model, method=fn, module_input=module)
            for model, fn, module in zip(models, fns, modules)
        ]

    def __len__(self) -> int:
        return len(self.models)

    def __getitem__(self, index):
        return self.models[index]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.models)

    def features(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, d_index) of model ``index`` on ``x``."""
        return self.extractors[index](self.models[index], x)

    def __repr__(self) -> str:
        members = ", ".join(f"{n}: {type(m).__name__}" for n, m in zip(self.names, self.models))
        return f"Hub({members})"


def as_hub(models) -> Hub:
    """``models`` if it is a Hub, else a Hub of it with default entry points."""
    return models if isinstance(models, Hub) else Hub(models)
