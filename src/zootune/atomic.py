"""The one atomic writer: every file zootune writes goes through :func:`atomic_write`.

The content goes to a temporary file in the target's folder (``.NAME.<random>.tmp``: hidden, and
removed by :class:`zootune.run_folder.RunFolder` if a crash leaves it), is flushed to disk, and is
renamed over the target with ``os.replace`` -- atomic on POSIX, so a reader (or a run resumed after
``kill -9``) sees the old file or the new one, never half of one -- and the folder is flushed too
(:func:`fsync_folder`), so the rename itself survives a power loss.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp_path)`` fills a temporary file beside ``path``, which then replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def fsync_folder(folder: str | os.PathLike) -> None:
    """Flush a folder's entries to disk: a rename is durable only once its folder is (POSIX), so
    without this a power loss after "model written" could bring back the old name."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a platform or file system without folder handles: nothing to flush
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(value: Any) -> Any:
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


def atomic_write_json(path: str | os.PathLike, data: Any, *, sort_keys: bool = False) -> Path:
    """JSON that every reader accepts (:func:`json_safe`), indented, written atomically."""
    return atomic_write_text(path, json.dumps(json_safe(data), indent=2, allow_nan=False, sort_keys=sort_keys) + "\n")


__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "json_safe"]
