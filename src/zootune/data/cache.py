"""Where zootune keeps generated data and the MiniZoo, and how files are written there.

The cache directory is ``$ZOOTUNE_CACHE``, else ``$XDG_CACHE_HOME/zootune``, else
``~/.cache/zootune``. Every file is written atomically -- to a temporary file in the same directory,
then ``os.replace`` -- so an interrupted run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from zootune.atomic import atomic_write_bytes, atomic_write_json


def user_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root (``cache_dir`` if given)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("ZOOTUNE_CACHE"):
        return Path(os.environ["ZOOTUNE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "zootune"
    return Path.home() / ".cache" / "zootune"


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_manifest(path: str | os.PathLike, manifest: dict) -> None:
    """A cache manifest, keys sorted (stable diffs between builds)."""
    atomic_write_json(path, manifest, sort_keys=True)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: str | os.PathLike, table: str, version: int, fix: str) -> dict:
    """A cache folder's ``manifest.json``: ``{"format": version, table: {...}}``, empty when the file
    does not exist; an unreadable one raises :class:`zootune.errors.CheckpointError` naming the file
    and ``fix`` (what the user should do)."""
    from zootune.errors import CheckpointError

    path = Path(path)
    if not path.exists():
        return {"format": version, table: {}}
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest.get(table), dict):
            raise ValueError(f"no {table!r} table")
        return manifest
    except (ValueError, OSError, AttributeError) as err:
        raise CheckpointError(f"manifest {path} is unreadable ({err}); {fix}") from None
