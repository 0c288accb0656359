"""This machine's timed formulation choices, kept in the user cache so that reruns reuse them.

Choosing an aggregation layer's formulation by timing (:func:`zootune.layers.autotune.tune`) can pick
another formulation on another run -- the machine's load decides close races -- and each formulation
sums in another order, so two runs of the same command would train slightly different models. Like
cuDNN's and Triton's autotuning caches, the first run on a machine times each (layer, input shape,
phase) once and writes the winner to ``<cache>/formulations/<machine>.json``; every later run on the
same machine reads it and times nothing for it. ``<machine>`` is a hash of what the speed depends on
and a user cannot see changing: the torch version, the processor, the CPU count and the intra-op
thread count (a GPU's name is part of each layer's key). The file is read, extended and written under
an ``flock``, so processes started together agree on one choice; a corrupt file is replaced.
``<cache>`` is the user cache folder the engine gives a module preparing for training
(:class:`zootune.engine.hooks.PreparationContext`'s ``cache_dir``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import warnings
from pathlib import Path
from typing import Iterator

import torch

from zootune.atomic import atomic_write_json


def _processor_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_fingerprint() -> str:
    """A short hash of what timed choices depend on, apart from each layer's own key."""
    parts = (torch.__version__, platform.machine(), _processor_name(), os.cpu_count(), torch.get_num_threads())
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def choices_path(cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / "formulations" / f"{machine_fingerprint()}.json"


def _read(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = None
    if not isinstance(stored, dict) or not all(isinstance(v, str) for v in stored.values()):
        warnings.warn(f"the formulation cache {path} is unreadable; it is measured again and replaced")
        return {}
    return stored


@contextlib.contextmanager
def machine_choices(cache_dir: str | os.PathLike) -> Iterator[dict[str, str]]:
    """``{choice key: formulation}`` of this machine, locked while the caller reads and extends it
    (:func:`zootune.layers.autotune.tune`'s ``known``); written back if it grew."""
    path = choices_path(cache_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a+")
    except OSError as err:
        warnings.warn(f"the formulation cache {path.parent} cannot be written ({err.strerror or err}): "
                      "formulations are timed afresh, so reruns may differ in the last bits")
        yield {}
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            choices = _read(path)
            before = dict(choices)
            yield choices
            if choices != before:
                atomic_write_json(path, choices, sort_keys=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


__all__ = ["choices_path", "machine_choices", "machine_fingerprint"]
