"""``Zoo``: a named, ordered set of pretrained models of one architecture.

Methods take any ``Sequence[nn.Module]`` as their zoo; :class:`Zoo` is that sequence plus what a
user needs around it: loading from checkpoint files of any common layout, names for reports, a
check that all members really share one architecture, the head's name, and a fresh instance of the
architecture for students and folded models.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, overload

import torch
from torch import nn

from zootune.errors import CheckpointError, ZooMismatchError, ZootuneError
from zootune.models import build_model
from zootune.models.heads import find_head_name
from zootune.zoo.checkpoint import load_state_dict_file
from zootune.zoo.remap import Remap, backbone_shapes, match_state_dict

CHECKPOINT_SUFFIXES = (".pth.tar", ".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar")

# Members are built with a fixed seed so their fresh heads (and anything the checkpoint does not
# cover) are the same on every run, without consuming the caller's random stream.
BUILD_SEED = 0


def checkpoint_stem(path: str | os.PathLike) -> str:
    """File name without its checkpoint suffix: ``moco_v1_200ep_pretrain.pth.tar`` -> ``moco_v1_200ep_pretrain``."""
    name = Path(path).name
    for suffix in CHECKPOINT_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _unique_names(names: list[str]) -> list[str]:
    """Default names made unique by numbering repeats (two ``checkpoint.pth`` in different folders)."""
    out = [f"{n}-{names[:i].count(n) + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]
    if len(set(out)) != len(out):  # a numbered name collided with a real one
        out = [f"{n}-{i}" for i, n in enumerate(names)]
    return out


def _reset_parameters(model: nn.Module) -> nn.Module:
    """Re-initialise every submodule that knows how (``reset_parameters``), in place."""
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    return model


class Zoo(Sequence):
    """A named, ordered sequence of pretrained ``nn.Module`` s sharing one architecture.

    ``len(zoo)``, ``zoo[i]`` (or ``zoo["name"]``), ``iter(zoo)`` give the members; ``zoo[1:3]`` is a
    smaller Zoo. Build one with :meth:`from_modules` or :meth:`from_checkpoints`.

    Attributes:
        names: one name per member (file stems, or ``member0``, ``member1``, ...).
        head_name: dotted name of the members' head (``fc`` for a ResNet), found with
            :func:`zootune.models.heads.find_head_name` unless given.
    """

    def __init__(
        self,
        members: Iterable[nn.Module],
        names: Iterable[str] | None = None,
        *,
        head_name: str | None = None,
        builder: Callable[[], nn.Module] | None = None,
        sources: Iterable[str | None] | None = None,
    ):
        self._members: tuple[nn.Module, ...] = tuple(members)
        if not self._members:
            raise ZootuneError("a zoo needs at least one model; got none")
        for i, member in enumerate(self._members):
            if not isinstance(member, nn.Module):
                raise ZootuneError(f"zoo member {i} is a {type(member).__name__}, not an nn.Module")
        if names is None:
            self._names = tuple(f"member{i}" for i in range(len(self._members)))
        else:
            self._names = tuple(str(n) for n in names)
            if len(self._names) != len(self._members):
                raise ZootuneError(f"got {len(self._names)} names for {len(self._members)} zoo members")
            repeated = sorted({n for n in self._names if self._names.count(n) > 1})
            if repeated:
                raise ZootuneError(f"zoo member names must be unique; repeated: {', '.join(repeated)}")
        self.head_name = _find_head_or_none(self._members[0], head_name)
        self._builder = builder
        self.sources: tuple[str | None, ...] = (
            tuple(sources) if sources is not None else (None,) * len(self._members)
        )
        self._check_same_architecture()

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_modules(
        cls,
        modules: Iterable[nn.Module],
        names: Iterable[str] | None = None,
        *,
        head_name: str | None = None,
        builder: Callable[[], nn.Module] | None = None,
    ) -> "Zoo":
        """A zoo of models already in memory (not copied). ``builder`` (optional) makes
        :meth:`new_model`'s fresh instances; without it they are re-initialised copies of member 0."""
        return cls(modules, names, head_name=head_name, builder=builder)

    @classmethod
    def from_checkpoints(
        cls,
        paths: Iterable[str | os.PathLike],
        arch: str | Callable[..., nn.Module] = "resnet50",
        names: Iterable[str] | None = None,
        remap: Remap | Sequence[Remap] = "auto",
        head_name: str | None = None,
        arch_kwargs: Mapping[str, Any] | None = None,
        keep_head: bool = False,
    ) -> "Zoo":
        """Load one member per weight file into a freshly built ``arch``.

        Args:
            paths: ``.pt`` / ``.pth`` / ``.pth.tar`` / ``.safetensors`` files (read safely, see
                :func:`zootune.zoo.load_state_dict_file`).
            arch: a registered architecture name (``"resnet50"``, ``"resnet18_small"``, ...) or any
                callable returning an ``nn.Module`` (a timm/torchvision/own model builder).
            names: member names; default: the file stems, numbered if repeated.
            remap: ``"auto"`` (detect the key prefix per file), a prefix string, a callable
                ``key -> key | None``, or a list with one of these per file. See
                :mod:`zootune.zoo.remap`.
            head_name: the architecture's head (default: detected); its weights are not loaded
                unless ``keep_head`` and their shapes fit, so members carry a fresh head.
            arch_kwargs: keyword arguments for the builder (e.g. ``{"num_classes": 100}``).

        Raises:
            CheckpointError: a file is missing, unreadable, unsafe, or lacks backbone weights.
        """
        paths = [Path(p) for p in paths]
        if not paths:
            raise ZootuneError("a zoo needs at least one checkpoint; got none")
        if names is not None:
            names = [str(n) for n in names]
            if len(names) != len(paths):  # say so before spending time on loading
                raise ZootuneError(f"got {len(names)} names for {len(paths)} checkpoints")
        kwargs = dict(arch_kwargs or {})
        # partials, not lambdas: a Zoo stays picklable (e.g. handed to spawned DDP workers)
        if isinstance(arch, str):
            builder: Callable[[], nn.Module] = functools.partial(build_model, arch, **kwargs)
        elif callable(arch):
            builder = functools.partial(arch, **kwargs)
        else:
            raise ZootuneError(f"arch must be an architecture name or a callable, not {type(arch).__name__}")
        if isinstance(remap, (list, tuple)):
            if len(remap) != len(paths):
                raise ZootuneError(f"got {len(remap)} remap entries for {len(paths)} checkpoints")
            remaps = list(remap)
        else:
            remaps = [remap] * len(paths)

        members = []
        template: nn.Module | None = None
        for path, file_remap in zip(paths, remaps):
            state = load_state_dict_file(path)
            _check_finite(state, path)
            # Seeded builds are identical: build once, then give each member the template's
            # structure with the checkpoint's tensors themselves (no initialisation, no copy of
            # the 25M loaded values); only what the file does not cover (head, counters) is cloned.
            if template is None:
                template = _build_seeded(builder)
            head = _find_head_or_none(template, head_name)
            matched = match_state_dict(
                state, template, head_name=head, remap=file_remap, source=str(path), keep_head=keep_head
            )
            reference = template.state_dict(keep_vars=True)
            matched = {k: v.to(dtype=reference[k].dtype) for k, v in matched.items()}
            shared_until_assigned = {id(reference[k]): reference[k] for k in matched}
            model = copy.deepcopy(template, shared_until_assigned)
            model.load_state_dict(matched, strict=False, assign=True)
            members.append(model)
        if names is None:
            names = _unique_names([checkpoint_stem(p) for p in paths])
        return cls(members, names, head_name=head_name, builder=builder, sources=[str(p) for p in paths])

    # --- sequence protocol --------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._members)

    @overload
    def __getitem__(self, index: int | str) -> nn.Module: ...

    @overload
    def __getitem__(self, index: slice) -> "Zoo": ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            picked = range(len(self))[index]
            return Zoo([self._members[i] for i in picked], [self._names[i] for i in picked],
                       head_name=self.head_name, builder=self._builder,
                       sources=[self.sources[i] for i in picked])
        if isinstance(index, str):
            try:
                return self._members[self._names.index(index)]
            except ValueError:
                raise KeyError(f"no zoo member named {index!r}; members: {', '.join(self._names)}") from None
        return self._members[index]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._members)

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def members(self) -> list[nn.Module]:
        return list(self._members)

    def items(self) -> Iterator[tuple[str, nn.Module]]:
        return zip(self._names, self._members)

    # --- helpers ------------------------------------------------------------------------------

    def new_model(self, seed: int | None = None) -> nn.Module:
        """A fresh instance of the zoo's architecture: same class and state_dict keys as a member.

        Built by the zoo's builder (checkpoint zoos: the architecture's own initialisation); for a
        zoo from modules without a builder, a copy of member 0 whose layers are re-initialised by
        their ``reset_parameters``. The initialisation is drawn from ``seed`` (default: a fixed
        one), leaving the global random stream as it was.
        """
        if self._builder is not None:
            return _build_seeded(self._builder, BUILD_SEED if seed is None else seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(BUILD_SEED if seed is None else seed)
            return _reset_parameters(copy.deepcopy(self._members[0]))

    def to(self, *args, **kwargs) -> "Zoo":
        """Move every member (``nn.Module.to`` arguments); returns the zoo."""
        for member in self._members:
            member.to(*args, **kwargs)
        return self

    def num_parameters(self) -> int:
        """Parameters of all members together (each member counted in full)."""
        return sum(p.numel() for m in self._members for p in m.parameters())

    def _check_same_architecture(self) -> None:
        reference_name = self._names[0]
        reference = backbone_shapes(self._members[0], self.head_name)
        for name, member in zip(self._names[1:], self._members[1:]):
            if self.head_name is not None and self.head_name not in dict(member.named_modules()):
                raise ZooMismatchError(
                    f"zoo member {name!r} has no head module {self.head_name!r} (member {reference_name!r} has)"
                )
            shapes = backbone_shapes(member, self.head_name)
            for key, shape in reference.items():
                if key not in shapes:
                    raise ZooMismatchError(
                        f"zoo member {name!r} differs from {reference_name!r}: {key} "
                        f"(shape {tuple(shape)}) is missing in member {name!r}"
                    )
                if shapes[key] != shape:
                    raise ZooMismatchError(
                        f"zoo member {name!r} differs from {reference_name!r}: {key} has shape "
                        f"{tuple(shapes[key])} in {name!r} but {tuple(shape)} in {reference_name!r}"
                    )
            extra = [k for k in shapes if k not in reference]
            if extra:
                raise ZooMismatchError(
                    f"zoo member {name!r} differs from {reference_name!r}: {extra[0]} "
                    f"(shape {tuple(shapes[extra[0]])}) is missing in member {reference_name!r}"
                )

    def __repr__(self) -> str:
        member = self._members[0]
        params = sum(p.numel() for p in member.parameters())
        lines = [f"Zoo({len(self)} x {type(member).__name__}, {params / 1e6:.2f}M params each, "
                 f"head={self.head_name!r})"]
        for i, (name, source) in enumerate(zip(self._names, self.sources)):
            lines.append(f"  [{i}] {name}" + (f"  <- {source}" if source else ""))
        return "\n".join(lines)


def _find_head_or_none(model: nn.Module, head_name: str | None) -> str | None:
    """The head's dotted name; ``None`` for a headless backbone (``fc = Identity``), which makes a
    valid zoo -- methods that need a head say so themselves. A named head that is absent is an error."""
    try:
        return find_head_name(model, head_name)
    except ZootuneError:
        if head_name is not None:
            raise
        return None


def _check_finite(state: Mapping[str, torch.Tensor], path) -> None:
    """A checkpoint whose weights hold NaN or infinity is refused, naming the file and the tensor
    (training from it would fail later with a message blaming the learning rate)."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"zoo checkpoint {path}: tensor {key} holds {bad} non-finite value(s) (NaN or "
                                  "infinity); the file is damaged or was saved from a diverged training")


def _build_seeded(builder: Callable[[], nn.Module], seed: int = BUILD_SEED) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder()
    if not isinstance(model, nn.Module):
        raise ZootuneError(f"the architecture builder returned a {type(model).__name__}, not an nn.Module")
    return model
