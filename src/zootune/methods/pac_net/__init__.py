"""PAC-Net (Myung et al., ICML 2022): Prune, Allocate, Calibrate.

- ``prune.py``: magnitude masks (per layer or global; ``prune_fraction`` = fraction REMOVED).
- ``masked.py``: ``MaskedLayer``, the in-place wrapper routing a weight to the source or target task.
- ``model.py``: ``PACNet``, the three steps and the engine hooks, save/load, ``merge_and_unload``.

Registered as method ``"pac-net"``; see :func:`build` for the options the CLI can pass.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

from zootune.errors import DataError, ZootuneError
from zootune.methods.pac_net.masked import MaskedLayer
from zootune.methods.pac_net.model import PRUNE_CALIBRATE_WARNING, PACNet, PACNetConfig, log
from zootune.methods.pac_net.prune import magnitude_masks
from zootune.methods.registry import BuildContext, MethodSpec, register_method
from zootune.options import require
from zootune.tasks import task_for

__all__ = ["PACNet", "PACNetConfig", "PACNetOptions", "MaskedLayer", "magnitude_masks", "build",
           "PRUNE_CALIBRATE_WARNING"]


@dataclass
class PACNetOptions:
    """Options of method ``pac-net`` (CLI ``--option key=value``)."""

    member: int = 0  # which zoo member is the source model (``--member`` overrides); it is copied
    prune_fraction: float = 0.8  # fraction of Conv/Linear weights REMOVED from the source task
    scope: Literal["layer", "global"] = "layer"  # per-layer or global magnitude pruning
    l2_lambda: float = 0.01  # lambda of the Calibrate penalty lambda * ||W - w_S||^2 on the pruned entries
    freeze_norm_stats: bool = True  # keep norm layers' running statistics fixed in Calibrate
    head_name: str | None = None  # the source model's head, if not found automatically
    allocate_lr: float = 1e-3  # Allocate: Adam at this rate ...
    allocate_epochs: int = 5  # ... for this many epochs ...
    allocate_batch_size: int = 64  # ... at this batch size

    def __post_init__(self):
        require(self.member >= 0, f"member must be >= 0, got {self.member}")
        require(0.0 <= self.prune_fraction < 1.0, f"prune_fraction must be in [0, 1), got {self.prune_fraction}")
        require(self.l2_lambda >= 0, f"l2_lambda must be >= 0, got {self.l2_lambda}")
        require(self.allocate_lr > 0, f"allocate_lr must be > 0, got {self.allocate_lr}")
        require(self.allocate_epochs >= 1, f"allocate_epochs must be >= 1, got {self.allocate_epochs}")
        require(self.allocate_batch_size >= 1, f"allocate_batch_size must be >= 1, got {self.allocate_batch_size}")


def build(ctx: BuildContext) -> PACNet:
    """A PAC-Net model ready for Calibrate (the engine's training is Calibrate).

    The source model is zoo member ``ctx.member`` (else ``member``). With source data
    (``ctx.source_data``: the source task's DatasetSplits, with a ``task`` or ``num_classes``), Allocate
    re-trains the source task on the kept weights here, through the engine (Adam, ``allocate_lr``,
    ``allocate_epochs``, ``allocate_batch_size``, the run's seed); without it the method runs as
    "prune-calibrate" and warns. When a saved model is rebuilt (``ctx.rebuilding``) only the
    structure is made: masks and weights come from the file.

    Calibrate should use Adam as in the paper (``--optimizer adam``); any optimizer is safe, since
    frozen entries are restored after each step.
    """
    config = ctx.config or PACNetOptions()
    members = list(ctx.zoo)
    if not members:
        raise ZootuneError("PAC-Net needs a zoo with at least one model")
    index = config.member if ctx.member is None else int(ctx.member)
    if not 0 <= index < len(members):
        raise ZootuneError(f"member {index} out of range for a zoo of {len(members)} models")
    source_model = copy.deepcopy(members[index])  # PACNet changes its model in place; the zoo is shared

    net = PACNet(source_model, task=ctx.task, head_name=config.head_name, prune_fraction=config.prune_fraction,
                 scope=config.scope, l2_lambda=config.l2_lambda, freeze_norm_stats=config.freeze_norm_stats)
    if ctx.rebuilding:
        return net.begin_calibrate(snapshot=False)
    if ctx.source_data is not None:
        source = ctx.source_data
        source_task = task_for(source)
        _check_source_head(net, source_task)
        from zootune.engine import TrainConfig

        allocate = TrainConfig(epochs=config.allocate_epochs, batch_size=config.allocate_batch_size,
                               optimizer="adam", lr=config.allocate_lr, weight_decay=0.0, schedule="constant",
                               seed=ctx.seed, progress=False)
        log.info("PAC-Net Allocate: re-training the source task on %.0f%% of the weights",
                 100 * (1 - net.prune_fraction))
        result = net.allocate(source.train, source_task, config=allocate, val_dataset=getattr(source, "val", None))
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
        config=PACNetOptions,
        in_default_run=False,
        default_run_note="single-source method that needs source data (name it with --methods to run it)",
        needs_source_data=True,
    )
)
