"""Saving and loading Zoo-Tuning models and folded Lite models.

A directory holds ``model.safetensors`` (the state_dict, buffers included: BatchNorm running
statistics and Lite's ā) and ``config.json`` (zootune version, method, options, architecture).
Files are written atomically (:mod:`zootune.atomic`), and
loading never unpickles anything (safetensors only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from zootune.atomic import atomic_write_bytes
from zootune.errors import CheckpointError, ZooMismatchError
from zootune.models.heads import find_head_name, is_pointwise_conv, set_submodule
from zootune.version import __version__

_POINTWISE_HEADS = {"Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d}
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _head_spec(model: nn.Module, head_name: str | None) -> dict | None:
    if head_name is None:
        return None
    head = model.get_submodule(head_name)
    if isinstance(head, nn.Linear):
        return {"type": "Linear", "in_features": head.in_features, "out_features": head.out_features,
                "bias": head.bias is not None}
    if is_pointwise_conv(head) and type(head) in _POINTWISE_HEADS.values():  # BiT's 1x1 conv head
        return {"type": type(head).__name__, "in_features": head.in_channels, "out_features": head.out_channels,
                "bias": head.bias is not None}
    return {"type": type(head).__name__}


def _make_head(spec: dict | None, head: nn.Module | None) -> nn.Module | None:
    if head is not None or spec is None:
        return head
    if spec["type"] in _POINTWISE_HEADS:
        return _POINTWISE_HEADS[spec["type"]](spec["in_features"], spec["out_features"], 1, bias=spec["bias"])
    if spec["type"] != "Linear":
        raise CheckpointError(f"the saved head is a {spec['type']}; pass head=... (a module of that shape) to load it")
    return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"])


def _write(directory, module: nn.Module, config: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in module.state_dict().items()}
    atomic_write_bytes(directory / WEIGHTS_NAME, save_safetensors_bytes(tensors))
    atomic_write_bytes(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True).encode())


def _read(directory) -> tuple[dict, dict[str, torch.Tensor]]:
    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
        tensors = load_safetensors_bytes((directory / WEIGHTS_NAME).read_bytes())
    except FileNotFoundError as err:
        raise CheckpointError(f"{directory} is not a saved zootune model: missing {Path(err.filename).name}") from None
    except (json.JSONDecodeError, SafetensorError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{directory}: corrupt saved model ({err})") from None
    return config, tensors


def _load_state(module: nn.Module, tensors: dict[str, torch.Tensor], directory) -> None:
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()
        raise CheckpointError(f"{directory}: saved weights do not fit the model: "
                              f"{' '.join(line.strip() for line in first_line[:3])}") from None


def _architecture(model: nn.Module) -> dict:
    return {"class": type(model).__name__, "module": type(model).__module__}


def save_pretrained(zoo_tuning, directory) -> None:
    """Save a :class:`ZooTuning` model (all sources, gates, alignment, BN buffers, ā) with the
    options that rebuild exactly this module (:meth:`ZooTuning.rebuild_options`) and the record of
    what it was built with (``built``: scores, kept members, measured learning-rate multipliers)."""
    built = zoo_tuning.config
    config = {
        "zootune_version": __version__,
        "format": "zoo-tuning",
        "lite": built.lite,
        "options": zoo_tuning.rebuild_options().to_dict(),
        "num_sources": built.num_sources,
        "kept_members": built.kept_members,
        "num_zoo_members": built.num_zoo_members,
        "built": built.to_dict(),
        "architecture": _architecture(zoo_tuning.model),
        "head": _head_spec(zoo_tuning.model, built.head_name),
    }
    _write(directory, zoo_tuning, config)


def load_pretrained(cls, directory, zoo_or_builder: Sequence[nn.Module] | Callable[[], nn.Module],
                    head: nn.Module | None = None):
    """Rebuild a model of class ``cls`` (:class:`ZooTuning`) saved by :func:`save_pretrained` and
    load its weights: the saved options are read back as they are (checked like a user's: nothing
    in them is imported), on the members the model kept when given the zoo it was built from."""
    from zootune.methods.zoo_tuning.options import ZooTuningOptions
    from zootune.options import OptionError, parse_config

    config, tensors = _read(directory)
    if not isinstance(config, dict) or config.get("format") != "zoo-tuning":
        raise CheckpointError(f"{directory} holds a {config.get('format') if isinstance(config, dict) else config!r} "
                              "model, not a Zoo-Tuning one")
    try:
        options = parse_config(ZooTuningOptions, config.get("options"), what="saved zoo-tuning")
        num_sources, kept = int(config["num_sources"]), config.get("kept_members")
        num_zoo_members, lite = config.get("num_zoo_members"), bool(config["lite"])
    except (OptionError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{directory}: config.json does not describe a Zoo-Tuning model ({err})") from None
    if callable(zoo_or_builder) and not isinstance(zoo_or_builder, nn.Module):
        template = zoo_or_builder()
        members = [template] * num_sources  # weights are overwritten by the saved bank
    else:
        members = list(zoo_or_builder)
        if kept is not None and len(members) == num_zoo_members and len(kept) != num_zoo_members:
            members = [members[i] for i in kept]  # the full zoo it was built from: keep what it kept
        if len(members) != num_sources:
            raise ZooMismatchError(f"the saved model aggregates {num_sources} sources; the zoo has {len(members)}")
    model = cls(members, head=_make_head(config.get("head"), head), options=options, lite=lite)
    _load_state(model, tensors, directory)
    return model


def save_folded(model: nn.Module, directory, head_name: str | None = None, source: str = "lite") -> None:
    """Save a folded (plain) model: its full state_dict, BatchNorm buffers included."""
    head_name = head_name or find_head_name(model)
    config = {
        "zootune_version": __version__,
        "method": source,
        "format": "plain",
        "architecture": _architecture(model),
        "head_name": head_name,
        "head": _head_spec(model, head_name),
    }
    _write(directory, model, config)


def load_folded(directory, model_or_builder: nn.Module | Callable[[], nn.Module],
                head: nn.Module | None = None) -> nn.Module:
    """Load a folded model saved by :func:`save_folded` into a fresh model of the zoo's
    architecture (``zoo.new_model()`` or a builder); its head is replaced by the saved head."""
    config, tensors = _read(directory)
    if config.get("format") != "plain":
        raise CheckpointError(f"{directory} holds a {config.get('format')!r} model, not a folded plain one")
    model = model_or_builder if isinstance(model_or_builder, nn.Module) else model_or_builder()
    new_head = _make_head(config.get("head"), head)
    if new_head is not None:
        set_submodule(model, config["head_name"], new_head)
    _load_state(model, tensors, directory)
    return model
