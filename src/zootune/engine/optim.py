"""The optimizer and the per-step learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from zootune.engine.config import TrainConfig
from zootune.errors import ZootuneError


def build_optimizer(module: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW over ``module.param_groups(config.lr)`` if the method defines it (e.g. a
    lower backbone rate), else over every parameter with ``requires_grad``.

    Each group's own ``lr`` is remembered as ``initial_lr``: the schedule scales it, so ratios between
    groups hold for the whole run.
    """
    if callable(getattr(module, "param_groups", None)):
        groups = [dict(g) for g in module.param_groups(config.lr)]
        for g in groups:
            g["params"] = [p for p in g["params"] if p.requires_grad]
        groups = [g for g in groups if g["params"]]
    else:
        params = [p for p in module.parameters() if p.requires_grad]
        groups = [{"params": params}] if params else []
    if not groups:
        raise ZootuneError(
            f"{type(module).__name__} has no trainable parameters (all have requires_grad=False); "
            "nothing to train"
        )
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            groups,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov and config.momentum > 0,
            weight_decay=config.weight_decay,
        )
    elif config.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    for g in optimizer.param_groups:
        g["initial_lr"] = g["lr"]
    return optimizer


class LRSchedule:
    """``f(step)``, the factor on every group's ``initial_lr`` (formulas on :class:`TrainConfig`).

    A pure function of the step: its whole state is the step counter that the checkpoint stores.
    """

    def __init__(self, config: TrainConfig, steps_per_epoch: int):
        self.kind = config.schedule
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.warmup_steps = min(round(config.warmup_epochs * self.steps_per_epoch), self.total_steps)
        self.step_size = config.step_size or max(1, config.epochs // 3)
        self.gamma = config.gamma

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            t = min(1.0, (step - self.warmup_steps) / span)
            return 0.5 * (1.0 + math.cos(math.pi * t))
        if self.kind == "step":
            return self.gamma ** ((step // self.steps_per_epoch) // self.step_size)
        return 1.0

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's rate for ``step``; returns the factor."""
        f = self.factor(step)
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f
        return f
