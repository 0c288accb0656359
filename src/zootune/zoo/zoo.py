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

from zootune.errors import ZooMismatchError, ZootuneError
from zootune.models import build_model
from zootune.models.heads import find_head_name
from zootune.zoo.checkpoint import check_finite_state, load_state_dict_file
from zootune.zoo.preprocessing import DataConfig, disagreements
from zootune.zoo.remap import Remap, backbone_shapes, is_head_key, match_state_dict

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
    smaller Zoo. Build one with :meth:`from_modules`, :meth:`from_checkpoints` or
    :meth:`from_pretrained` (timm / torchvision / Hugging Face hub names).

    Attributes:
        names: one name per member (file stems, or ``member0``, ``member1``, ...).
        head_name: dotted name of the members' head (``fc`` for a ResNet), found with
            :func:`zootune.models.heads.find_head_name` unless given.
        data_configs: per member, the preprocessing its checkpoint expects
            (:class:`zootune.zoo.preprocessing.DataConfig`; None where unknown, e.g. checkpoint files).
        architecture, arch_kwargs: the ``build_model`` name of the architecture and its arguments,
            where known (``"timm:resnet50"`` for a zoo by name).
    """

    def __init__(
        self,
        members: Iterable[nn.Module],
        names: Iterable[str] | None = None,
        *,
        head_name: str | None = None,
        builder: Callable[[], nn.Module] | None = None,
        origins: Iterable[str | None] | None = None,
        data_configs: Iterable[DataConfig | None] | None = None,
        architecture: str | None = None,
        arch_kwargs: Mapping[str, Any] | None = None,
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
        self.origins: tuple[str | None, ...] = (
            tuple(origins) if origins is not None else (None,) * len(self._members)
        )
        self.data_configs: tuple[DataConfig | None, ...] = (
            tuple(data_configs) if data_configs is not None else (None,) * len(self._members)
        )
        self.architecture = architecture
        self.arch_kwargs = dict(arch_kwargs or {})
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
        _warn_repeated_checkpoints(paths)  # here: its warnings' stacklevel is counted from this method
        builder = _checkpoint_builder(arch, arch_kwargs)
        remaps = _remap_per_file(remap, len(paths))
        members = _load_members(paths, remaps, builder, head_name, keep_head)
        if names is None:
            names = _unique_names([checkpoint_stem(p) for p in paths])
        return cls(members, names, head_name=head_name, builder=builder, origins=[str(p) for p in paths])

    @classmethod
    def from_pretrained(
        cls,
        names: Iterable[str],
        *,
        head_name: str | None = None,
        offline: bool | None = None,
    ) -> "Zoo":
        """Members by name through timm's / torchvision's own pretrained machinery and caches:
        ``timm:ARCH[.TAG]``, ``torchvision:ARCH[.WEIGHTS]``, ``hf-hub:ORG/NAME``, each optionally
        ``=PATH`` for a local weights file (:mod:`zootune.zoo.pretrained`).

        All members must share one architecture. A member built by another library's class whose
        weights have the same keys and shapes as member 0's (timm's and torchvision's ResNet-50) is
        loaded into member 0's class, after checking that both compute the same outputs. Each
        member's preprocessing comes from its pretrained config (:attr:`data_configs`);
        members that disagree are reported (a warning, and :attr:`preprocessing_notes`).

        Raises:
            ZooMismatchError: members of different architectures (use :class:`zootune.Hub`).
            NotCachedError: a member is not cached and cannot be downloaded (offline).
        """
        import warnings

        from zootune.zoo.pretrained import load_pretrained

        loaded = load_pretrained(list(names), offline=offline).loaded
        reference = loaded[0]
        reference_head = _find_head_or_none(reference.model, head_name)
        models = [reference.model] + [_in_reference_class(reference, member, reference_head) for member in loaded[1:]]
        try:
            zoo = cls(models, [m.name for m in loaded], head_name=head_name, origins=[m.origin for m in loaded],
                      data_configs=[m.data_config for m in loaded], architecture=reference.architecture,
                      arch_kwargs=reference.arch_kwargs)
        except ZooMismatchError as err:
            architectures = ", ".join(f"{m.name} is {m.architecture}" for m in loaded)
            raise ZooMismatchError(f"{err} ({architectures}); models of different architectures make a "
                                   "zootune.Hub (e.g. Hub(load_pretrained([...])))") from None
        notes = zoo.preprocessing_notes
        if notes:
            warnings.warn(f"zoo members expect different preprocessing; using {zoo.names[0]}'s: "
                          + "; ".join(notes), stacklevel=2)
        return zoo

    @property
    def data_config(self) -> DataConfig | None:
        """The preprocessing to feed this zoo: the first member's that is known (None if none is)."""
        return next((config for config in self.data_configs if config is not None), None)

    @property
    def preprocessing_notes(self) -> list[str]:
        """Where members' preprocessing differs from the first one's (empty when they agree or are unknown)."""
        if all(config is None for config in self.data_configs):
            return []
        return disagreements(self.data_configs, self.names)

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
                       origins=[self.origins[i] for i in picked],
                       data_configs=[self.data_configs[i] for i in picked],
                       architecture=self.architecture, arch_kwargs=self.arch_kwargs)
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
        for i, (name, origin) in enumerate(zip(self._names, self.origins)):
            lines.append(f"  [{i}] {name}" + (f"  <- {origin}" if origin else ""))
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


def _warn_repeated_checkpoints(paths: Sequence[Path]) -> None:
    """A checkpoint given twice makes two identical members: allowed, but it is rarely meant (a zoo
    of N members that holds fewer models), so it is warned about, saying how they are the same: the
    same file, or files of the same content (hashed only when another file has the same size)."""
    import warnings

    from zootune.data.cache import sha256_file

    first_of: dict[Path, Path] = {}  # resolved path -> the path as given first
    for path in paths:
        resolved = path.resolve()
        if resolved in first_of:
            warnings.warn(f"zoo checkpoint {path} is given twice (the same file as {first_of[resolved]}): "
                          "the zoo holds two identical members", stacklevel=3)
        else:
            first_of[resolved] = path
    by_size: dict[int, list[Path]] = {}
    for path in first_of.values():
        if path.is_file():
            by_size.setdefault(path.stat().st_size, []).append(path)
    for same_size in (group for group in by_size.values() if len(group) > 1):
        first_with: dict[str, Path] = {}
        for path in same_size:
            digest = sha256_file(path)
            if digest in first_with:
                warnings.warn(f"zoo checkpoints {first_with[digest]} and {path} have the same content (sha256 "
                              f"{digest[:12]}...): the zoo holds two identical members", stacklevel=3)
            else:
                first_with[digest] = path


def _checkpoint_builder(arch: str | Callable[..., nn.Module], arch_kwargs: Mapping[str, Any] | None
                        ) -> Callable[[], nn.Module]:
    """``arch`` (a registered name or a builder) with ``arch_kwargs`` bound, as a builder of no arguments."""
    kwargs = dict(arch_kwargs or {})
    # partials, not lambdas: a Zoo stays picklable (e.g. handed to spawned DDP workers)
    if isinstance(arch, str):
        return functools.partial(build_model, arch, **kwargs)
    if callable(arch):
        return functools.partial(arch, **kwargs)
    raise ZootuneError(f"arch must be an architecture name or a callable, not {type(arch).__name__}")


def _remap_per_file(remap: Remap | Sequence[Remap], count: int) -> list[Remap]:
    """One remap per checkpoint: a list or tuple is one per file, anything else applies to all."""
    if isinstance(remap, (list, tuple)):
        if len(remap) != count:
            raise ZootuneError(f"got {len(remap)} remap entries for {count} checkpoints")
        return list(remap)
    return [remap] * count


def _load_members(paths: Sequence[Path], remaps: Sequence[Remap], builder: Callable[[], nn.Module],
                  head_name: str | None, keep_head: bool) -> list[nn.Module]:
    """One model per checkpoint file, each holding the file's tensors (read safely, checked finite)."""
    members = []
    template: nn.Module | None = None
    for path, file_remap in zip(paths, remaps):
        state = load_state_dict_file(path)
        check_finite_state(state, f"zoo checkpoint {path}")
        if template is None:  # built once the first file is known to be readable
            template = _build_seeded(builder)
        head = _find_head_or_none(template, head_name)
        matched = match_state_dict(
            state, template, head_name=head, remap=file_remap, origin=str(path), keep_head=keep_head
        )
        members.append(_with_tensors(template, matched))
    return members


def _with_tensors(template: nn.Module, matched: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of ``template`` holding the ``matched`` tensors themselves, cast to the template's dtypes.

    Seeded builds are identical: the template is built once, and each member gets its structure with
    the checkpoint's tensors (no initialisation, no copy of the 25M loaded values); only what the file
    does not cover (head, counters) is cloned."""
    reference = template.state_dict(keep_vars=True)
    matched = {k: v.to(dtype=reference[k].dtype) for k, v in matched.items()}
    shared_until_assigned = {id(reference[k]): reference[k] for k in matched}
    model = copy.deepcopy(template, shared_until_assigned)
    model.load_state_dict(matched, strict=False, assign=True)
    return model


def _build_seeded(builder: Callable[[], nn.Module], seed: int = BUILD_SEED) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder()
    if not isinstance(model, nn.Module):
        raise ZootuneError(f"the architecture builder returned a {type(model).__name__}, not an nn.Module")
    return model


def _in_reference_class(reference, member, head_name: str | None) -> nn.Module:
    """``member``'s model, or -- when another class holds the same weights layout as the reference
    (timm's and torchvision's ResNet-50) -- a copy of the reference model holding its weights, once
    both are checked to compute the same outputs; a different layout is a :class:`ZooMismatchError`."""
    model, ref = member.model, reference.model
    if type(model) is type(ref):
        return model  # the Zoo's own check compares keys and shapes
    member_head = _find_head_or_none(model, None)
    ref_shapes, shapes = backbone_shapes(ref, head_name), backbone_shapes(model, member_head)
    if ref_shapes != shapes:
        differing = sorted(set(ref_shapes) ^ set(shapes)) or [k for k in ref_shapes if ref_shapes[k] != shapes[k]]
        raise ZooMismatchError(
            f"zoo members must share one architecture: {reference.name!r} is a {type(ref).__module__.split('.')[0]} "
            f"{type(ref).__name__} ({reference.architecture}), {member.name!r} a {type(model).__module__.split('.')[0]} "
            f"{type(model).__name__} ({member.architecture}); first difference: {differing[0] if differing else '?'}. "
            "Models of different architectures make a zootune.Hub (e.g. Hub(load_pretrained([...])))")
    copy_ = copy.deepcopy(ref)
    state = {k: v for k, v in model.state_dict().items() if not is_head_key(k, member_head)}
    missing, unexpected = copy_.load_state_dict(state, strict=False)
    missing = [k for k in missing if not is_head_key(k, head_name)]
    if missing or unexpected:
        raise ZooMismatchError(f"zoo member {member.name!r}: its weights do not fit {reference.name!r}'s "
                               f"{type(ref).__name__} ({(missing or unexpected)[0]})")
    if head_name is not None and member_head is not None:
        from zootune.models.heads import set_submodule

        set_submodule(copy_, head_name, copy.deepcopy(model.get_submodule(member_head)))
    size = (member.data_config or reference.data_config)
    shape = (1, *(size.input_size if size is not None else (3, 224, 224)))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(BUILD_SEED)
        x = torch.randn(shape, dtype=next(ref.parameters()).dtype)
        was = model.training, copy_.training
        expected, got = model.eval()(x), copy_.eval()(x)
        model.train(was[0]), copy_.train(was[1])
    if expected.shape != got.shape or not torch.allclose(expected, got, rtol=1e-4, atol=1e-4):
        raise ZooMismatchError(
            f"zoo member {member.name!r} ({type(model).__name__}) has the weights layout of {reference.name!r} "
            f"({type(ref).__name__}) but computes other outputs; load it into a zootune.Hub instead")
    return copy_
