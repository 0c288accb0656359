"""Evaluation and prediction over a whole dataset.

The metric over a split is exact: each batch gives ``task.metric_sums -> (sum, count)`` and the loss
summed over its samples; these are added over batches (and over processes when sharded) and divided
once at the end, so the batch size and the number of processes do not change the result.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from zootune.data.loading import one_line_worker_errors
from zootune.engine import distributed
from zootune.errors import DataError
from zootune.tasks import Task


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _check_non_empty(dataset: Dataset, what: str) -> None:
    if len(dataset) == 0:
        raise DataError(f"the {what} dataset is empty")


@torch.no_grad()
def evaluation_sums(
    model: nn.Module,
    task: Task,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    shard: bool = False,
) -> torch.Tensor:
    """``[loss summed over samples, metric sum, metric count, samples]`` (float64).

    With ``shard=True`` each process evaluates every ``world_size``-th sample (no repeats, unlike a
    padded DistributedSampler) and the sums are added over processes; every rank must call it.
    """
    info = distributed.current() if shard else distributed.DistInfo()
    indices = list(range(info.rank, len(dataset), info.world_size))
    device = _model_device(model)
    loader = DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)
    try:
        for inputs, targets in one_line_worker_errors(loader):
            task.check_targets(targets)
            inputs, targets = inputs.to(device), targets.to(device)
            outputs = model(inputs)
            n = targets.shape[0]
            metric_sum, metric_count = task.metric_sums(outputs, targets)
            sums += torch.tensor(
                [float(task.loss(outputs, targets)) * n, metric_sum, metric_count, n], dtype=torch.float64
            )
    finally:
        model.train(was_training)
    return distributed.all_reduce_sum(sums) if shard else sums


def sums_to_metrics(sums: torch.Tensor, task: Task) -> dict[str, float]:
    loss_sum, metric_sum, metric_count, n = sums.tolist()
    return {"loss": loss_sum / max(n, 1), task.metric_name: metric_sum / max(metric_count, 1)}


def evaluate(
    model: nn.Module, task: Task, dataset: Dataset, batch_size: int = 256, num_workers: int = 0
) -> dict[str, float]:
    """``{"loss": mean loss, task.metric_name: metric}`` of ``model`` (in eval mode) on ``dataset``.

    Runs in this process only; the :class:`Trainer` shards its validation over processes itself.
    """
    _check_non_empty(dataset, "evaluation")
    return sums_to_metrics(
        evaluation_sums(model, task, dataset, batch_size=batch_size, num_workers=num_workers), task
    )


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, batch_size: int = 256, num_workers: int = 0) -> torch.Tensor:
    """The model's outputs (eval mode) for every sample of ``dataset``, in order, on CPU.

    Items may be ``(input, label)`` pairs or bare inputs; labels are ignored.
    """
    _check_non_empty(dataset, "prediction")
    device = _model_device(model)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for batch in one_line_worker_errors(loader):
            inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
            outputs.append(model(inputs.to(device)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(outputs)
