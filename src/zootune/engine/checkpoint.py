"""Training checkpoints: atomic writes, safe loads and the random-number state of a process.

A checkpoint is a dict of tensors, containers and numbers only, so it loads with
``torch.load(..., weights_only=True)`` (no pickled code runs when a file is read). It holds the
model, the optimizer, the schedule's step, the epoch, the best state so far, the history, the config
and every process's RNG state, which is what makes a resumed run equal an uninterrupted one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zootune.atomic import atomic_write
from zootune.errors import CheckpointError

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` that never leaves a partial file under ``path`` (:func:`zootune.atomic.atomic_write`)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` on CPU, with missing/corrupt files as :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, ...: all mean "not a usable checkpoint"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line}") from None


def capture_rng_state() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), Python and NumPy generator states as tensors and lists."""
    version, mt_state, gauss_next = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt_state), gauss_next],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, mt_state, gauss_next = state["python"]
    random.setstate((version, tuple(mt_state), gauss_next))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and all GPUs), Python's ``random`` and NumPy's global generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint written by the engine, checked for the keys the engine needs."""
    ckpt = safe_torch_load(path)
    required = ("format_version", "model", "optimizer", "epoch", "step", "history", "config", "rng")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in required):
        raise CheckpointError(
            f"{path} is not a zootune training checkpoint (expected keys {', '.join(required)})"
        )
    if ckpt["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer zootune (format {ckpt['format_version']}); upgrade zootune"
        )
    return ckpt
