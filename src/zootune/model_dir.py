"""The model folder: ``model.safetensors`` + ``config.json``, the one format zootune writes and reads.

``zootune fit`` and ``zootune export`` write it (:func:`export_info`, :func:`save_model_dir`) and so does
the Zoo-Tuning Python API (``ZooTuning.save_pretrained``, ``save_folded``: thin calls into this module,
:mod:`zootune.methods.zoo_tuning.io`). ``config.json`` (``"format": "zootune-model"``, zootune version
stamped) says how to rebuild the module the weights belong to:

- ``"kind": "plain"``: the architecture with a new task head: what fine-tuning, Lite Zoo-Tuning
  (folded), distillation and Knowledge Flow finalize to. ``"kind": "method"``: a module that is not a
  plain model (full Zoo-Tuning, an ensemble), rebuilt with the method's ``build`` on the zoo
  checkpoints listed in ``zoo`` (absolute paths or pretrained names), then loaded.
- ``arch``, ``arch_kwargs``: the architecture by registered name. ``null`` when the model was saved
  from Python (``save_pretrained``/``save_folded``): its architecture is the caller's, who loads it
  with ``ZooTuning.load_pretrained(folder, zoo)`` or ``load_folded(folder, builder)``.
- ``task``: ``task.to_config()``, read back by :func:`zootune.tasks.task_from_config`; the new head
  is the task's (``task.make_head``). A classifier also records ``num_classes`` (equal to its task's:
  the number README's loading snippet and ``evaluate``/``predict`` read). Not recorded by a save from
  Python, which does not know the task: there ``head`` records the head's layer instead
  (``{"type": "Linear", "in_features", "out_features", "bias"}`` or a 1x1 ``Conv1d/2d/3d``).
- ``method``, ``member``, ``options``: what was trained, with its options as resolved (so that the
  module is rebuilt without data); ``built``: a method's own record of what it built (Zoo-Tuning:
  its ``ZooTuningConfig``: the kept members, measured learning-rate multipliers, ...).
- ``head_name``, ``class_names``, ``image_size``, ``preprocessing``, ``metrics``, ``aggregation``.

Older folders are read too: a config without ``task`` is a classifier of its ``num_classes``; one
written by a method's former save (another ``"format"``) is converted when read, by the reader the
method registered (:func:`zootune.methods.registry.register_former_folder_format`).

The state_dict holds buffers too (BatchNorm running statistics, Lite's ā). Weights are loaded with
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
from zootune.models.heads import find_head_name, head_in_features, is_pointwise_conv, replace_head
from zootune.report import atomic_write_json
from zootune.tasks import ClassificationTask, Task, task_from_config
from zootune.version import __version__

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "zootune-model"
DEFAULT_IMAGE_SIZE = 32  # `zootune fit`'s default, for a config that records none
_POINTWISE_HEADS = {"Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d}


def build_arch(arch: str, arch_kwargs: dict | None = None, *, trust_code: bool = False,
               origin: str = "--arch") -> nn.Module:
    """A fresh model of ``arch``, its keyword options checked first (against the architecture's option
    table, or its builder's signature: :func:`zootune.models.resolve_arch_options`)."""
    builder, kwargs = resolve_arch_options(arch, arch_kwargs, trust_code=trust_code, origin=origin)
    try:
        model = builder(**kwargs)
    except (TypeError, ValueError) as e:
        raise ZootuneError(f"architecture {arch!r} cannot be built with {kwargs}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ZootuneError(f"architecture {arch!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def model_task(info: dict) -> Task | None:
    """The task a checked config records (:func:`read_model_config`); None for a model saved from
    Python, whose task is not known."""
    return task_from_config(info["task"]) if info.get("task") else None


def classifier_task(info: dict, what: str) -> ClassificationTask:
    """The model's task, which ``what`` (a command) needs to be classification: anything else is
    refused in one line."""
    task = model_task(info)
    if not isinstance(task, ClassificationTask):
        kind = f"a {task.to_config()['type']} model" if task is not None else "a model saved without its task"
        raise ZootuneError(f"{what} applies image classifiers; this model folder holds {kind}")
    return task


def head_spec(head: nn.Module) -> dict:
    """The ``head`` record of a model saved from Python: the layer's type and shape where it is a
    Linear or a 1x1 convolution (rebuilt from it when loaded), else its type only."""
    if isinstance(head, nn.Linear):
        return {"type": "Linear", "in_features": head.in_features, "out_features": head.out_features,
                "bias": head.bias is not None}
    if is_pointwise_conv(head) and type(head) in _POINTWISE_HEADS.values():  # BiT's 1x1 conv head
        return {"type": type(head).__name__, "in_features": head.in_channels, "out_features": head.out_channels,
                "bias": head.bias is not None}
    return {"type": type(head).__name__}


def _head_from_spec(spec: dict) -> nn.Module:
    kind = spec.get("type")
    try:
        if kind in _POINTWISE_HEADS:
            return _POINTWISE_HEADS[kind](spec["in_features"], spec["out_features"], 1, bias=spec["bias"])
        if kind == "Linear":
            return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"config.json: the saved head {spec!r} is incomplete ({e})") from None
    raise CheckpointError(f"the saved head is a {kind}; pass head=... (a module of that shape) to load it")


def fresh_head(info: dict, body: nn.Module, head: nn.Module | None = None) -> nn.Module | None:
    """The head that a model of this folder has, new (the weights come from the file): ``head`` when
    given; else the layer the config's ``head`` records (a save from Python); else the task's head
    on the features of ``body``'s head; None when the config records neither (the model's own head
    was kept)."""
    if head is not None:
        return head
    if info.get("head"):
        return _head_from_spec(info["head"])
    task = model_task(info)
    if task is None:
        return None
    return task.make_head(head_in_features(body, info.get("head_name")))


def with_fresh_head(model: nn.Module, info: dict, head: nn.Module | None = None) -> nn.Module:
    """``model`` (a fresh model of the architecture) with its head replaced by :func:`fresh_head`."""
    new = fresh_head(info, model, head)
    if new is not None:
        replace_head(model, new, find_head_name(model, info.get("head_name")))
    return model


def plain_model(info: dict, *, trust_code: bool = False, origin: str = "config.json arch") -> nn.Module:
    """A fresh model of a "plain" folder's layout: the architecture ``arch(**arch_kwargs)`` with the
    task's new head."""
    model = build_arch(info["arch"], info.get("arch_kwargs"), trust_code=trust_code, origin=origin)
    return with_fresh_head(model, info)


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
    "arch": (Optional[str], True),  # null: saved from Python, the caller gives the architecture
    "arch_kwargs": (dict, False),
    "task": (dict, False),
    "num_classes": (int, False),  # a classifier's (required for one); older configs: the task itself
    "head_name": (Optional[str], False),
    "head": (Optional[dict], False),
    "method": (str, True),
    "member": (Optional[int], False),
    "options": (dict, False),
    "built": (dict, False),
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
    :class:`CheckpointError` naming the field), in the current form: a config of the former
    Zoo-Tuning save converted, an older config's task added."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object, not a {type(info).__name__}")
    if info.get("format") != FORMAT:
        from zootune.methods.registry import former_folder_formats

        reader = former_folder_formats().get(info.get("format"))
        if reader is not None:  # a method's own former save, converted by the method
            info = reader(info, config_path)
    _check_fields(info, config_path)
    if info["format"] != FORMAT:
        raise CheckpointError(f"{config_path} is not a zootune model config (format {info['format']!r})")
    info = _check_task(info, config_path)
    _check_preprocessing(info.get("preprocessing") or {}, config_path)
    names, num_classes = info.get("class_names"), info.get("num_classes")
    if names is not None and num_classes is None:
        raise CheckpointError(f"{config_path}: class_names is for a classifier (a config with num_classes)")
    if names is not None and (len(names) != num_classes or len(set(names)) != len(names)):
        # evaluation labels images by these names' positions: they must be the outputs, once each
        raise CheckpointError(f"{config_path}: class_names must name each of the {num_classes} classes "
                              f"once (got {len(names)} names, {len(set(names))} distinct)")
    if info["kind"] == "method" and info["arch"] is not None and not info.get("zoo"):
        raise CheckpointError(f"{config_path}: a 'method' model needs the zoo checkpoints it was built on ('zoo')")
    return info


def _check_fields(info: dict, config_path) -> None:
    """Every field known, the required ones there, each of its type."""
    from zootune.options import OptionError, check_value

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


def _check_task(info: dict, config_path) -> dict:
    """``info`` with its task checked (and a classifier's ``num_classes`` agreeing with it)."""
    num_classes = info.get("num_classes")
    if num_classes is not None and num_classes < 1:
        raise CheckpointError(f"{config_path}: num_classes must be >= 1, got {num_classes}")
    if "task" not in info:
        if num_classes is not None:
            # written before model folders recorded their task: such a folder holds a classifier
            info = {**info, "task": {"type": "classification", "num_classes": num_classes}}
        elif info["arch"] is not None:
            raise CheckpointError(f"{config_path} lacks task (or num_classes); it was not written by zootune "
                                  "(make a model folder with `zootune fit` or `zootune export`)")
    try:
        task = model_task(info)
    except ZootuneError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    if isinstance(task, ClassificationTask) and num_classes != task.num_classes:
        raise CheckpointError(f"{config_path} lacks num_classes (a classifier records it beside its task)"
                              if num_classes is None else
                              f"{config_path}: num_classes {num_classes} differs from its task's {task.num_classes}")
    if task is not None and not isinstance(task, ClassificationTask) and num_classes is not None:
        raise CheckpointError(f"{config_path}: num_classes is for a classifier, not a {info['task']['type']} model")
    return info


def _check_preprocessing(preprocessing: dict, config_path) -> None:
    from zootune.options import OptionError, check_value

    for key, value in preprocessing.items():
        expected = list[float] if key in ("mean", "std") else float
        if key not in ("mean", "std", "crop_fraction"):
            raise CheckpointError(f"{config_path}: unknown preprocessing field {key!r}")
        try:
            check_value(f"preprocessing.{key}", value, expected, what="config.json")
        except OptionError as e:
            raise CheckpointError(f"{config_path}: {e}") from None


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
    from zootune.methods.registry import BuildContext, with_requirements
    from zootune.zoo import Zoo, is_pretrained_name

    if all(is_pretrained_name(entry) for entry in info["zoo"]):
        # members by name (timm:..., torchvision:..., hf-hub:...): loaded again through the libraries' caches
        zoo = Zoo.from_pretrained(info["zoo"])
    else:
        builder, arch_kwargs = resolve_arch_options(info["arch"], info.get("arch_kwargs"), trust_code=trust_code,
                                                    origin="config.json arch")
        zoo = Zoo.from_checkpoints(info["zoo"], arch=builder, arch_kwargs=arch_kwargs)
    task = model_task(info)
    specs = with_requirements([info["method"]])  # an unknown method name: ZootuneError listing the known ones
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
    model_dir = Path(model_dir)
    info = read_model_config(model_dir)
    if info["arch"] is None:
        how = ("ZooTuning.load_pretrained(folder, zoo)" if info["kind"] == "method" else
               "zootune.methods.zoo_tuning.load_folded(folder, builder)")
        raise CheckpointError(f"{model_dir} was saved from Python ({info['method']}, {info['kind']} model): its "
                              f"{CONFIG_FILE} names no architecture to rebuild; load it with {how}")
    if info["kind"] == "plain":
        model = plain_model(info, trust_code=trust_code)
    else:
        model = _rebuild_method(info, trust_code)
    return load_weights(model, model_dir).eval(), info


def load_weights(model: nn.Module, model_dir: str | os.PathLike) -> nn.Module:
    """``model`` (rebuilt from the folder's config) with the folder's weights, loaded strictly; weights
    that are unreadable, hold NaN or infinity, or do not fit: :class:`CheckpointError` naming the file."""
    from zootune.zoo.checkpoint import check_finite_state, load_state_dict_file

    path = Path(model_dir) / MODEL_FILE
    state = load_state_dict_file(path)  # CheckpointError naming the file if unreadable
    check_finite_state(state, str(path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match its {CONFIG_FILE}: {_load_error_detail(e)}") from None
    return model


def _load_error_detail(error: RuntimeError) -> str:
    """The informative line of load_state_dict's error (the first key or shape that differs)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    detail = next((line for line in lines[1:] if line), lines[0] if lines else str(error))
    return detail[:300]


def export_info(model: nn.Module, *, arch: str, arch_kwargs: dict, zoo_paths: list[str], method: str,
                member: int | None, options: dict, task: Task,
                head_name: str | None = None, trust_code: bool = False, **extra) -> dict:
    """config.json content for ``model`` (the finalized output of ``method``, trained for ``task``)."""
    from zootune.zoo import is_pretrained_name

    info = {
        "kind": "plain",
        "arch": arch,
        "arch_kwargs": arch_kwargs,
        "task": task.to_config(),
        # a classifier's number of classes, at the top level too (module docstring)
        **({"num_classes": task.num_classes} if isinstance(task, ClassificationTask) else {}),
        "head_name": head_name,
        "method": method,
        "member": member,
        "options": options,
        # files by absolute path; pretrained names (timm:..., torchvision:...) as they are
        "zoo": [p if is_pretrained_name(p) else str(Path(p).resolve()) for p in zoo_paths],
    }
    try:
        is_plain = same_layout(model, plain_model(info, trust_code=trust_code, origin="--arch"))
    except UntrustedCodeError:
        raise
    except ZootuneError:
        is_plain = False
    info["kind"] = "plain" if is_plain else "method"
    info.update(extra)
    return info
