"""The exported model folder: ``model.safetensors`` + ``config.json``.

``config.json`` says how to rebuild the module the weights belong to (zootune version stamped):

- ``"kind": "plain"``: the zoo's architecture (``arch``, ``arch_kwargs``) with a new task head of
  ``num_classes`` outputs: what fine-tuning, Lite Zoo-Tuning (folded), distillation and Knowledge Flow
  finalize to. Loading needs nothing but this folder.
- ``"kind": "method"``: a module that is not a plain model (full Zoo-Tuning, an ensemble): rebuilt
  with the method's ``build`` on the zoo checkpoints listed in ``zoo`` (absolute paths), then loaded.

The state_dict holds buffers too (BatchNorm running statistics). Weights are loaded with
``strict=True``: a file that does not match its config is refused, not half-loaded; so is one whose
weights hold NaN or infinity.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, Optional

from torch import nn

from zootune.errors import CheckpointError, UntrustedCodeError, ZootuneError
from zootune.models import resolve_arch_options
from zootune.models.heads import find_head_name, head_in_features, replace_head
from zootune.report import atomic_write_json
from zootune.tasks import ClassificationTask
from zootune.version import __version__

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "zootune-model"
DEFAULT_IMAGE_SIZE = 32  # `zootune fit`'s default, for a config that records none


def build_arch(arch: str, arch_kwargs: dict | None = None, *, trust_code: bool = False,
               source: str = "--arch") -> nn.Module:
    """A fresh model of ``arch``, its keyword options checked first (against the architecture's option
    table, or its builder's signature: :func:`zootune.models.resolve_arch_options`)."""
    builder, kwargs = resolve_arch_options(arch, arch_kwargs, trust_code=trust_code, source=source)
    try:
        model = builder(**kwargs)
    except (TypeError, ValueError) as e:
        raise ZootuneError(f"architecture {arch!r} cannot be built with {kwargs}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ZootuneError(f"architecture {arch!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def plain_model(arch: str, arch_kwargs: dict, num_classes: int, head_name: str | None = None, *,
                trust_code: bool = False, source: str = "--arch") -> nn.Module:
    """The zoo's architecture with a fresh ``num_classes``-way head: the layout of a plain export."""
    model = build_arch(arch, arch_kwargs, trust_code=trust_code, source=source)
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


# What config.json may hold: name -> (type, required). Anything else in the file is refused, so a
# config cannot smuggle in a value that some later code would act on.
_CONFIG_FIELDS = {
    "format": (str, True),
    "zootune_version": (str, False),
    "kind": (Literal["plain", "method"], True),
    "arch": (str, True),
    "arch_kwargs": (dict, False),
    "num_classes": (int, True),
    "head_name": (Optional[str], False),
    "method": (str, True),
    "member": (Optional[int], False),
    "options": (dict, False),
    "zoo": (list[str], False),
    "class_names": (Optional[list[str]], False),
    "image_size": (Optional[int], False),
    "metrics": (dict, False),
    "aggregation": (dict, False),
    # normalisation and evaluation crop the model was trained with ({} or absent: zootune's defaults)
    "preprocessing": (dict, False),
}


def check_model_config(info, config_path) -> dict:
    """``info`` checked against the fields a model folder's config.json may hold (one-line
    :class:`CheckpointError` naming the field)."""
    from zootune.options import OptionError, check_value

    if not isinstance(info, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object, not a {type(info).__name__}")
    unknown = sorted(set(info) - set(_CONFIG_FIELDS))
    if unknown:
        raise CheckpointError(f"{config_path}: unknown field(s) {', '.join(unknown)}")
    missing = [k for k, (_, required) in _CONFIG_FIELDS.items() if required and k not in info]
    if missing:
        raise CheckpointError(f"{config_path} lacks {', '.join(missing)}; it was not written by zootune "
                              "(make a model folder with `zootune fit` or `zootune export`)")
    try:
        for key, value in info.items():
            check_value(key, value, _CONFIG_FIELDS[key][0], what="config.json")
    except OptionError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    if info["format"] != FORMAT:
        raise CheckpointError(f"{config_path} is not a zootune model config (format {info['format']!r})")
    if info["num_classes"] < 1:
        raise CheckpointError(f"{config_path}: num_classes must be >= 1, got {info['num_classes']}")
    for key, value in (info.get("preprocessing") or {}).items():
        expected = list[float] if key in ("mean", "std") else float
        if key not in ("mean", "std", "crop_fraction"):
            raise CheckpointError(f"{config_path}: unknown preprocessing field {key!r}")
        try:
            check_value(f"preprocessing.{key}", value, expected, what="config.json")
        except OptionError as e:
            raise CheckpointError(f"{config_path}: {e}") from None
    names = info.get("class_names")
    if names is not None and (len(names) != info["num_classes"] or len(set(names)) != len(names)):
        # evaluation labels images by these names' positions: they must be the outputs, once each
        raise CheckpointError(f"{config_path}: class_names must name each of the {info['num_classes']} classes "
                              f"once (got {len(names)} names, {len(set(names))} distinct)")
    if info["kind"] == "method" and not info.get("zoo"):
        raise CheckpointError(f"{config_path}: a 'method' model needs the zoo checkpoints it was built on ('zoo')")
    return info


def read_model_config(model_dir: str | os.PathLike) -> dict:
    """A model folder's config.json, checked (:func:`check_model_config`); nothing is imported."""
    model_dir = Path(model_dir)
    config_path = model_dir / CONFIG_FILE
    if not model_dir.is_dir():
        raise CheckpointError(f"model folder {model_dir} does not exist" if not model_dir.exists()
                              else f"{model_dir} is a file, not a model folder")
    if not config_path.is_file() or not (model_dir / MODEL_FILE).is_file():
        raise CheckpointError(
            f"{model_dir} is not an exported zootune model (needs {MODEL_FILE} and {CONFIG_FILE}; "
            "make one with `zootune fit` or `zootune export`)"
        )
    try:
        info = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON: {e}") from None
    return check_model_config(info, config_path)


def find_model_dir(path: str | os.PathLike) -> Path:
    """The model folder ``path`` names: the ``model/`` of a ``zootune fit`` output folder, else
    ``path`` itself. A fit folder with training checkpoints but no ``model/`` yet is an unfinished
    run, refused as such (it is not "not a model": resuming the run makes its model)."""
    from zootune.run_folder import TRAINING_CHECKPOINTS

    path = Path(path).expanduser()
    if (path / "model" / CONFIG_FILE).is_file():
        return path / "model"
    checkpoints = sorted(str(p.relative_to(path)) for pattern in TRAINING_CHECKPOINTS for p in path.glob(pattern))
    if checkpoints and not (path / CONFIG_FILE).is_file():
        raise ZootuneError(
            f"{path} is an unfinished run: it holds a training checkpoint ({checkpoints[0]}) but no model/ yet; "
            f"finish it with `zootune fit ... --resume --out {path}` (the run's own arguments), then export it")
    return path


def input_options(info: dict) -> dict:
    """How the model's inputs are made, from its config: ``image_size`` (:data:`DEFAULT_IMAGE_SIZE`
    when none is recorded) and the normalisation and evaluation crop it was trained with (``mean``,
    ``std``, ``crop_fraction``; absent: zootune's defaults) -- keyword arguments of
    :func:`zootune.data.image_folder.load_unsplit_image_folder` and ``load_image_files``."""
    return {"image_size": info.get("image_size") or DEFAULT_IMAGE_SIZE, **(info.get("preprocessing") or {})}


def _rebuild_method(info: dict, trust_code: bool) -> nn.Module:
    """The module a "method" model folder holds, rebuilt without data: the method's ``build`` with
    ``ctx.rebuilding`` on the zoo checkpoints the config lists (read with weights_only); the methods
    it requires are rebuilt the same way for their structure (all weights come from the file)."""
    from zootune.experiment import select_methods
    from zootune.methods.registry import BuildContext
    from zootune.zoo import Zoo, is_pretrained_name

    if all(is_pretrained_name(entry) for entry in info["zoo"]):
        # members by name (timm:..., torchvision:..., hf-hub:...): loaded again through the libraries' caches
        zoo = Zoo.from_pretrained(info["zoo"])
    else:
        builder, arch_kwargs = resolve_arch_options(info["arch"], info.get("arch_kwargs"), trust_code=trust_code,
                                                    source="config.json arch")
        zoo = Zoo.from_checkpoints(info["zoo"], arch=builder, arch_kwargs=arch_kwargs)
    task = ClassificationTask(info["num_classes"])
    specs = select_methods([info["method"]])  # an unknown method name: ZootuneError listing the known ones
    fitted: dict = {}
    for spec in specs:
        options = info.get("options") if spec is specs[-1] else None
        members = range(len(zoo)) if spec.per_member and spec is not specs[-1] else [info.get("member")]
        models = []
        for member in members:
            ctx = BuildContext(zoo=zoo, task=task, config=spec.parse_options(options), fitted=dict(fitted),
                               member=member, rebuilding=True)
            built = spec.build(ctx)
            models.append(built.finalize() if hasattr(built, "finalize") else built)
        if spec is specs[-1]:
            return models[0]
        fitted[spec.name] = models if spec.per_member else models[0]
    raise ZootuneError(f"cannot rebuild method {info['method']!r}")


def load_model_dir(model_dir: str | os.PathLike, *, trust_code: bool = False) -> tuple[nn.Module, dict]:
    """The exported model (in eval mode) and its config. Nothing in the folder is executed: the config
    may name only registered architectures and methods; a ``module:function`` architecture is
    imported only with ``trust_code=True``; weights are read from safetensors."""
    from zootune.zoo.checkpoint import check_finite_state, load_state_dict_file

    model_dir = Path(model_dir)
    info = read_model_config(model_dir)
    if info["kind"] == "plain":
        model = plain_model(info["arch"], info.get("arch_kwargs") or {}, info["num_classes"], info.get("head_name"),
                            trust_code=trust_code, source="config.json arch")
    else:
        model = _rebuild_method(info, trust_code)
    state = load_state_dict_file(model_dir / MODEL_FILE)  # CheckpointError naming the file if unreadable
    check_finite_state(state, str(model_dir / MODEL_FILE))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{model_dir / MODEL_FILE} does not match its config.json: {_load_error_detail(e)}") from None
    return model.eval(), info


def _load_error_detail(error: RuntimeError) -> str:
    """The informative line of load_state_dict's error (the first key or shape that differs)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    detail = next((line for line in lines[1:] if line), lines[0] if lines else str(error))
    return detail[:300]


def export_info(model: nn.Module, *, arch: str, arch_kwargs: dict, num_classes: int, zoo_paths: list[str],
                method: str, member: int | None, options: dict, head_name: str | None = None,
                trust_code: bool = False, **extra) -> dict:
    """config.json content for ``model`` (the finalized output of ``method``)."""
    from zootune.zoo import is_pretrained_name

    try:
        is_plain = same_layout(model, plain_model(arch, arch_kwargs, num_classes, head_name, trust_code=trust_code))
    except UntrustedCodeError:
        raise
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
