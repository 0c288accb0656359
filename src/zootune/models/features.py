"""Feature-extractor entry points: where to read a model's features, for any ``nn.Module``.

A hub method puts its own head on each member's features, so it needs, per member, a function
``extract(model, x) -> (B, d)``. The user names it one of three ways:

- a **method name** (``"forward_features"``, ``"encode"``, ...): ``getattr(model, name)(x)``;
- a **module name** whose *input* is the feature (``"fc"``, ``"head"``, ``"classifier.1"``): the
  model's ordinary forward runs until that module is called; a forward pre-hook takes its input and
  stops the forward there, so the layers after it are never executed (nor counted as FLOPs);
- a **callable** ``fn(model, x)``.

Without a name: ``forward_features`` if the model has it, else the input of its head
(:func:`zootune.models.heads.find_head_name`). Features of more than two dimensions are pooled:
(B, C, H, W) by the spatial mean, (B, N, C) tokens by the token mean.

Extractors take the model as an argument (rather than closing over it) so that a deep copy of the
model works with the same extractor.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import nn

from zootune.errors import ZootuneError
from zootune.models.heads import find_head_name

FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
FeatureEntry = Union[str, FeatureFn, None]


def pool_features(features: torch.Tensor) -> torch.Tensor:
    """(B, d) features from (B, d), (B, N, d) tokens or (B, C, H, W) maps."""
    if features.dim() == 2:
        return features
    if features.dim() == 3:
        return features.mean(dim=1)
    if features.dim() == 4:
        return features.mean(dim=(2, 3))
    raise ZootuneError(
        f"features of shape {tuple(features.shape)} cannot be pooled to (batch, dim); "
        "name a feature entry point that gives 2-, 3- or 4-dimensional features"
    )


class MethodFeatures:
    """Features = ``getattr(model, method_name)(x)``, pooled."""

    def __init__(self, method_name: str):
        self.method_name = method_name

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return pool_features(getattr(model, self.method_name)(x))

    def __repr__(self) -> str:
        return f"MethodFeatures({self.method_name!r})"


class _FeaturesReached(Exception):
    """Raised by the pre-hook to stop the forward once the features exist (carries them)."""

    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.features = features


class ModuleInputFeatures:
    """Features = the input of submodule ``module_name`` during ``model(x)``, pooled.

    The forward stops at that module, so the computation after it is skipped.
    """

    def __init__(self, module_name: str):
        self.module_name = module_name

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        module = model.get_submodule(self.module_name)

        def stop_with_input(_module, args):
            raise _FeaturesReached(args[0])

        handle = module.register_forward_pre_hook(stop_with_input)
        try:
            model(x)
        except _FeaturesReached as reached:
            return pool_features(reached.features)
        finally:
            handle.remove()
        raise ZootuneError(
            f"{type(model).__name__}.forward never called module {self.module_name!r}; "
            "name a module that the forward uses as the feature entry point"
        )

    def __repr__(self) -> str:
        return f"ModuleInputFeatures({self.module_name!r})"


class CallableFeatures:
    """Features = ``fn(model, x)``, pooled."""

    def __init__(self, fn: FeatureFn):
        self.fn = fn

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return pool_features(self.fn(model, x))

    def __repr__(self) -> str:
        return f"CallableFeatures({getattr(self.fn, '__name__', self.fn)!r})"


def feature_extractor(
    model: nn.Module, method: str | FeatureFn | None = None, module_input: str | None = None
) -> FeatureFn:
    """The extractor for ``model``: a method name or callable (``method``), or the input of the
    submodule named ``module_input``; neither: ``forward_features`` if present, else the head's input.
    """
    if method is not None and module_input is not None:
        raise ZootuneError("give a feature method or a feature module name for a model, not both")
    if callable(method):
        return CallableFeatures(method)
    if isinstance(method, str):
        if not callable(getattr(model, method, None)):
            raise ZootuneError(f"{type(model).__name__} has no method {method!r} to extract features")
        return MethodFeatures(method)
    if method is not None:
        raise ZootuneError(f"a feature entry point must be a method name or a callable, got {method!r}")
    if module_input is not None:
        names = dict(model.named_modules())
        if not module_input or module_input not in names:
            raise ZootuneError(
                f"{type(model).__name__} has no submodule {module_input!r} to take features from"
            )
        return ModuleInputFeatures(module_input)
    if callable(getattr(model, "forward_features", None)):
        return MethodFeatures("forward_features")
    return ModuleInputFeatures(find_head_name(model))
