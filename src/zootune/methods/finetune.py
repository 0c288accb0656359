"""Fine-tuning one zoo member: the single-source baseline every zoo method is compared against.

The member is copied (the zoo is never modified), its head is replaced by the task's new head
(``task.make_head``; for classification a Linear initialised N(0, 0.01), bias 0) and all weights are
trained on the target task. The Zoo-Tuning paper's Table 1 rows "ImageNet sup.", "MoCo", ... are this
method applied to each member (``per_member=True``: the comparison runs it once per member).

Learning rates (an optional discriminative rate, as is common in transfer learning)::

    lr(head) = base_lr,    lr(backbone) = backbone_lr_mult * base_lr

``backbone_lr_mult=1`` is plain fine-tuning (the Zoo-Tuning reference trains everything at one rate);
``0`` freezes the backbone (linear probing).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from zootune.errors import ZootuneError
from zootune.methods.registry import BuildContext, MethodSpec, register_method
from zootune.options import require
from zootune.models.heads import find_head_name, head_in_features, replace_head
from zootune.tasks import Task


def copy_with_new_head(model: nn.Module, task: Task, head_name: str | None = None) -> tuple[nn.Module, str]:
    """A deep copy of ``model`` whose head is ``task.make_head(in_features)``; returns (copy, head name).

    The copy keeps the source model's train/eval flag and device; the new head is moved to the device of
    the model's parameters so that a zoo on GPU gives a model on GPU.
    """
    new = copy.deepcopy(model)
    name = find_head_name(new, head_name)
    head = task.make_head(head_in_features(new, name))
    first = next(new.parameters(), None)
    if first is not None:
        head = head.to(device=first.device, dtype=first.dtype)
    replace_head(new, head, name)
    return new, name


def check_member_index(zoo: Sequence[nn.Module], member: int | None) -> int:
    if len(zoo) == 0:
        raise ZootuneError("the zoo is empty: give at least one model")
    index = 0 if member is None else int(member)
    if not 0 <= index < len(zoo):
        raise ZootuneError(f"member index {member} is out of range for a zoo of {len(zoo)} models")
    return index


class FineTune(nn.Module):
    """A model with a new head, trained with ``lr(backbone) = backbone_lr_mult * lr(head)``.

    ``forward`` is the wrapped model's; :meth:`finalize` returns the plain model (the wrapper only
    carries the learning-rate split for the engine).
    """

    def __init__(self, model: nn.Module, head_name: str, backbone_lr_mult: float = 1.0):
        super().__init__()
        if backbone_lr_mult < 0:
            raise ZootuneError(f"backbone_lr_mult must be >= 0, got {backbone_lr_mult}")
        self.model = model
        self.head_name = head_name
        self.backbone_lr_mult = float(backbone_lr_mult)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def param_groups(self, base_lr: float) -> list[dict]:
        head_ids = {id(p) for p in self.model.get_submodule(self.head_name).parameters()}
        head = [p for p in self.model.parameters() if p.requires_grad and id(p) in head_ids]
        backbone = [p for p in self.model.parameters() if p.requires_grad and id(p) not in head_ids]
        groups = [{"params": head, "lr": base_lr, "name": "head"}]
        # A zero rate would still apply weight decay and momentum to the backbone: leave it out instead.
        if backbone and self.backbone_lr_mult > 0:
            groups.append({"params": backbone, "lr": base_lr * self.backbone_lr_mult, "name": "backbone"})
        return groups

    def merge_and_unload(self) -> nn.Module:
        """The plain model (the wrapper only holds the learning rates)."""
        return self.model

    def finalize(self) -> nn.Module:
        return self.merge_and_unload()


@dataclass
class FineTuneConfig:
    """Options of ``finetune`` (and of ``scratch``, ``soup`` and ``fisher-merge``, which fine-tune too)."""

    backbone_lr_mult: float = 1.0  # lr(backbone) / lr(head); 0 freezes the backbone (linear probing)
    head_name: str | None = None  # the members' head, when it is not found automatically

    def __post_init__(self):
        require(self.backbone_lr_mult >= 0, f"backbone_lr_mult must be >= 0, got {self.backbone_lr_mult}")


def fine_tune(model: nn.Module, task: Task, config: FineTuneConfig | None = None) -> FineTune:
    """``model`` (copied) with a new head for ``task``, wrapped for fine-tuning."""
    config = config or FineTuneConfig()
    new, name = copy_with_new_head(model, task, config.head_name)
    return FineTune(new, name, config.backbone_lr_mult)


def probe_fine_tune(member: nn.Module, task: Task, train_dataset, val_dataset, train_config, epochs: int) -> float:
    """The best validation metric of a short fine-tune of ``member`` (a copy) with ``train_config``'s
    optimiser settings and seed, its schedule compressed into ``epochs`` epochs: the probe with which
    zootune ranks members (robust Zoo-Tuning's start)."""
    return float(probe_run(member, task, train_dataset, val_dataset, train_config, epochs).best_val_metric)


def probe_run(member: nn.Module, task: Task, train_dataset, val_dataset, train_config, epochs: int):
    """:func:`probe_fine_tune`'s training, whole (its history and divergence-guard rollbacks): the
    engine's :class:`~zootune.engine.FitResult`."""
    import dataclasses

    from zootune.engine import Trainer

    # the schedule compressed into the probe's epochs, its warm-up with it
    warmup = train_config.warmup_epochs * epochs / train_config.epochs
    config = dataclasses.replace(train_config, epochs=epochs, stop_after=None, progress=False, warmup_epochs=warmup)
    torch.manual_seed(config.seed)  # every probe's head starts from the same draw
    model, head_name = copy_with_new_head(member, task)  # a copy
    return Trainer(FineTune(model, head_name), task, train_dataset, val_dataset, config=config).fit()


def build(ctx: BuildContext) -> FineTune:
    """Fine-tune zoo member ``ctx.member`` (default 0) with a new head for ``ctx.task``."""
    return fine_tune(ctx.zoo[check_member_index(ctx.zoo, ctx.member)], ctx.task, ctx.config)


register_method(
    MethodSpec(
        name="finetune",
        help="fine-tune one zoo member with a new head (run once per member)",
        build=build,
        plain_model=True,
        config=FineTuneConfig,
        per_member=True,
    )
)
