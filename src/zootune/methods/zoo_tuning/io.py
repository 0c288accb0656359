"""Saving and loading Zoo-Tuning models and folded Lite models from Python: a model folder
(:mod:`zootune.model_dir`, the one format zootune writes and reads) whose architecture is the
caller's.

:func:`save_pretrained` writes a "method" folder (``method`` ``zoo-tuning`` or ``lite``, ``options``
that rebuild exactly this module, ``built``: its :class:`ZooTuningConfig`); :func:`save_folded` a
"plain" one. Neither knows the architecture's registered name or the task, so ``arch`` is null and
``head`` records the head's layer; loading takes the zoo (or a builder) from the caller. A folder that
``zootune fit`` wrote is loaded by :func:`load_folded` too (Lite, folded: its task gives the head);
a "method" one by :func:`zootune.model_dir.load_model_dir`. Folders of the former Zoo-Tuning save
(``"format": "zoo-tuning"``/``"plain"`` in config.json) are read as they are.
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from zootune.errors import CheckpointError, ZooMismatchError
from zootune.methods.registry import register_former_folder_format
from zootune.model_dir import FORMAT as MODEL_FORMAT
from zootune.model_dir import (fresh_head, head_spec, load_weights, read_model_config, save_model_dir,
                               with_fresh_head)
from zootune.models.heads import find_head_name


def save_pretrained(zoo_tuning, directory) -> None:
    """Save a :class:`ZooTuning` model (all sources, gates, alignment, BN buffers, ā) with the
    options that rebuild exactly this module (:meth:`ZooTuning.rebuild_options`) and the record of
    what it was built with (``built``: scores, kept members, measured learning-rate multipliers)."""
    built = zoo_tuning.config
    head = zoo_tuning.model.get_submodule(built.head_name) if built.head_name is not None else None
    save_model_dir(directory, zoo_tuning, {
        "kind": "method", "arch": None, "method": "lite" if built.lite else "zoo-tuning",
        "options": zoo_tuning.rebuild_options().to_dict(), "built": built.to_dict(),
        "head_name": built.head_name, "head": head_spec(head) if head is not None else None,
    })


def _members(built: dict, zoo_or_builder, directory) -> list[nn.Module]:
    """The modules to rebuild on: copies of a builder's model, or the zoo (the members the model kept,
    when given the full zoo it was built from)."""
    try:
        num_sources, kept, num_zoo_members = int(built["num_sources"]), built.get("kept_members"), \
            built.get("num_zoo_members")
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{directory}: config.json does not describe a Zoo-Tuning model ({err})") from None
    if callable(zoo_or_builder) and not isinstance(zoo_or_builder, nn.Module):
        return [zoo_or_builder()] * num_sources  # weights are overwritten by the saved bank
    members = list(zoo_or_builder)
    if kept is not None and len(members) == num_zoo_members and len(kept) != num_zoo_members:
        members = [members[i] for i in kept]  # the full zoo it was built from: keep what it kept
    if len(members) != num_sources:
        raise ZooMismatchError(f"the saved model aggregates {num_sources} sources; the zoo has {len(members)}")
    return members


def load_pretrained(cls, directory, zoo_or_builder: Sequence[nn.Module] | Callable[[], nn.Module],
                    head: nn.Module | None = None):
    """Rebuild a model of class ``cls`` (:class:`ZooTuning`) saved by :func:`save_pretrained` and
    load its weights: the saved options are read back as they are (checked like a user's: nothing
    in them is imported), on the members the model kept when given the zoo it was built from."""
    from zootune.methods.zoo_tuning.options import ZooTuningOptions
    from zootune.options import OptionError, parse_config

    info = read_model_config(directory)
    built = info.get("built")
    if info["kind"] != "method" or not built:
        where = (" (written by `zootune fit`: load it with zootune.model_dir.load_model_dir)"
                 if info["arch"] is not None else "")
        raise CheckpointError(f"{directory} holds a {info['kind']} {info['method']} model, not a Zoo-Tuning "
                              f"one saved by save_pretrained{where}")
    try:
        options = parse_config(ZooTuningOptions, info.get("options"), what="saved zoo-tuning")
    except OptionError as err:
        raise CheckpointError(f"{directory}: config.json does not describe a Zoo-Tuning model ({err})") from None
    members = _members(built, zoo_or_builder, directory)
    model = cls(members, head=fresh_head(info, members[0], head), options=options, lite=bool(built.get("lite")))
    return load_weights(model, directory)


def save_folded(model: nn.Module, directory, head_name: str | None = None, method: str = "lite") -> None:
    """Save a folded (plain) model: its full state_dict, BatchNorm buffers included."""
    head_name = head_name or find_head_name(model)
    save_model_dir(directory, model, {"kind": "plain", "arch": None, "method": method, "head_name": head_name,
                                      "head": head_spec(model.get_submodule(head_name))})


def load_folded(directory, model_or_builder: nn.Module | Callable[[], nn.Module],
                head: nn.Module | None = None) -> nn.Module:
    """Load a folded model saved by :func:`save_folded` into a fresh model of the zoo's
    architecture (``zoo.new_model()`` or a builder); its head is replaced by the saved head."""
    info = read_model_config(directory)
    if info["kind"] != "plain":
        raise CheckpointError(f"{directory} holds a {info['kind']} {info['method']} model, not a folded plain one")
    model = model_or_builder if isinstance(model_or_builder, nn.Module) else model_or_builder()
    return load_weights(with_fresh_head(model, info, head), directory)


def read_former_save(config: dict, config_path) -> dict:
    """A config.json of the former Zoo-Tuning save (zootune 0.1.0 before the one model-folder format:
    ``"format": "zoo-tuning"`` from ``save_pretrained``, ``"plain"`` from ``save_folded``; the weights
    file is the same) in the current form. Its ``architecture`` (the model's class, for information)
    is dropped; every field that loading used is kept."""
    version = config.get("zootune_version")
    common = {"format": MODEL_FORMAT, **({"zootune_version": version} if version is not None else {}),
              "arch": None, "head": config.get("head")}
    if config["format"] == "plain":
        return {**common, "kind": "plain", "method": config.get("method", "lite"), "head_name": config.get("head_name")}
    built = config.get("built")
    if not isinstance(built, dict) or not isinstance(config.get("options"), dict):
        raise CheckpointError(f"{config_path}: config.json does not describe a Zoo-Tuning model "
                              "(its 'built' record or its 'options' are missing)")
    # the top-level copies were what loading read: they win over the record's
    built = {**built, **{k: config[k] for k in ("lite", "num_sources", "kept_members", "num_zoo_members") if k in config}}
    return {**common, "kind": "method", "method": "lite" if built.get("lite") else "zoo-tuning",
            "options": config["options"], "built": built, "head_name": built.get("head_name")}


# config.json "format" of the former Zoo-Tuning save (save_pretrained, save_folded): read and converted
for _former in ("zoo-tuning", "plain"):
    register_former_folder_format(_former, read_former_save)



