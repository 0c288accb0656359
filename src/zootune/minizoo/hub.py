"""The MiniZoo hub: pretrained models of *different* architectures for Hub-Pathway.

Like the Hub-Pathway paper's hub (models differing in architecture, pretraining data and paradigm),
the MiniZoo hub mixes the MiniZoo's ResNets with a small ViT and an MLP-Mixer for 32x32 inputs, each
pretrained on one of the MiniZoo's pretext tasks by the MiniZoo's own :func:`pretrain`:

| member | architecture | pretext (see ``zootune.minizoo.members``) | features |
|---|---|---|---|
| ``resnet-mnist-supervised``, ``resnet-scene-segmentation`` | the MiniZoo's ResNet-10 (width 8) | as in the MiniZoo | 64 |
| ``vit-simclr`` | ``vit_tiny32`` | SimCLR on photo crops | 64 |
| ``mixer-mnist`` | ``mixer_tiny32`` | supervised MNIST | 64 |
| ``vit-counting`` | ``vit_tiny32`` | object counting on generated scenes | 64 |

Each new member is trained for ``steps`` Adam steps (120-300, fewer than a MiniZoo ResNet's 600, so
that the three build in a few CPU-minutes on a shared machine) and cached as
``<cache>/minizoo/hub/<name>.safetensors`` (written atomically; the metadata records the recipe, and
a file whose recipe differs is rebuilt).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from torch import nn

from zootune.data.cache import user_cache_dir
from zootune.errors import CheckpointError, ZootuneError
from zootune.zoo.hub import Hub
from zootune.minizoo.pretrain import get_member, pretrain
from zootune.models import build_model
from zootune.zoo import load_state_dict_file, read_safetensors_metadata, save_state_dict

HUB_FORMAT = 1  # bump when the recipe of a member changes meaning


@dataclass(frozen=True)
class HubMemberSpec:
    """A hub member: architecture ``arch`` pretrained on MiniZoo pretext ``pretext`` for ``steps``."""

    name: str
    arch: str
    pretext: str
    steps: int = 300
    seed: int = 0

    def recipe(self) -> dict:
        return {**dataclasses.asdict(self), "format": HUB_FORMAT}


HUB_MEMBERS: tuple[HubMemberSpec, ...] = (
    HubMemberSpec("vit-simclr", "vit_tiny32", "photo-simclr", steps=120),  # 2 views of 96 per step
    HubMemberSpec("mixer-mnist", "mixer_tiny32", "mnist-supervised", steps=300),
    HubMemberSpec("vit-counting", "vit_tiny32", "scene-counting", steps=200),
)

# MiniZoo ResNets that join the hub by default (names of zootune.minizoo.members.MEMBERS).
HUB_ZOO_MEMBERS: tuple[str, ...] = ("mnist-supervised", "scene-segmentation")


def hub_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return user_cache_dir(cache_dir) / "minizoo" / "hub"


def build_member(spec: HubMemberSpec, progress: bool = False) -> tuple[nn.Module, dict]:
    """Pretrain one hub member (not cached); returns (model, summary)."""
    pretext = dataclasses.replace(get_member(spec.pretext), steps=spec.steps)
    return pretrain(lambda: build_model(spec.arch), pretext, seed=spec.seed, progress=progress)


def _load_cached(spec: HubMemberSpec, path: Path) -> nn.Module | None:
    if not path.exists():
        return None
    try:
        meta = read_safetensors_metadata(path)
        if meta.get("recipe") is None or json.loads(meta["recipe"]) != spec.recipe():
            return None  # built by another recipe: rebuild
        model = build_model(spec.arch)
        model.load_state_dict(load_state_dict_file(path))
    except (CheckpointError, RuntimeError, ValueError):
        return None  # a damaged cache file is rebuilt, not fatal
    return model.eval()


def build_hub(
    cache_dir: str | os.PathLike | None = None,
    members: Sequence[HubMemberSpec] = HUB_MEMBERS,
    rebuild: bool = False,
    progress: bool = False,
) -> list[Path]:
    """Pretrain and cache the hub's own members (the ViTs and the Mixer); returns their files."""
    paths = []
    for spec in members:
        path = hub_dir(cache_dir) / f"{spec.name}.safetensors"
        if rebuild or _load_cached(spec, path) is None:
            model, summary = build_member(spec, progress=progress)
            save_state_dict(path, model.state_dict(), metadata={"recipe": spec.recipe(), "summary": summary})
        paths.append(path)
    return paths


def load_hub(
    cache_dir: str | os.PathLike | None = None,
    build_if_missing: bool = True,
    members: Sequence[HubMemberSpec] = HUB_MEMBERS,
    zoo_members: Sequence[str] = HUB_ZOO_MEMBERS,
    progress: bool = False,
) -> Hub:
    """The MiniZoo hub: ``zoo_members`` of the MiniZoo (ResNets) followed by ``members``.

    Missing members are pretrained and cached when ``build_if_missing``; otherwise a missing member
    is an error that says how to build it.
    """
    models: list[nn.Module] = []
    names: list[str] = []
    if zoo_members:
        from zootune.minizoo import load_minizoo  # the MiniZoo proper (same cache directory)

        zoo = load_minizoo(cache_dir=cache_dir, build_if_missing=build_if_missing, members=list(zoo_members))
        models.extend(zoo)
        names.extend(f"resnet-{name}" for name in zoo_members)
    for spec in members:
        path = hub_dir(cache_dir) / f"{spec.name}.safetensors"
        model = _load_cached(spec, path)
        if model is None:
            if not build_if_missing:
                raise ZootuneError(
                    f"hub member {spec.name!r} is not built in {path.parent}; "
                    "run zootune.minizoo.hub.build_hub() or pass build_if_missing=True"
                )
            build_hub(cache_dir, [spec], rebuild=True, progress=progress)
            model = _load_cached(spec, path)
            if model is None:
                raise ZootuneError(f"hub member {spec.name!r} could not be read back from {path}")
        models.append(model)
        names.append(spec.name)
    return Hub(models, names=names)
