"""Report files (results.json, results.md) written atomically, with JSON that every reader accepts.

The atomic write itself is the shared one of :mod:`zootune.data.cache` (temporary file in the same
folder, then ``os.replace``): a reader never sees a half-written results file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from zootune.data.cache import atomic_write_bytes


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    atomic_write_bytes(path, text.encode("utf-8"))
    return Path(path)


def json_safe(value):
    """``value`` with NaN/inf floats as None (JSON has no NaN), tuples as lists and paths as str."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def atomic_write_json(path: str | os.PathLike, data) -> Path:
    return atomic_write_text(path, json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")
