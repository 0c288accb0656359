"""BatchNorm over the global batch of all processes (``TrainConfig.sync_bn``).

Under DistributedDataParallel each process normally normalises with the statistics of its own slice
of the global batch, so ``W`` processes do not compute what one process with the same global batch
computes. With ``sync_bn`` every BatchNorm layer in training mode normalises with the mean and the
(biased) variance over the whole global batch,

    mu = (sum_r sum_{i in slice r} x_i) / N,    var = (sum_r sum_{i in slice r} (x_i - mu)^2) / N,

summed over processes with a differentiable all-reduce, and updates its running statistics with
mu and the unbiased N / (N - 1) var, exactly as one process would. Gradients flow through the
all-reduce (its backward is an all-reduce of the gradients), so the engine's per-rank loss weights
and DDP's gradient average give the one-process gradient.

``torch.nn.SyncBatchNorm`` does this for CUDA tensors only (torch 2.13 raises "SyncBatchNorm expected
input tensor to be on GPU" for CPU inputs); on a GPU the engine uses it, on CPU processes (gloo)
:class:`CpuSyncBatchNorm`. Both conversions change each layer's class in place (same object, same
parameters and buffers) and :func:`revert_sync_batchnorm` changes them back, so the trained model
that the engine returns has the architecture's own BatchNorm classes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _global_world() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _SumOverProcesses(torch.autograd.Function):
    """y = sum over processes of x; its backward is the sum over processes of dL/dy (every process's
    loss depends on y), the gradient of the sum of all processes' losses."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


class CpuSyncBatchNorm(_BatchNorm):
    """A BatchNorm layer (any dimension) that normalises over all processes' samples in training.

    Outside training, or without a process group of several processes, it is the plain layer.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _global_world()):
            return super().forward(x)
        all_reduce = _SumOverProcesses.apply
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = (1, -1, *([1] * (x.dim() - 2)))
        x32 = x.float()
        count = x32.new_tensor([x.numel() // x.shape[1]])
        totals = all_reduce(torch.cat([x32.sum(dims), count]))
        n = totals[-1]
        mean = totals[:-1] / n
        centered = x32 - mean.view(shape)
        var = all_reduce(centered.square().sum(dims)) / n
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> list[tuple[nn.Module, type]]:
    """Make every BatchNorm layer of ``module`` normalise over the global batch (in place).

    Returns ``[(layer, original class)]`` for :func:`revert_sync_batchnorm`.
    """
    converted = []
    for layer in module.modules():
        if not isinstance(layer, _BatchNorm) or isinstance(layer, (nn.SyncBatchNorm, CpuSyncBatchNorm)):
            continue
        converted.append((layer, type(layer)))
        if device.type == "cuda":
            layer.__class__ = nn.SyncBatchNorm
            layer.process_group = None  # the default (whole world) group
        else:
            layer.__class__ = CpuSyncBatchNorm
    return converted


def revert_sync_batchnorm(converted: list[tuple[nn.Module, type]]) -> None:
    """Give each converted layer its original class back."""
    for layer, original in converted:
        layer.__class__ = original
        layer.__dict__.pop("process_group", None)
