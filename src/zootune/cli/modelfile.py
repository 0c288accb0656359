"""The exported model folder: ``model.safetensors`` + ``config.json``.

``config.json`` says how to rebuild the module the weights belong to (zootune version stamped):

- ``"kind": "plain"``: the zoo's architecture (``arch``, ``arch_kwargs``) with a new task head of
  ``num_classes`` outputs: what fine-tuning, Lite Zoo-Tuning (folded), distillation and Knowledge Flow
  finalize to. Loading needs nothing but this folder.
- ``"kind": "method"``: a module that is not a plain model (full Zoo-Tuning, an ensemble): rebuilt
  with the method's ``build`` on the zoo checkpoints listed in ``zoo`` (absolute paths), then loaded.

The state_dict holds buffers too (BatchNorm running statistics). Weights are loaded with
``strict=True``: a file that does not match its config is refused, not half-loaded.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
from pathlib import Path

from torch import nn

from zootune.errors import CheckpointError, ZootuneError
from zootune.models import ARCHITECTURES, build_model, is_library_architecture
from zootune.models.heads import find_head_name, head_in_features, replace_head
from zootune.report import atomic_write_json
from zootune.tasks import ClassificationTask
from zootune.version import __version__

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "zootune-model"


def resolve_arch(arch: str):
    """A registered architecture name, ``timm:ARCH`` / ``torchvision:ARCH``, or ``module:function``
    naming a user's builder (imported)."""
    if is_library_architecture(arch):
        return functools.partial(build_model, arch)
    if ":" in arch:
        module_name, _, function_name = arch.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ZootuneError(f"cannot import module {module_name!r} for --arch {arch}: {e}") from None
        builder = getattr(module, function_name, None)
        if not callable(builder):
            raise ZootuneError(f"module {module_name!r} has no callable {function_name!r} (--arch {arch})")
        return builder
    if arch not in ARCHITECTURES:
        raise ZootuneError(
            f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))} "
            "(or module:function for your own builder)"
        )
    return lambda **kw: build_model(arch, **kw)


def plain_model(arch: str, arch_kwargs: dict, num_classes: int, head_name: str | None = None) -> nn.Module:
    """The zoo's architecture with a fresh ``num_classes``-way head: the layout of a plain export."""
    model = resolve_arch(arch)(**arch_kwargs)
    name = find_head_name(model, head_name)
    replace_head(model, ClassificationTask(num_classes).make_head(head_in_features(model, name)), name)
    return model


def same_layout(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def save_model_dir(out_dir: str | os.PathLike, model: nn.Module, info: dict) -> Path:
    """Write ``model``'s state_dict (buffers included) and ``info`` (+ format/version) into ``out_dir``."""
    from zootune.zoo.checkpoint import save_state_dict

    out_dir = Path(out_dir)
    save_state_dict(out_dir / MODEL_FILE, model.state_dict(), {"format": FORMAT, "zootune_version": __version__})
    atomic_write_json(out_dir / CONFIG_FILE, {"format": FORMAT, "zootune_version": __version__, **info})
    return out_dir


def read_model_config(model_dir: str | os.PathLike) -> dict:
    model_dir = Path(model_dir)
    config_path = model_dir / CONFIG_FILE
    if not model_dir.is_dir():
        raise CheckpointError(f"model folder {model_dir} does not exist")
    if not config_path.is_file() or not (model_dir / MODEL_FILE).is_file():
        raise CheckpointError(
            f"{model_dir} is not an exported zootune model (needs {MODEL_FILE} and {CONFIG_FILE}; "
            "make one with `zootune fit` or `zootune export`)"
        )
    try:
        info = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON: {e}") from None
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{config_path} is not a zootune model config (format {info.get('format')!r})")
    return info


def _rebuild_method(info: dict) -> nn.Module:
    from zootune.experiment import select_methods
    from zootune.zoo import Zoo, is_pretrained_name

    if all(is_pretrained_name(entry) for entry in info["zoo"]):
        zoo = Zoo.from_pretrained(info["zoo"])
    else:
        zoo = Zoo.from_checkpoints(info["zoo"], arch=resolve_arch(info["arch"]), arch_kwargs=info.get("arch_kwargs") or {})
    task = ClassificationTask(info["num_classes"])
    # The required methods' modules only give the structure here: their weights are in the file.
    fitted: dict = {}
    for spec in select_methods([info["method"]]):
        if spec.name == info["method"]:
            built = spec.build(zoo, task, member=info.get("member"), fitted=fitted, **(info.get("options") or {}))
            return built.finalize() if hasattr(built, "finalize") else built
        members = range(len(zoo)) if spec.per_member else [None]
        models = []
        for member in members:
            built = spec.build(zoo, task, member=member, fitted=fitted)
            models.append(built.finalize() if hasattr(built, "finalize") else built)
        fitted[spec.name] = models if spec.per_member else models[0]
    raise ZootuneError(f"cannot rebuild method {info['method']!r}")


def load_model_dir(model_dir: str | os.PathLike) -> tuple[nn.Module, dict]:
    """The exported model (in eval mode) and its config."""
    from zootune.zoo.checkpoint import load_state_dict_file

    model_dir = Path(model_dir)
    info = read_model_config(model_dir)
    if info.get("kind") == "plain":
        model = plain_model(info["arch"], info.get("arch_kwargs") or {}, info["num_classes"], info.get("head_name"))
    else:
        model = _rebuild_method(info)
    state = load_state_dict_file(model_dir / MODEL_FILE)  # CheckpointError naming the file if unreadable
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{model_dir / MODEL_FILE} does not match its config.json: {first}") from None
    return model.eval(), info


def export_info(model: nn.Module, *, arch: str, arch_kwargs: dict, num_classes: int, zoo_paths: list[str],
                method: str, member: int | None, options: dict, head_name: str | None = None, **extra) -> dict:
    """config.json content for ``model`` (the finalized output of ``method``)."""
    from zootune.zoo import is_pretrained_name

    try:
        is_plain = same_layout(model, plain_model(arch, arch_kwargs, num_classes, head_name))
    except ZootuneError:
        is_plain = False
    info = {
        "kind": "plain" if is_plain else "method",
        "arch": arch,
        "arch_kwargs": arch_kwargs,
        "num_classes": num_classes,
        "head_name": head_name,
        "method": method,
        "member": member,
        "options": options,
        # files by absolute path; pretrained names (timm:..., torchvision:...) as they are
        "zoo": [p if is_pretrained_name(p) else str(Path(p).resolve()) for p in zoo_paths],
    }
    info.update(extra)
    return info
