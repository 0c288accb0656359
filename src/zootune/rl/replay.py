"""A fixed-capacity experience replay buffer in NumPy (Lin, 1992; Mnih et al., 2015).

Transitions (s, a, r, s', done) are written into preallocated arrays at ``position``, which wraps to
0 at ``capacity`` so the oldest transition is overwritten first; the n transitions of one step of a
vectorised run (one per environment) are n consecutive rows. Sampling draws indices uniformly with
replacement from the ``len(buffer)`` stored transitions only: before the buffer is full the unwritten
slots (zeros) can never be drawn. Observations are stored as uint8 (MinAtar's are boolean)
to keep a 100k buffer at ~200 MB.
"""

from __future__ import annotations

import numpy as np
import torch

from zootune.errors import ZootuneError


class ReplayBuffer:
    def __init__(self, capacity: int, observation_shape: tuple[int, ...]):
        if capacity < 1:
            raise ZootuneError(f"replay capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.observations = np.zeros((self.capacity, *observation_shape), dtype=np.uint8)
        self.next_observations = np.zeros((self.capacity, *observation_shape), dtype=np.uint8)
        self.actions = np.zeros(self.capacity, dtype=np.int64)
        self.rewards = np.zeros(self.capacity, dtype=np.float32)
        self.dones = np.zeros(self.capacity, dtype=np.float32)
        self.position = 0
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, observations: np.ndarray, actions, rewards, next_observations: np.ndarray, dones) -> None:
        """Store n transitions: ``observations``/``next_observations`` (n, *observation_shape), the
        others (n,). More than ``capacity`` at once keeps the last ``capacity``."""
        keep = slice(max(0, len(observations) - self.capacity), None)
        columns = [np.asarray(column)[keep] for column in (observations, actions, rewards, next_observations, dones)]
        n = len(columns[0])
        rows = (self.position + np.arange(n)) % self.capacity
        for store, column in zip((self.observations, self.actions, self.rewards, self.next_observations, self.dones),
                                 columns):
            store[rows] = column
        self.position = int((self.position + n) % self.capacity)
        self.size = min(self.size + n, self.capacity)

    def sample_indices(self, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        if self.size == 0:
            raise ZootuneError("cannot sample from an empty replay buffer")
        return rng.integers(0, self.size, size=batch_size)

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """A batch as tensors: ``obs``/``next_obs`` float (B, C, H, W), ``action`` long, ``reward``, ``done``."""
        idx = self.sample_indices(batch_size, rng)
        return {
            "obs": torch.from_numpy(self.observations[idx]).float(),
            "action": torch.from_numpy(self.actions[idx]),
            "reward": torch.from_numpy(self.rewards[idx]),
            "next_obs": torch.from_numpy(self.next_observations[idx]).float(),
            "done": torch.from_numpy(self.dones[idx]),
        }
