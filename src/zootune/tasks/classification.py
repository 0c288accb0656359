from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zootune.errors import DataError
from zootune.models.heads import new_linear_head
from zootune.tasks.base import Task


class ClassificationTask(Task):
    """``num_classes``-way classification: cross-entropy loss, top-1 accuracy in percent."""

    metric_name = "acc"
    higher_is_better = True

    def __init__(self, num_classes: int):
        if num_classes < 2:
            raise DataError(f"classification needs at least 2 classes, got {num_classes}")
        self.num_classes = num_classes

    def make_head(self, in_features: int) -> nn.Module:
        return new_linear_head(in_features, self.num_classes)

    def to_config(self) -> dict:
        return {"type": "classification", "num_classes": self.num_classes}

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def metric_sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
        correct = (outputs.argmax(dim=1) == targets).sum().item()
        return 100.0 * correct, targets.numel()

    def check_targets(self, targets: torch.Tensor) -> None:
        if targets.numel() == 0:
            return
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= self.num_classes:
            raise DataError(
                f"label out of range: found labels in [{lo}, {hi}] but the task has "
                f"{self.num_classes} classes (valid labels 0..{self.num_classes - 1})"
            )
