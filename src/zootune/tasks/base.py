from __future__ import annotations

import abc

import torch
from torch import nn

from zootune.errors import ZootuneError


class Task(abc.ABC):
    """The head, loss and metric of a target task.

    ``metric_name`` is what tables show; ``higher_is_better`` tells model selection which way to go.
    """

    metric_name: str = "metric"
    higher_is_better: bool = True

    @abc.abstractmethod
    def make_head(self, in_features: int) -> nn.Module:
        """A new head mapping pooled features of size ``in_features`` to this task's outputs."""

    @abc.abstractmethod
    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Scalar training loss (mean over the batch)."""

    @abc.abstractmethod
    def metric_sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
        """(sum of the per-sample metric over the batch, number of samples); the engine adds these
        over batches (and workers) and divides, so the metric is exact over a whole split."""

    def check_targets(self, targets: torch.Tensor) -> None:
        """Raise :class:`zootune.errors.DataError` for targets this task cannot use."""

    def to_config(self) -> dict:
        """This task as a model folder's config.json records it: ``{"type": name, **arguments}``, read
        back by :func:`zootune.tasks.task_from_config`. Only the task types registered there have one."""
        raise ZootuneError(f"a {type(self).__name__} cannot be recorded in a model folder: only the task "
                           "types of zootune.tasks.TASK_TYPES can")
