"""PAC-Net (Myung et al., ICML 2022): Prune, Allocate, Calibrate.

- ``prune.py``: magnitude masks (per layer or global; ``prune_fraction`` = fraction REMOVED).
- ``masked.py``: ``MaskedLayer``, the in-place wrapper routing a weight to the source or target task.
- ``model.py``: ``PACNet``, the three steps and the engine hooks, save/load, ``merge_and_unload``.

Registered as method ``"pac-net"``; see :func:`build` for the options the CLI can pass.
"""

from __future__ import annotations

import copy
import os

from zootune.errors import DataError, ZootuneError
from zootune.methods.pac_net.masked import MaskedLayer
from zootune.methods.pac_net.model import PRUNE_CALIBRATE_WARNING, PACNet, PACNetConfig, log
from zootune.methods.pac_net.prune import magnitude_masks
from zootune.methods.registry import MethodSpec, register_method

__all__ = ["PACNet", "PACNetConfig", "MaskedLayer", "magnitude_masks", "build", "PRUNE_CALIBRATE_WARNING"]


_FLOAT_OPTIONS = {"prune_fraction": 0.8, "l2_lambda": 0.01, "allocate_lr": 1e-3}
_INT_OPTIONS = {"allocate_epochs": 5, "allocate_batch_size": 64, "seed": 0, "member": 0}


def _as_bool(value) -> bool:
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ZootuneError(f"expected a boolean (true/false), got {value!r}")
    return bool(value)


def _resolve_source(source_data, source_task, source_val_data, seed: int):
    """Source datasets and task from Python objects or, from the CLI, an image folder or the name of
    a built-in ``zootune.data`` dataset."""
    if isinstance(source_data, (str, os.PathLike)):
        from zootune.data import get_target, load_image_folder

        if os.path.isdir(source_data):
            splits = load_image_folder(source_data, seed=seed)
        else:
            splits = get_target(str(source_data), seed=seed)
        source_data, source_val_data = splits.train, source_val_data or splits.val
        if source_task is None:
            from zootune.tasks import ClassificationTask

            source_task = ClassificationTask(splits.num_classes)
    if source_task is None:
        raise ZootuneError("PAC-Net with source_data also needs source_task= (the source loss and metric)")
    return source_data, source_task, source_val_data


def build(
    zoo,
    task,
    *,
    member=None,
    fitted=None,
    source_data=None,
    source_task=None,
    source_val_data=None,
    allocate_config=None,
    scope: str = "layer",
    head_name: str | None = None,
    freeze_norm_stats=True,
    **options,
):
    """Build a PAC-Net model ready for Calibrate (the engine's training is Calibrate).

    Options (CLI ``--option key=value``):
        member (int, 0): which zoo member (or list element) is the source model; it is copied.
        prune_fraction (float, 0.8): fraction of Conv/Linear weights REMOVED from the source task.
        scope ("layer" | "global"): per-layer or global magnitude pruning.
        l2_lambda (float, 0.01): λ of the Calibrate penalty λ·||W − w_S||² on the pruned entries.
        freeze_norm_stats (bool, true): keep norm layers' running statistics fixed in Calibrate.
        head_name (str): the source model's head, if not found automatically.
        source_data: Dataset of the source task (Python), or (CLI) a folder of source images
            (``zootune.data.load_image_folder`` layout) or the name of a ``zootune.data`` dataset. With it, Allocate runs here (Adam, ``allocate_lr`` 1e-3,
            ``allocate_epochs`` 5, ``allocate_batch_size`` 64, ``seed`` 0, or ``allocate_config``,
            a ``zootune.engine.TrainConfig``); without it the method runs as "prune-calibrate"
            and warns.
        source_task: the source :class:`zootune.tasks.Task` (default for a dataset name:
            classification with its number of classes); its outputs must match the model's head.
        source_val_data: optional validation set for Allocate.

    Calibrate should use Adam as in the paper (``--optimizer adam``); any optimizer is safe, since
    frozen entries are restored after each step.
    """
    unknown = set(options) - set(_FLOAT_OPTIONS) - set(_INT_OPTIONS)
    if unknown:
        allowed = sorted([*_FLOAT_OPTIONS, *_INT_OPTIONS, "scope", "head_name", "freeze_norm_stats",
                          "source_data", "source_task", "source_val_data", "allocate_config"])
        raise ZootuneError(f"unknown pac-net option(s) {sorted(unknown)}; known: {', '.join(allowed)}")
    try:
        floats = {k: float(options.get(k, d)) for k, d in _FLOAT_OPTIONS.items()}
        ints = {k: int(options.get(k, d)) for k, d in _INT_OPTIONS.items()}
    except (TypeError, ValueError) as exc:
        raise ZootuneError(f"bad pac-net option value: {exc}") from None
    index = ints["member"] if member is None else int(member)
    members = list(zoo)
    if not members:
        raise ZootuneError("PAC-Net needs a zoo with at least one model")
    if not 0 <= index < len(members):
        raise ZootuneError(f"member {index} out of range for a zoo of {len(members)} models")
    source_model = copy.deepcopy(members[index])  # PACNet changes its model in place; the zoo is shared

    net = PACNet(source_model, task=task, head_name=head_name, prune_fraction=floats["prune_fraction"],
                 scope=scope, l2_lambda=floats["l2_lambda"], freeze_norm_stats=_as_bool(freeze_norm_stats))
    if source_data is not None:
        source_data, source_task, source_val_data = _resolve_source(source_data, source_task, source_val_data,
                                                                       ints["seed"])
        _check_source_head(net, source_task)
        config = allocate_config
        if config is None:
            from zootune.engine import TrainConfig

            config = TrainConfig(epochs=ints["allocate_epochs"], batch_size=ints["allocate_batch_size"],
                                 optimizer="adam", lr=floats["allocate_lr"], weight_decay=0.0,
                                 schedule="constant", seed=ints["seed"])
        log.info("PAC-Net Allocate: re-training the source task on %.0f%% of the weights",
                 100 * (1 - net.prune_fraction))
        result = net.allocate(source_data, source_task, config=config, val_dataset=source_val_data)
        if isinstance(getattr(result, "model", None), PACNet):
            net = result.model  # the engine's best-on-validation Allocate model
    return net.begin_calibrate()  # warns "prune-calibrate" when Allocate did not run


def _check_source_head(net: PACNet, source_task) -> None:
    expected = getattr(source_task, "num_classes", None)
    out = getattr(net.source_head, "out_features", None)
    if expected is not None and out is not None and expected != out:
        raise DataError(
            f"the source model's head has {out} outputs but the source task has {expected} classes; "
            "PAC-Net's Allocate re-trains the source task with the model's own head"
        )


register_method(
    MethodSpec(
        name="pac-net",
        help="PAC-Net (ICML 2022): prune the source model, re-train the source task on its essential "
        "weights (Allocate, needs source_data), then train only the pruned weights on the target",
        build=build,
    )
)
