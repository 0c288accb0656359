"""An output folder that is never silently overwritten, written by one process at a time.

``zootune fit --out DIR`` (and ``run``/``export``) write into a folder that may already hold a run.
:class:`RunFolder` makes that safe:

- checked first, before any work: ``DIR`` must not be a file and must be writable;
- a lock (``DIR/.zootune.lock``, an ``flock`` held while the process lives, so a crashed process
  leaves no stale lock behind) stops a second process writing the same folder;
- a folder that holds another run (a finished model or a training checkpoint) is refused unless the
  caller resumes it (``resume=True``) or replaces it (``overwrite=True``);
- results that belong together (the model, its config and its metrics) are written into a hidden
  temporary folder and renamed into place in one step (:meth:`RunFolder.commit`), so a reader sees
  the old set or the new set, never a mix;
- temporary files and folders left by a crashed write (``.NAME.*.tmp``, ``.NAME.tmp-*``) are removed
  when the folder is opened (the lock guarantees nobody else is writing them).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

from zootune.atomic import fsync_folder
from zootune.errors import ZootuneError

LOCK_NAME = ".zootune.lock"
# The training checkpoints of a `zootune fit` run (its own, and those of the methods it requires).
TRAINING_CHECKPOINTS = ("train/checkpoint.pt", "requires/*/checkpoint.pt")
# What a run leaves in its folder that marks it as holding a run: its results, or a training
# checkpoint (logs of a run that failed before its first checkpoint do not count: nothing to lose).
RUN_ENTRIES = ("model", *TRAINING_CHECKPOINTS, "metrics.json", "results.json")


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def refuse_overlap(out: str | os.PathLike, inputs: Sequence[tuple[str, str | os.PathLike]], *,
                   files: Sequence[tuple[str, str | os.PathLike]] = ()) -> None:
    """Refuse an output folder that would write over what the command reads, ``--overwrite`` or not.

    ``inputs`` are ``(what, folder)`` pairs (a run to export, an image folder): ``out`` may be neither
    equal to one, nor inside one, nor contain one. ``files`` are ``(what, file)`` pairs (a zoo
    checkpoint): ``out`` may not be the file's own folder or contain the file -- a run folder beside
    the checkpoints, in a sub-folder of theirs, is fine. Symbolic links are resolved first.
    """
    target = _resolved(out)

    def refuse(what: str, path: Path, how: str) -> None:
        raise ZootuneError(f"--out {out} {how} {what} {path}: a command never writes over what it reads; "
                           "choose another --out")

    for what, folder in inputs:
        folder = _resolved(folder)
        if target == folder:
            refuse(what, folder, "is")
        if folder in target.parents:
            refuse(what, folder, "is inside")
        if target in folder.parents:
            refuse(what, folder, "contains")
    for what, file in files:
        file = _resolved(file)
        if target == file.parent:
            refuse(what, file, "is the folder of")
        if target in file.parents:
            refuse(what, file, "contains")


def _is_stale_temporary(name: str) -> bool:
    return name.startswith(".") and (name.endswith(".tmp") or ".tmp-" in name)


def check_writable_folder(path: str | os.PathLike, what: str = "--out") -> Path:
    """``path`` as a folder that exists (created if missing) and can be written; ZootuneError if not."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ZootuneError(f"{what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".zootune-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ZootuneError(f"{what} {path} cannot be written ({err.strerror or err})") from None
    return path


class RunFolder:
    """See the module docstring. Use as a context manager::

        with RunFolder(out, resume=args.resume, overwrite=args.overwrite) as folder:
            ...train (checkpoints go into folder.path / "train")...
            folder.commit("model", lambda tmp: write_model_and_metrics(tmp))

    ``writer=False`` (the non-zero ranks under torchrun) opens nothing and commits nothing: only
    one process writes.
    """

    def __init__(self, path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
                 writer: bool = True, entries: Sequence[str] = RUN_ENTRIES):
        if resume and overwrite:
            raise ZootuneError("--resume continues the run in --out and --overwrite replaces it: give one of them")
        self.path = Path(path).expanduser()
        self.resume = resume
        self.overwrite = overwrite
        self.writer = writer
        self.entries = tuple(entries)
        self._lock = None

    # ------------------------------------------------------------------ opening
    def __enter__(self) -> "RunFolder":
        if self.writer:
            self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        check_writable_folder(self.path)
        self._acquire_lock()
        try:
            self.remove_stale_temporaries()
            held = self.held_entries()
            if held and not (self.resume or self.overwrite):
                raise ZootuneError(
                    f"{self.path} holds another run ({', '.join(held)}): --resume continues it, --overwrite "
                    "replaces it, or choose another --out")
            if held and self.overwrite:
                for name in held:
                    # the whole top-level entry: a checkpoint's folder goes with its logs
                    target = self.path / Path(name).parts[0]
                    if target.is_dir():
                        shutil.rmtree(target)
                    elif target.exists():
                        target.unlink()
        except BaseException:
            self.close()
            raise

    def _acquire_lock(self) -> None:
        handle = open(self.path / LOCK_NAME, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise ZootuneError(f"another zootune process (pid {owner}) is writing to {self.path}; "
                               "wait for it or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock = handle

    def close(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def held_entries(self) -> list[str]:
        """The run entries present in the folder (glob patterns relative to it)."""
        return sorted({str(p.relative_to(self.path)) for pattern in self.entries for p in self.path.glob(pattern)})

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete temporary files and folders of interrupted atomic writes, anywhere in the folder."""
        removed = []
        for root, dirs, files in os.walk(self.path):
            for name in list(dirs):
                if _is_stale_temporary(name):
                    shutil.rmtree(Path(root) / name, ignore_errors=True)
                    dirs.remove(name)
                    removed.append(Path(root) / name)
            for name in files:
                if _is_stale_temporary(name):
                    (Path(root) / name).unlink(missing_ok=True)
                    removed.append(Path(root) / name)
        return removed

    # ------------------------------------------------------------------ writing
    def commit(self, name: str, write: Callable[[Path], None]) -> Path:
        """Write the folder ``path / name`` as one unit (:func:`commit_folder`); nothing when not the writer."""
        return commit_folder(self.path / name, write) if self.writer else self.path / name


def commit_folder(final: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a folder as one unit: ``write(tmp)`` fills a hidden temporary sibling, which then takes
    the place of ``final`` (a previous ``final`` is moved aside first and removed after the swap), so
    a reader never sees a mix of old and new files."""
    final = Path(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old.tmp-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_folder(final.parent)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


__all__ = ["RunFolder", "check_writable_folder", "commit_folder", "refuse_overlap", "LOCK_NAME", "RUN_ENTRIES",
           "TRAINING_CHECKPOINTS"]
