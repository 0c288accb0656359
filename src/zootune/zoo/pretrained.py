"""Zoo members by name, loaded through the libraries' own pretrained machinery and caches.

Names (the library's own spelling after the prefix)::

    timm:ARCH[.TAG]              timm.create_model("ARCH.TAG", pretrained=True)
    torchvision:ARCH[.WEIGHTS]   torchvision.models.get_model("ARCH", weights=WEIGHTS)   (default: DEFAULT)
    hf-hub:ORG/NAME              timm.create_model("hf-hub:ORG/NAME", pretrained=True)

``NAME=PATH`` reads that member's weights from a local file instead of the library's cache or a
download, keeping the name's pretrained configuration (its preprocessing, its architecture
arguments): timm gets ``pretrained_cfg_overlay=dict(file=PATH)``; torchvision finds the file (read
safely, converted if it is ``.safetensors``) in a temporary cache under the name it expects.

Downloads and caches are the libraries' (the Hugging Face hub cache, ``$TORCH_HOME/hub/checkpoints``).
Offline (``ZOOTUNE_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``, or ``offline=True``) a member that is not
cached is refused before anything is tried, in one line naming the member and how to fetch it; a
download that fails online gives the same line with the library's reason.

Every ``torch.load`` the libraries make while loading runs with ``weights_only=True`` forced
(``TORCH_FORCE_WEIGHTS_ONLY_LOAD``): torchvision asks for a full unpickle of its cached files, and a
file that would run code is refused instead.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import torch
from torch import nn

from zootune.errors import CheckpointError, ZootuneError
from zootune.zoo.preprocessing import DataConfig, from_timm, from_torchvision

SCHEMES = ("timm", "torchvision", "hf-hub")
OFFLINE_ENV = ("ZOOTUNE_OFFLINE", "HF_HUB_OFFLINE")
_TRUE = ("1", "true", "yes", "on")
# Weight files timm looks for in a Hugging Face repo, in its order.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                   "open_clip_pytorch_model.bin")


def import_library(library: str, what: str):
    try:
        return importlib.import_module(library)
    except ImportError as err:
        raise ZootuneError(f"{what} needs {library}, which is not installed here ({err}); "
                           f"`pip install {library}`") from None


class NotCachedError(ZootuneError):
    """A member by name is neither in the library's cache nor downloadable here."""


@dataclass(frozen=True)
class PretrainedName:
    """A parsed member name: ``text`` as given (without ``=PATH``), the ``library`` that loads it,
    the ``model_name`` given to that library, torchvision's ``weights`` member, a local ``file``."""

    text: str
    library: str
    model_name: str
    weights: str | None = None
    file: str | None = None

    @property
    def architecture(self) -> str:
        """The architecture name without the pretrained tag (``resnet50`` of ``resnet50.a1_in1k``)."""
        return self.model_name if self.model_name.startswith("hf-hub:") else self.model_name.partition(".")[0]


def is_pretrained_name(text: str) -> bool:
    """Whether ``text`` names a member (``timm:``, ``torchvision:``, ``hf-hub:``), not a file."""
    scheme, sep, rest = str(text).partition(":")
    return bool(sep) and scheme in SCHEMES and bool(rest) and not Path(str(text)).exists()


def parse_pretrained_name(text: str) -> PretrainedName:
    name, sep, path = str(text).partition("=")
    file = path if sep else None
    if sep and not path:
        raise ZootuneError(f"zoo member {text!r}: give a file after '=' (NAME=PATH)")
    scheme, _, rest = name.partition(":")
    if scheme not in SCHEMES or not rest:
        raise ZootuneError(f"{text!r} is not a pretrained name: use timm:ARCH[.TAG], torchvision:ARCH[.WEIGHTS] "
                           "or hf-hub:ORG/NAME")
    if scheme == "hf-hub":
        if "/" not in rest:
            raise ZootuneError(f"zoo member {text!r}: a Hugging Face hub name is hf-hub:ORG/NAME")
        return PretrainedName(name, "timm", name, file=file)
    if scheme == "torchvision":
        arch, _, weights = rest.partition(".")
        return PretrainedName(name, "torchvision", arch, weights=weights or "DEFAULT", file=file)
    return PretrainedName(name, "timm", rest, file=file)


def offline_mode(offline: bool | None = None) -> bool:
    if offline is not None:
        return bool(offline)
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in OFFLINE_ENV)


@dataclass
class PretrainedMember:
    """A loaded member: the model, the ``build_model`` name of its architecture, its preprocessing,
    and where its weights were read from."""

    name: str
    model: nn.Module
    architecture: str
    data_config: DataConfig | None
    origin: str
    arch_kwargs: dict = field(default_factory=dict)


class PretrainedModels(Sequence):
    """Models loaded by name, of any architectures: a sequence of ``nn.Module`` with ``names``
    (so ``zootune.Hub(load_pretrained([...]))`` takes it as it is), ``data_configs`` and ``origins``."""

    def __init__(self, members: list[PretrainedMember]):
        self.loaded = list(members)

    def __len__(self) -> int:
        return len(self.loaded)

    def __getitem__(self, index):
        return self.loaded[index].model

    def __iter__(self) -> Iterator[nn.Module]:
        return (member.model for member in self.loaded)

    @property
    def names(self) -> list[str]:
        return [member.name for member in self.loaded]

    @property
    def data_configs(self) -> list[DataConfig | None]:
        return [member.data_config for member in self.loaded]

    @property
    def origins(self) -> list[str]:
        return [member.origin for member in self.loaded]


def load_pretrained(names: Sequence[str], *, offline: bool | None = None) -> PretrainedModels:
    """Load each named member through its library (see the module docstring); mixed architectures
    are fine here (a :class:`zootune.Zoo` checks that they share one)."""
    names = [str(n) for n in names]
    if not names:
        raise ZootuneError("give at least one pretrained name")
    parsed = [parse_pretrained_name(n) for n in names]
    repeated = sorted({p.text for p in parsed if [q.text for q in parsed].count(p.text) > 1})
    if repeated:
        raise ZootuneError(f"zoo member names must be unique; repeated: {', '.join(repeated)}")
    offline = offline_mode(offline)
    return PretrainedModels([load_member(p, offline=offline) for p in parsed])


def load_member(name: PretrainedName, *, offline: bool = False) -> PretrainedMember:
    if name.file is not None and not Path(name.file).is_file():
        raise CheckpointError(f"zoo member {name.text!r}: weights file {name.file} does not exist")
    try:
        with _weights_only_loads():
            if name.library == "torchvision":
                return _load_torchvision(name, offline)
            return _load_timm(name, offline)
    except ZootuneError:
        raise
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"refusing to load zoo member {name.text!r}: its file is a pickle that holds more "
                              f"than weights, and unpickling it could run code ({_first_line(err)})") from None
    except Exception as err:  # the library's own failure (network, corrupt file): one line with its reason
        raise NotCachedError(
            f"cannot load zoo member {name.text!r}: {type(err).__name__}: {_first_line(err)}; "
            f"{_fetch_hint(name)}") from None


# ---------------------------------------------------------------------------------------------- timm

def _load_timm(name: PretrainedName, offline: bool) -> PretrainedMember:
    timm = import_library("timm", f"zoo member {name.text!r}")
    overlay = None
    if name.file is not None:
        # timm reads .pth/.safetensors itself (weights_only); its custom loaders expect .npz files
        overlay = {"file": str(name.file)}
        if not str(name.file).endswith(".npz"):
            overlay["custom_load"] = False
        origin = str(name.file)
    else:
        origin = _timm_cached(timm, name)
        if origin is None and offline:
            raise NotCachedError(f"zoo member {name.text!r} is not in the local cache and downloads are off "
                                 f"(offline); {_fetch_hint(name)}")
    model = timm.create_model(name.model_name, pretrained=True, pretrained_cfg_overlay=overlay)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    architecture = f"timm:{cfg.get('architecture') or name.architecture}"
    return PretrainedMember(name.text, model, architecture, from_timm(model), origin or name.text,
                            {"num_classes": getattr(model, "num_classes", None)} if getattr(model, "num_classes", 0) else {})


def _timm_cached(timm, name: PretrainedName) -> str | None:
    """Path of the cached weights (or config) timm would load for ``name``, None if not cached."""
    if name.model_name.startswith("hf-hub:"):
        repo = name.model_name[len("hf-hub:"):].partition("@")[0]
        if _hf_cached(repo, ("config.json",)) is None:
            return None
        return _hf_cached(repo, HF_WEIGHT_FILES)
    if not timm.is_model(name.architecture):
        raise ZootuneError(f"zoo member {name.text!r}: timm has no architecture {name.architecture!r} "
                           "(see timm.list_models())")
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name.model_name)
    except RuntimeError:  # an unknown tag
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        tags = ", ".join(timm.list_pretrained(f"{name.architecture}.*")) or "none"
        raise ZootuneError(f"zoo member {name.text!r}: timm has no pretrained weights {name.model_name!r} "
                           f"(available: {tags})")
    if cfg.file:
        return cfg.file if Path(cfg.file).is_file() else None
    if cfg.hf_hub_id:
        found = _hf_cached(cfg.hf_hub_id, (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_WEIGHT_FILES)
        if found is not None:
            return found
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        return str(path) if path.is_file() else None
    return None


def _hf_cached(repo: str, filenames: Sequence[str]) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in filenames:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return found
    return None


# --------------------------------------------------------------------------------------- torchvision

def _load_torchvision(name: PretrainedName, offline: bool) -> PretrainedMember:
    import_library("torchvision", f"zoo member {name.text!r}")
    from torchvision import models

    if name.model_name not in models.list_models():
        raise ZootuneError(f"zoo member {name.text!r}: torchvision has no architecture {name.model_name!r} "
                           "(see torchvision.models.list_models())")
    choices = models.get_model_weights(name.model_name)
    try:
        weights = choices[name.weights]
    except KeyError:
        raise ZootuneError(f"zoo member {name.text!r}: torchvision has no weights {name.weights!r} for "
                           f"{name.model_name} (available: {', '.join(['DEFAULT', *choices.__members__])})") from None
    file_name = os.path.basename(urlparse(weights.url).path)
    if name.file is not None:
        with tempfile.TemporaryDirectory(prefix="zootune-tv-") as hub_dir, _torch_hub_dir(hub_dir):
            _place_weights(Path(name.file), Path(hub_dir) / "checkpoints" / file_name)
            model = models.get_model(name.model_name, weights=weights)
        origin = str(name.file)
    else:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
        if not cached.is_file() and offline:
            raise NotCachedError(f"zoo member {name.text!r} is not in the local cache ({cached} is missing) and "
                                 f"downloads are off (offline); {_fetch_hint(name)}")
        model = models.get_model(name.model_name, weights=weights)
        origin = str(cached)
    return PretrainedMember(name.text, model, f"torchvision:{name.model_name}", from_torchvision(weights), origin,
                            {"num_classes": len(weights.meta["categories"])} if "categories" in weights.meta else {})


def _place_weights(file: Path, target: Path) -> None:
    """The user's file, read safely (containers unwrapped, .safetensors converted), saved where
    torchvision looks for its cached download."""
    from zootune.zoo.checkpoint import load_state_dict_file

    state = load_state_dict_file(file)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)


@contextlib.contextmanager
def _torch_hub_dir(path: str):
    # torch.hub.set_dir has no public reset: restore the previous setting itself, so that an unset
    # hub dir keeps following $TORCH_HOME afterwards.
    previous = getattr(torch.hub, "_hub_dir", None)
    torch.hub.set_dir(path)
    try:
        yield
    finally:
        torch.hub._hub_dir = previous


# ------------------------------------------------------------------------------------------ helpers

@contextlib.contextmanager
def _weights_only_loads():
    """Force ``weights_only=True`` on every torch.load inside (torch reads the variable per call)."""
    saved = {var: os.environ.get(var) for var in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _fetch_hint(name: PretrainedName) -> str:
    if name.library == "torchvision":
        fetch = (f"python -c \"import torchvision; torchvision.models.get_model('{name.model_name}', "
                 f"weights='{name.weights}')\"")
        cache = f"{torch.hub.get_dir()}/checkpoints"
    else:
        fetch = f"python -c \"import timm; timm.create_model('{name.model_name}', pretrained=True)\""
        cache = "the Hugging Face hub cache ($HF_HOME/hub)"
        if not name.model_name.startswith("hf-hub:"):
            cache += f" and {torch.hub.get_dir()}/checkpoints"
    return (f"fetch it where there is network with `{fetch}` and copy {cache} here, "
            f"or give a local file: {name.text}=PATH")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(err).__name__
