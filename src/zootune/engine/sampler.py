"""Which samples each process trains on, step by step.

Why not ``torch.utils.data.DistributedSampler``: it pads the epoch with repeated samples so that
every rank gets the same count, so ``W`` processes do not see the same global batches as one process
when the dataset size is not a multiple of ``W``. Here the epoch's permutation is cut into global
batches first and each global batch into ``W`` contiguous slices, one per rank; the engine weights
each rank's loss by its slice size (see :func:`rank_loss_weight`), so ``W`` processes take exactly the
optimisation steps of one process with the same global batch.

Per-sample augmentation seeds: for a dataset that declares ``accepts_sample_seeds = True`` (e.g.
:class:`zootune.data.folder_dataset.ImageFolderDataset`) the sampler yields ``(index, sample_seed)``
keys with ``sample_seed = sample_seed(run seed, epoch, index)``; the dataset draws that sample's crop
and flip from a ``random.Random`` seeded with it. The augmentation of a run is then a function of (seed,
epoch, index) only: the same with 0 or N DataLoader workers, whatever order the workers finish in,
on any number of processes, and after ``--resume`` (no RNG state to carry).
"""

from __future__ import annotations

from typing import Iterator

import torch

from zootune.errors import ZootuneError


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A distinct, reproducible 63-bit seed per (run seed, epoch, stream); streams separate uses."""
    return (seed * 1_000_003 + epoch * 10_007 + stream * 7_919 + 0x5EED) % (2**63 - 1)


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finaliser (Steele et al., OOPSLA 2014): a bijection on 64-bit integers whose
    outputs for consecutive inputs look independent, so neighbouring (epoch, index) pairs do not give
    neighbouring generator seeds."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample ``index`` in ``epoch`` of a run seeded ``seed`` (63 bits)."""
    return _mix64(_mix64(_mix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64)) >> 1


class GlobalBatchSampler:
    """Yields this rank's index list for every global batch of one epoch (a ``batch_sampler``).

    The permutation depends only on ``(seed, epoch)``, not on the world size or on any RNG state,
    so a resumed run and a run on another number of processes see the same global batches.
    A final global batch too small to give every rank ``min_per_rank`` samples is dropped (the
    engine asks for 2 when the model has BatchNorm, which cannot normalise a single sample), and so is
    any final partial batch with ``drop_last``. With ``sample_seeds`` each item is an
    ``(index, sample_seed(seed, epoch, index))`` key instead of an index (module docstring).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_batches: int | None = None,
        min_per_rank: int = 1,
        drop_last: bool = False,
        sample_seeds: bool = False,
    ):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.max_batches = max_batches
        self.min_per_rank = min_per_rank
        self.drop_last = drop_last
        self.sample_seeds = sample_seeds
        self.epoch = 0
        if batch_size < world_size * min_per_rank:
            raise ZootuneError(
                f"batch_size {batch_size} is the global batch; it must give each of the {world_size} "
                f"process(es) at least {min_per_rank} sample(s)"
                + (" (BatchNorm cannot train on a single sample)" if min_per_rank > 1 else "")
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[torch.Tensor]:
        """All processes' indices, one tensor per global batch (for the loss weights and tests)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        batches = list(order.split(self.batch_size))
        if batches and self._drops(len(batches[-1])):
            batches.pop()
        if self.max_batches is not None:
            batches = batches[: self.max_batches]
        return batches

    def __iter__(self) -> Iterator[list]:
        for batch in self.global_batches():
            indices = batch.tensor_split(self.world_size)[self.rank].tolist()
            if self.sample_seeds:
                yield [(i, sample_seed(self.seed, self.epoch, i)) for i in indices]
            else:
                yield indices

    def _drops(self, last_size: int) -> bool:
        partial = last_size < self.batch_size
        return (self.drop_last and partial) or last_size < self.world_size * self.min_per_rank

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        n = full + (1 if rest and not self._drops(rest) else 0)
        return n if self.max_batches is None else min(n, self.max_batches)


def rank_loss_weight(local_count: int, global_count: int, world_size: int) -> float:
    """Factor on a rank's mean loss so that DDP's gradient average is the global-batch mean.

    DDP averages gradients over ranks: ``(1/W) sum_r grad(w_r L_r)``; the global-batch mean loss is
    ``sum_r (n_r / N) L_r``, so ``w_r = n_r W / N`` (1 when the slices are equal).
    """
    return local_count * world_size / global_count
