"""Multi-process training under ``torchrun``: process-group set-up and the few collectives used.

``torchrun --nproc_per_node N script.py`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env` joins the group (NCCL on GPUs, gloo on CPU).
With ``WORLD_SIZE`` unset or 1 everything here is a no-op, so single-process code needs no branches.

What W processes compute, against one process with the same global batch (``TrainConfig.batch_size``):

- equal (up to float rounding, ~1e-6 relative; tested with 2 gloo processes): the samples of every
  optimisation step (each global batch cut into W slices, :mod:`zootune.engine.sampler`), the
  gradient (each rank's loss weighted by its slice size), the learning rate, the validation metrics
  (sums over ranks), what a module averages over ranks itself every step (e.g. a gate ensemble), and
  BatchNorm **only with** ``sync_bn=True`` (global-batch statistics, :mod:`zootune.engine.sync_bn`);
- not equal: BatchNorm without ``sync_bn`` (each rank normalises its own slice: a different function
  of the global batch, and different running statistics); random augmentation and dropout (each
  rank draws from its own stream, seeded ``seed + rank``, so which random crop a sample gets depends
  on W -- unless the dataset draws per sample from (seed, epoch, index)); a final global batch with
  fewer than W (2W with BatchNorm) samples, which W processes drop.
- bit-for-bit: a W-process run resumed on W processes equals the uninterrupted W-process run (every
  rank's RNG state and the modules' training states are in rank 0's checkpoint).

Only rank 0 writes the engine's files (checkpoint, metrics) and logs; :func:`is_main` tells callers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from zootune.errors import ZootuneError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(backend: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment variables (idempotent).

    Returns ``DistInfo()`` (rank 0 of 1) when ``WORLD_SIZE`` is unset or 1.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_available():
        raise ZootuneError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ZootuneError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; launch with "
            "`torchrun --nproc_per_node N ...`"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://")
    return current()


def current() -> DistInfo:
    """Rank and world size of the joined group, or a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def is_main() -> bool:
    """True in the process that writes files and prints: rank 0, or the only process."""
    return current().is_main


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over all processes (returned as a new float64 tensor; itself if 1 process)."""
    if not current().enabled:
        return values
    # float64 on CPU keeps sums of many per-batch metric totals exact enough; NCCL needs the GPU.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    out = values.detach().to(device=device, dtype=torch.float64).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.cpu()


def all_gather_objects(obj) -> list:
    """``[obj from rank 0, obj from rank 1, ...]`` (``[obj]`` for one process)."""
    info = current()
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model
