"""Read and write weight files safely.

Every checkpoint is read with ``torch.load(path, map_location="cpu", weights_only=True)`` (or
``safetensors.torch.load_file``): a pickle that would import and call arbitrary Python -- the way a
malicious ``.pth`` runs code on load -- is refused, never executed. Errors name the file and say
whether it is missing, unreadable (truncated/corrupt) or unsafe.

Files are written atomically: into a temporary file in the target directory, then ``os.replace``, so
a crash or a full disk never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from zootune.atomic import atomic_write
from zootune.errors import CheckpointError

SAFETENSORS_SUFFIX = ".safetensors"

# Keys under which training scripts nest the model's weights, most specific first. MoCo and most
# ImageNet scripts use ``state_dict``; detectron-style and many repos ``model``; others the rest.
CONTAINER_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "net", "network", "module")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a weight file as a flat ``{key: tensor}`` dict, safely.

    ``.safetensors`` files are read with safetensors; anything else (``.pt``, ``.pth``, ``.pth.tar``,
    ``.bin`` ...) with ``torch.load(weights_only=True)``. Nested training checkpoints are unwrapped
    (see :func:`unwrap_state_dict`), so ``{'state_dict': {...}, 'epoch': 200, 'optimizer': ...}``
    gives the inner state dict. Key prefixes are left as they are; :mod:`zootune.zoo.remap` handles them.

    Raises:
        CheckpointError: the file is missing, truncated/corrupt, holds no tensors, or is a pickle
            that would need to run code to load.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    if path.name.endswith(SAFETENSORS_SUFFIX):
        return _load_safetensors(path)
    return unwrap_state_dict(_torch_load(path), origin=str(path))


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: truncated or not a safetensors file ({err})") from None
    if not state:
        raise CheckpointError(f"{path} holds no tensors")
    return dict(state)


def _torch_load(path: Path) -> Any:
    with open(path, "rb") as handle:
        head = handle.read(4)
    # torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (protocol byte 0x80)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        raise CheckpointError(
            f"cannot read {path}: not a PyTorch checkpoint (neither a zip archive nor a pickle"
            f"{'; the file is empty' if not head else ''}); zootune reads .pt/.pth/.pth.tar files written "
            "by torch.save and .safetensors files")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols before refusing or reading; what it decides is reported below
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Weights only load failed" in text:
            raise CheckpointError(
                f"refusing to load {path}: it is a pickle that holds more than weights "
                f"({_unsafe_reason(text)}), and unpickling it could run arbitrary code. zootune only "
                "loads checkpoints with torch.load(weights_only=True); save just the model's "
                "state_dict (or a .safetensors file) where you trust the file"
            ) from None
        raise CheckpointError(f"cannot read {path}: truncated or corrupt pickle ({err})") from None
    except Exception as err:  # noqa: BLE001 -- torch raises OSError, RuntimeError, EOFError, KeyError, struct.error... for bad files
        detail = f"{type(err).__name__}: {err}".strip().rstrip(":")
        raise CheckpointError(
            f"cannot read {path}: truncated, corrupt or not a PyTorch checkpoint ({detail})"
        ) from None


def _unsafe_reason(message: str) -> str:
    """The one informative line of torch's weights-only refusal (e.g. which global it blocked)."""
    for pattern in (r"(Trying to load unsupported GLOBAL [^\n]*)", r"(Unsupported global: [^\n]*)",
                    r"WeightsUnpickler error:\s*\n*\s*([^\n]+)"):
        match = re.search(pattern, message)
        if match:
            return match.group(1).strip().rstrip(".")
    return "objects other than tensors and plain containers"


def unwrap_state_dict(obj: Any, origin: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor dict inside a (possibly nested) training checkpoint.

    Descends into the first of :data:`CONTAINER_KEYS` whose value is a dict, repeatedly, until it
    reaches a dict that holds tensors; non-tensor entries (epoch counters, config strings) are
    dropped. ``origin`` names the file in error messages.
    """
    seen = 0
    while isinstance(obj, Mapping) and seen < 8:
        # Containers first: a training checkpoint may hold stray tensors next to the weights
        # (torchvision's ImageNet script saves ``best_acc1`` as a tensor beside ``state_dict``).
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
            break
        obj, seen = inner, seen + 1
    if isinstance(obj, Mapping):
        keys = ", ".join(map(str, list(obj)[:8])) or "none"
        raise CheckpointError(f"{origin} holds no weights: no tensors found (top-level keys: {keys})")
    raise CheckpointError(
        f"{origin} holds a {type(obj).__name__}, not a state dict of tensors; save model.state_dict() instead"
    )


def check_finite_state(state: Mapping[str, torch.Tensor], origin: str) -> None:
    """Refuse weights that hold NaN or infinity, naming ``origin`` (the file, as the reader should
    see it) and the tensor: a zoo checkpoint would fail later with a message blaming the learning
    rate, a model folder would evaluate to a NaN loss and a chance accuracy without complaint."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{origin}: tensor {key} holds {bad} non-finite value(s) (NaN or "
                                  "infinity); the file is damaged or was saved from a diverged training")


def save_state_dict(
    path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write ``state_dict`` atomically; returns the path.

    A ``.safetensors`` path gets a safetensors file whose header holds ``metadata`` (values that are
    not strings are stored as JSON). Any other suffix gets ``torch.save({'state_dict': ...,
    'metadata': ...})``, which :func:`load_state_dict_file` reads back. Tensors are copied to
    contiguous CPU memory first (safetensors refuses views and shared storage, e.g. tied weights).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    if path.name.endswith(SAFETENSORS_SUFFIX):
        from safetensors.torch import save_file

        def write(tmp: str) -> None:
            save_file(tensors, tmp, metadata=meta or None)
            _sort_safetensors_metadata(tmp)

        return atomic_write(path, write)
    return atomic_write(path, lambda tmp: torch.save({"state_dict": tensors, "metadata": meta}, tmp))


def _sort_safetensors_metadata(path: str | os.PathLike) -> None:
    """Rewrite a safetensors header with its ``__metadata__`` keys sorted, in place. The library
    writes them in a hash map's per-process order, so the same model saved twice would differ in its
    bytes (safetensors issue #584); the sorted header has the same length, so nothing else moves."""
    with open(path, "rb+") as handle:
        size = int.from_bytes(handle.read(8), "little")
        raw = handle.read(size)
        header = json.loads(raw)
        if not isinstance(header.get("__metadata__"), dict):
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        canonical = json.dumps(header, separators=(",", ":")).encode()
        if len(canonical) > size:  # another writer's spacing: leave its header as it is
            return
        handle.seek(8)
        handle.write(canonical.ljust(size, b" "))  # the format pads headers with spaces


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a ``.safetensors`` header (empty if none)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {path}: truncated or not a safetensors file ({err})") from None
