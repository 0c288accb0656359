"""Building, caching, checking and loading the MiniZoo.

Layout under ``<cache>/minizoo`` (``<cache>`` from :func:`zootune.data.cache.user_cache_dir`)::

    manifest.json               # one row per built member: sha256, seed, version, pretraining summary
    <member>.safetensors        # backbone state_dict (torchvision-layout keys, BN buffers included;
                                # no pretext head and no ``fc``)

Files are written atomically. On load every file's sha256 is checked against the manifest; a missing
or mismatched member is rebuilt (``build_if_missing=True``) or reported as a CheckpointError.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from zootune.atomic import atomic_write_bytes
from zootune.data.cache import atomic_write_manifest, read_manifest, sha256_file, user_cache_dir
from zootune.errors import CheckpointError
from zootune.minizoo.members import MEMBERS, MemberSpec
from zootune.minizoo.pretrain import get_member, pretrain
from zootune.models import resnet_small
from zootune.version import __version__

MANIFEST_FORMAT = 1
# The member architecture: a ResNet-10 of stage widths 8/16/32/64 for 32x32 inputs (78k parameters).
# Chosen by measurement: a training step costs ~2.5x less than width 16, which keeps the full
# method x target x seed comparison within its CPU budget (see docs/data-and-minizoo.md).
ARCH = {"builder": "resnet_small", "depth": 10, "width": 8}
ARCH_NAME = "minizoo_resnet10_w8"  # registered (with its option table) in zootune.models


def minizoo_resnet(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """A MiniZoo member's architecture (``resnet_small(depth=10, width=8)``)."""
    return resnet_small(num_classes, depth=ARCH["depth"], width=ARCH["width"], in_chans=in_chans)


def minizoo_arch():
    """The builder of the member architecture: ``builder(num_classes=10) -> nn.Module``."""
    return minizoo_resnet


def minizoo_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return user_cache_dir(cache_dir) / "minizoo"


def _read_manifest(folder: Path) -> dict:
    return read_manifest(folder / "manifest.json", "members", MANIFEST_FORMAT,
                         "delete it and run `zootune zoo build --force`")


def _selected(members: Sequence[str] | None) -> list[MemberSpec]:
    return list(MEMBERS) if members is None else [get_member(m) for m in members]


def _member_status(folder: Path, row: dict | None) -> tuple[bool, bool]:
    """(built, checksum_ok) of a member given its manifest row."""
    if row is None:
        return False, False
    path = folder / row["file"]
    if not path.exists():
        return False, False
    return True, sha256_file(path) == row.get("sha256")


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything but the classification head ``fc``: the member is the backbone only."""
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}


def _pretrain_member(folder: Path, spec: MemberSpec, base_row: dict | None, seed: int, progress: bool) -> dict:
    """Pretrain ``spec`` (from the weights of its base's ``base_row``, if it has one), write its file
    to ``folder``; returns its manifest row."""
    base_sha = base_row["sha256"] if base_row else None
    if base_row is None:
        initial = minizoo_resnet
    else:
        initial = minizoo_resnet()
        initial.load_state_dict(load_member(folder / base_row["file"], base_sha).state_dict(), strict=False)
    model, summary = pretrain(initial, spec, seed=seed, progress=progress)
    file = f"{spec.name}.safetensors"
    # one metadata entry: safetensors writes several in arbitrary order, and a rebuild with the same
    # seed must give the same bytes (and so the same sha256)
    metadata = {"zootune": json.dumps({"member": spec.name, "zootune_version": __version__}, sort_keys=True)}
    atomic_write_bytes(folder / file, save_safetensors_bytes(backbone_state_dict(model), metadata=metadata))
    return {
        "name": spec.name,
        "description": spec.description,
        "file": file,
        "sha256": sha256_file(folder / file),
        "size_bytes": (folder / file).stat().st_size,
        "arch": ARCH,
        "init_from": spec.init_from,
        "init_from_sha256": base_sha,
        "zootune_version": __version__,
        "torch_version": torch.__version__,
        **summary,
    }


def build_minizoo(
    cache_dir: str | os.PathLike | None = None,
    members: Sequence[str] | None = None,
    force: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Pretrain (or reuse) the MiniZoo members and return their manifest rows.

    A member is reused when its file exists, its sha256 matches the manifest and it was built with
    this ``seed``; otherwise (or with ``force``) it is pretrained and written, and the manifest is
    updated after each member, so an interrupted build keeps what it finished.
    """
    folder = minizoo_dir(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(folder)
    rows = []
    for spec in _selected(members):
        row = manifest["members"].get(spec.name)
        built, ok = _member_status(folder, row)
        base_row = None
        if spec.init_from is not None:
            # the base is built (or reused) first; a rebuilt base invalidates members started from it
            (base_row,) = build_minizoo(cache_dir, members=[spec.init_from], seed=seed, progress=progress)
            manifest = _read_manifest(folder)
        base_sha = base_row["sha256"] if base_row else None
        if (
            not force and built and ok and row.get("seed") == seed and row.get("arch") == ARCH
            and row.get("init_from_sha256") == base_sha
        ):
            rows.append(row)
            continue
        row = _pretrain_member(folder, spec, base_row, seed, progress)
        manifest["members"][spec.name] = row
        manifest["format"] = MANIFEST_FORMAT
        atomic_write_manifest(folder / "manifest.json", manifest)
        rows.append(row)
        if progress:
            print(
                f"built {spec.name}: {row['metric_name']}={row['metric']:.1f} "
                f"in {row['seconds']:.0f}s", flush=True,
            )
    return rows


def load_member(path: str | os.PathLike, expected_sha256: str | None = None) -> nn.Module:
    """A member file as a model of the MiniZoo architecture (``fc`` left at a fixed fresh init)."""
    path = Path(path)
    data = path.read_bytes()
    if expected_sha256 is not None:
        if hashlib.sha256(data).hexdigest() != expected_sha256:
            raise CheckpointError(f"MiniZoo member {path} does not match its manifest checksum")
    try:
        state = load_safetensors_bytes(data)
    except (SafetensorError, ValueError, OSError) as err:
        raise CheckpointError(f"MiniZoo member {path} is not a readable safetensors file ({err})") from None
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the unused head is the same on every load
        model = minizoo_resnet()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("fc.") for k in missing):
        raise CheckpointError(
            f"MiniZoo member {path} does not fit the MiniZoo architecture "
            f"(missing {[k for k in missing if not k.startswith('fc.')][:5]}, unexpected {unexpected[:5]}); "
            "rebuild it with `zootune zoo build --force`"
        )
    return model.eval()


def load_minizoo(
    cache_dir: str | os.PathLike | None = None,
    build_if_missing: bool = True,
    members: Sequence[str] | None = None,
):
    """The MiniZoo as a :class:`zootune.Zoo` (members in :data:`MEMBERS` order).

    Missing or corrupt members are rebuilt with the manifest's seed (default 0) when
    ``build_if_missing``, else a :class:`CheckpointError` says which and how to fix it.
    """
    folder = minizoo_dir(cache_dir)
    specs = _selected(members)
    manifest = _read_manifest(folder) if folder.exists() else {"members": {}}
    bad = []
    for spec in specs:
        built, ok = _member_status(folder, manifest["members"].get(spec.name))
        if not (built and ok):
            bad.append((spec.name, "missing" if not built else "corrupt (checksum mismatch)"))
    if bad:
        if not build_if_missing:
            details = ", ".join(f"{name} {why}" for name, why in bad)
            raise CheckpointError(f"MiniZoo in {folder}: {details}; run `zootune zoo build`")
        seeds = {row.get("seed", 0) for row in manifest["members"].values()}
        seed = seeds.pop() if len(seeds) == 1 else 0
        build_minizoo(cache_dir, members=[name for name, _ in bad], force=True, seed=seed, progress=True)
        manifest = _read_manifest(folder)
    from zootune.zoo import Zoo

    rows = [manifest["members"][spec.name] for spec in specs]
    # checksums were verified above; Zoo.from_checkpoints reads safetensors without unpickling and
    # gives every member a fresh head (the files hold none)
    return Zoo.from_checkpoints(
        [folder / row["file"] for row in rows], arch=minizoo_resnet, names=[spec.name for spec in specs]
    )


def list_minizoo(cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """One row per member: name, description, task, data, algorithm, built, checksum_ok, size_bytes,
    metric_name, metric, seconds (the last three from the manifest when built)."""
    folder = minizoo_dir(cache_dir)
    manifest = _read_manifest(folder) if folder.exists() else {"members": {}}
    rows = []
    for spec in MEMBERS:
        row = manifest["members"].get(spec.name)
        built, ok = _member_status(folder, row)
        rows.append({
            "name": spec.name,
            "description": spec.description,
            "task": spec.task,
            "data": spec.data,
            "algorithm": spec.algorithm,
            "built": built,
            "checksum_ok": ok,
            "size_bytes": (folder / row["file"]).stat().st_size if built else 0,
            "metric_name": row.get("metric_name") if row else None,
            "metric": row.get("metric") if row else None,
            "seconds": row.get("seconds") if row else None,
        })
    return rows
