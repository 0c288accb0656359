"""PACNet: one network whose weights are split between a source task and a target task.

Myung et al., "PAC-Net: A Model Pruning Approach to Inductive Transfer Learning", ICML 2022
(arXiv 2206.05703). Starting from a network trained on the source task:

1. **Prune** (at construction): essential mask ``m`` from weight magnitudes
   (:func:`zootune.methods.pac_net.prune.magnitude_masks`); pruned entries are set to 0.
2. **Allocate** (``stage="allocate"``, route ``"source"``): re-train the source task with
   ``W ⊙ m``; pruned entries stay exactly 0. Biases, norm layers and the source head train too:
   they belong to the source task.
3. **Calibrate** (``stage="calibrate"``, route ``"target"``): with ``w_S`` the allocated weights
   (0 at pruned entries) train on the target task only the pruned entries and the target head,
   minimising ::

       L_target(W) + λ · Σ_layers ||(W − w_S) ⊙ (1 − m)||²

   (the L2-SP form of Li et al., 2018, restricted to the calibrated entries; λ = 0.01 in the paper).
   Essential entries, biases, norm layers (parameters *and* running statistics, unless
   ``freeze_norm_stats=False``) and the source head are frozen exactly, so the source task's
   outputs (route ``"source"``, i.e. ``model.task = "source"``) are unchanged by Calibrate.

The wrapped model's head (``fc``/``classifier``/..., or ``head_name``) becomes ``source_head``;
``target_head`` is a new head for the target task (``task.make_head``) or a copy of the source head
when none is given (same output space, e.g. regression). The head must be applied last, to the
features the rest of the model produces (true for ResNets and plain MLPs).

The model is changed in place (as PEFT does); :meth:`merge_and_unload` gives back a plain model for
either task.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from zootune.errors import CheckpointError, ZootuneError
from zootune.methods.pac_net.masked import ROUTES, MaskedLayer
from zootune.methods.pac_net.prune import SCOPES, check_prune_fraction, magnitude_masks
from zootune.layers.wrapper import merge_and_unload as unload
from zootune.layers.wrapper import replace_layer
from zootune.models.heads import find_head_name, head_in_features, set_submodule
from zootune.version import __version__

STAGES = ("allocate", "calibrate")
CONFIG_NAME = "pac_net.json"
WEIGHTS_NAME = "pac_net.safetensors"
FORMAT = "zootune.pac_net"
DEFAULT_PRUNE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

log = logging.getLogger("zootune.pac_net")

PRUNE_CALIBRATE_WARNING = (
    "PAC-Net without source data: running 'prune-calibrate' (Prune + Calibrate, no Allocate). The "
    "source task is not re-trained on its essential weights, so its accuracy lost to pruning is not "
    "recovered; give source data (build(..., source_data=...) or PACNet.allocate) for the full method."
)


@dataclasses.dataclass
class PACNetConfig:
    """What :meth:`PACNet.save` writes as JSON next to the weights."""

    prune_fraction: float
    scope: str
    l2_lambda: float
    freeze_norm_stats: bool
    head_name: str
    layers: list[str]
    stage: str
    task: str
    target_head: dict
    allocate_steps: int = 0
    format: str = FORMAT
    zootune_version: str = __version__


class PACNet(nn.Module):
    """Prune, Allocate, Calibrate on any ``nn.Module`` (see the module docstring for the equations).

    Args:
        model: the network trained on the source task (changed in place).
        target_head: head for the target task; default ``task.make_head(in_features)`` if ``task``
            is given, else a copy of the source head.
        task: target :class:`zootune.tasks.Task`, used only to make ``target_head``.
        head_name: dotted name of the model's head (found automatically otherwise).
        prune_fraction: fraction of the pruned weights' entries REMOVED from the source task and
            handed to the target (paper: 0.8).
        scope: ``"layer"`` (default: every layer keeps ``1 - prune_fraction`` of its entries, so no
            layer is emptied) or ``"global"`` (one magnitude threshold over all layers).
        prune_types: layer types whose ``weight`` is pruned (default Conv1d/2d/3d and Linear).
            Biases and normalisation layers are never pruned; the head is never pruned.
        layers: explicit dotted names (relative to ``model``) of the layers to prune, instead of
            ``prune_types``.
        masks: essential masks by layer name (``True`` = essential) to use instead of magnitude
            pruning, e.g. when loading.
        l2_lambda: λ of the Calibrate penalty.
        freeze_norm_stats: keep normalisation layers in eval mode during Calibrate, so target
            batches cannot change the running statistics the source task uses.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        target_head: nn.Module | None = None,
        task=None,
        head_name: str | None = None,
        prune_fraction: float = 0.8,
        scope: str = "layer",
        prune_types: Iterable[type[nn.Module]] = DEFAULT_PRUNE_TYPES,
        layers: Iterable[str] | None = None,
        masks: Mapping[str, torch.Tensor] | None = None,
        l2_lambda: float = 0.01,
        freeze_norm_stats: bool = True,
    ):
        super().__init__()
        self.prune_fraction = check_prune_fraction(prune_fraction)
        if scope not in SCOPES:
            raise ZootuneError(f"pruning scope must be one of {SCOPES}, got {scope!r}")
        if float(l2_lambda) < 0:
            raise ZootuneError(f"l2_lambda must be >= 0, got {l2_lambda}")
        self.scope = scope
        self.l2_lambda = float(l2_lambda)
        self.freeze_norm_stats = bool(freeze_norm_stats)

        self.head_name = find_head_name(model, head_name)
        in_features = head_in_features(model, self.head_name)
        self.source_head = model.get_submodule(self.head_name)
        if target_head is not None:
            self._target_head_kind = "custom"
        elif task is not None:
            target_head = task.make_head(in_features)
            self._target_head_kind = "task"
        else:
            target_head = copy.deepcopy(self.source_head)
            self._target_head_kind = "copy_of_source"
        self.target_head = target_head
        set_submodule(model, self.head_name, nn.Identity())  # the body now returns the head's input
        self.body = model

        chosen = self._select_layers(prune_types, layers)
        if masks is None:
            masks = magnitude_masks({n: m.weight for n, m in chosen.items()}, self.prune_fraction, scope)
        missing = sorted(set(chosen) - set(masks))
        if missing:
            raise ZootuneError(f"no mask given for layers: {', '.join(missing)}")
        for name, module in chosen.items():
            replace_layer(self.body, name, MaskedLayer(module, masks[name]))
        self.layer_names = list(chosen)
        for layer in self.masked_layers():
            layer.zero_pruned()  # Prune: the pruned entries leave the source network now
            layer.snapshot_source()
        self.stage = "allocate"
        self._task = "source"
        self.allocate_steps = 0  # optimiser steps taken in Allocate; 0 at Calibrate = "prune-calibrate"
        self.begin_allocate()

    # ---- structure --------------------------------------------------------------------------
    def _select_layers(self, prune_types, layers) -> dict[str, nn.Module]:
        modules = dict(self.body.named_modules())
        if layers is not None:
            names = list(layers)
            unknown = [n for n in names if n not in modules or not isinstance(getattr(modules[n], "weight", None), nn.Parameter)]
            if unknown:
                raise ZootuneError(f"cannot prune {unknown}: no such layer with a weight in the model (the head is excluded)")
            return {n: modules[n] for n in names}
        types = tuple(prune_types)
        return {
            name: m
            for name, m in modules.items()
            if name and isinstance(m, types) and isinstance(getattr(m, "weight", None), nn.Parameter)
        }

    def masked_layers(self) -> list[MaskedLayer]:
        return [self.body.get_submodule(name) for name in self.layer_names]

    def masks(self) -> dict[str, torch.Tensor]:
        """Essential masks by layer name (``True`` = essential, i.e. kept for the source task)."""
        return {name: layer.essential_mask.clone() for name, layer in zip(self.layer_names, self.masked_layers())}

    @property
    def mode(self) -> str:
        """``"prune-allocate-calibrate"`` once Allocate has trained, else ``"prune-calibrate"``."""
        return "prune-allocate-calibrate" if self.allocate_steps > 0 else "prune-calibrate"

    # ---- task route -------------------------------------------------------------------------
    @property
    def task(self) -> str:
        """``"source"``: essential weights and the source head; ``"target"``: all weights and the
        target head."""
        return self._task

    @task.setter
    def task(self, value: str) -> None:
        if value not in ROUTES:
            raise ZootuneError(f"PACNet.task must be one of {ROUTES}, got {value!r}")
        self._task = value
        for layer in self.masked_layers():
            layer.route = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body(x)
        return (self.source_head if self._task == "source" else self.target_head)(features)

    # ---- stages -----------------------------------------------------------------------------
    def begin_allocate(self) -> "PACNet":
        """Train the source task on essential entries (+ biases, norms, source head)."""
        self.stage = "allocate"
        self.task = "source"
        for p in self.body.parameters():
            p.requires_grad_(True)
        self.source_head.requires_grad_(True)
        self.target_head.requires_grad_(False)
        return self.train(self.training)

    def begin_calibrate(self, *, snapshot: bool = True) -> "PACNet":
        """Freeze everything but the pruned entries and the target head; record ``w_S``.

        Warns (and logs) when no Allocate step was taken: the method is then "prune-calibrate"."""
        if snapshot and self.allocate_steps == 0 and self.stage == "allocate":
            warnings.warn(PRUNE_CALIBRATE_WARNING, stacklevel=2)
            log.warning(PRUNE_CALIBRATE_WARNING)
        self.stage = "calibrate"
        self.task = "target"
        self.body.requires_grad_(False)
        self.source_head.requires_grad_(False)
        for layer in self.masked_layers():
            if snapshot:
                layer.zero_pruned()  # already 0 after Allocate; makes prune-calibrate start there too
                layer.snapshot_source()
            layer.weight.requires_grad_(True)
        self.target_head.requires_grad_(True)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "PACNet":
        super().train(mode)
        if mode and self.stage == "calibrate" and self.freeze_norm_stats:
            for m in self.body.modules():
                if isinstance(m, nn.modules.batchnorm._NormBase):
                    m.eval()  # target batches must not move the source task's running statistics
        return self

    # ---- hooks of zootune.methods.base ------------------------------------------------------
    def auxiliary_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``λ Σ ||(W − w_S) ⊙ (1 − m)||²`` during Calibrate, 0 otherwise."""
        if self.stage != "calibrate" or self.l2_lambda == 0:
            return outputs.new_zeros(())
        return self.l2_lambda * sum(layer.calibration_penalty() for layer in self.masked_layers())

    def after_optimizer_step(self) -> None:
        """Undo what weight decay / momentum did to entries the current stage must not change."""
        if self.stage == "allocate":
            self.allocate_steps += 1
        for layer in self.masked_layers():
            if self.stage == "allocate":
                layer.zero_pruned()
            else:
                layer.restore_essential()

    def param_groups(self, base_lr: float) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": base_lr}]

    def finalize(self) -> nn.Module:
        return self

    # ---- convenience training (the shared engine) -------------------------------------------
    def allocate(self, train_dataset, source_task, config=None, val_dataset=None, out_dir=None):
        """Run Allocate with :class:`zootune.engine.Trainer` (default: Adam, lr 1e-3, 5 epochs)."""
        self.begin_allocate()
        return _fit(self, source_task, train_dataset, val_dataset, config, out_dir)

    def calibrate(self, train_dataset, target_task, config=None, val_dataset=None, out_dir=None):
        """Run Calibrate with :class:`zootune.engine.Trainer` (default: Adam, lr 1e-3, 5 epochs)."""
        self.begin_calibrate()
        return _fit(self, target_task, train_dataset, val_dataset, config, out_dir)

    # ---- export -----------------------------------------------------------------------------
    @torch.no_grad()
    def merge_and_unload(self, task: str | None = None) -> nn.Module:
        """A plain copy of the model for ``task`` (default: the current one), with the routed
        weights written into ordinary layers and that task's head in place. ``self`` is unchanged."""
        task = task or self._task
        if task not in ROUTES:
            raise ZootuneError(f"task must be one of {ROUTES}, got {task!r}")
        plain = unload(self.body, task=task)
        set_submodule(plain, self.head_name, copy.deepcopy(self.source_head if task == "source" else self.target_head))
        plain.requires_grad_(True)
        return plain.train(self.training)

    # ---- save / load ------------------------------------------------------------------------
    def config(self) -> PACNetConfig:
        head = self.target_head
        if self._target_head_kind != "custom" and isinstance(head, nn.Linear):
            spec = {"kind": "linear", "in_features": head.in_features, "out_features": head.out_features,
                    "bias": head.bias is not None}
        elif self._target_head_kind == "copy_of_source":
            spec = {"kind": "copy_of_source"}
        else:
            spec = {"kind": "custom", "type": type(head).__name__}
        return PACNetConfig(self.prune_fraction, self.scope, self.l2_lambda, self.freeze_norm_stats,
                            self.head_name, list(self.layer_names), self.stage, self._task, spec,
                            self.allocate_steps)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``pac_net.safetensors`` (weights, masks, ``w_S``, norm buffers) and ``pac_net.json``."""
        from safetensors.torch import save

        from zootune.atomic import atomic_write_bytes, atomic_write_json

        directory = Path(directory)
        # safetensors refuses shared storage; clones also make the saved tensors contiguous
        tensors = {k: v.detach().cpu().clone().contiguous() for k, v in self.state_dict().items()}
        atomic_write_bytes(directory / WEIGHTS_NAME, save(tensors, metadata={"format": FORMAT}))
        atomic_write_json(directory / CONFIG_NAME, dataclasses.asdict(self.config()))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, model: nn.Module, target_head: nn.Module | None = None) -> "PACNet":
        """Rebuild a saved PACNet on ``model``, a fresh instance of the original architecture
        (with its source head). ``target_head`` is needed only if a custom one was saved."""
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            raw = json.loads((directory / CONFIG_NAME).read_text())
            cfg = PACNetConfig(**{k: v for k, v in raw.items()})
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(f"cannot read PAC-Net config {directory / CONFIG_NAME}: {exc}") from None
        if cfg.format != FORMAT:
            raise CheckpointError(f"{directory / CONFIG_NAME} is not a PAC-Net config (format {cfg.format!r})")
        try:
            state = load_file(str(directory / WEIGHTS_NAME))
        except Exception as exc:  # safetensors raises several types for missing/corrupt files
            raise CheckpointError(f"cannot read PAC-Net weights {directory / WEIGHTS_NAME}: {exc}") from None
        spec = cfg.target_head
        if target_head is None:
            if spec["kind"] == "linear":
                target_head = nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"])
            elif spec["kind"] == "custom":
                raise CheckpointError(f"the saved PAC-Net has a custom target head ({spec.get('type')}); pass target_head=")
        masks = {}
        for name in cfg.layers:
            key = f"body.{name}.essential_mask"
            if key not in state:
                raise CheckpointError(f"{directory / WEIGHTS_NAME} has no mask for layer {name!r}")
            masks[name] = state[key].bool()
        try:
            net = cls(model, target_head=target_head, head_name=cfg.head_name, prune_fraction=cfg.prune_fraction,
                      scope=cfg.scope, layers=cfg.layers, masks=masks, l2_lambda=cfg.l2_lambda,
                      freeze_norm_stats=cfg.freeze_norm_stats)
            net._target_head_kind = "copy_of_source" if spec["kind"] == "copy_of_source" else net._target_head_kind
            net.load_state_dict(state, strict=True)
            net.allocate_steps = int(cfg.allocate_steps)
        except (RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{directory} does not fit this model: {str(exc).splitlines()[0]}") from None
        if cfg.stage == "calibrate":
            net.begin_calibrate(snapshot=False)  # w_S comes from the file
        net.task = cfg.task
        return net


def _fit(net: PACNet, task, train_dataset, val_dataset, config, out_dir):
    try:
        from zootune.engine import TrainConfig, Trainer
    except ImportError as exc:  # pragma: no cover - the engine ships with zootune
        raise ZootuneError(f"PACNet.allocate/calibrate need zootune.engine: {exc}") from None
    if config is None:
        config = TrainConfig(epochs=5, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0,
                             schedule="constant")
    return Trainer(net, task, train_dataset, val_dataset, config=config, out_dir=out_dir).fit()
