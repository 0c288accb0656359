"""The method contract: what a method declares (:class:`MethodSpec`) and what it receives
(:class:`BuildContext`), and the names for ``--method`` and the ``zootune run`` comparison.

Each method file registers a :class:`MethodSpec` when imported (timm's ``@register_model``, PEFT's
tuner mapping). The experiment and the CLI know methods only through these fields: nothing above
``methods/`` names a method.

``spec.build(ctx)`` returns the module the engine trains (or, with ``trains=False``, uses as it is).
``ctx`` holds the zoo, the task, the method's validated options (an instance of ``spec.config``),
the target's data splits, the fitted models of the methods named in ``requires``, the zoo member
for ``per_member`` methods, the members' validation metrics when their fine-tunes ran, a ranking of
the members that the caller measured (``member_scores``), and the training configuration. A method that needs data (a Fisher, a ranking, a source task) computes it
in ``build`` from ``ctx.data`` through the engine. When a saved model folder is loaded, ``build`` is
called with ``ctx.rebuilding = True`` and no data: it must then give the module's structure (the
weights come from the file).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from zootune.errors import ZootuneError


@dataclass
class BuildContext:
    """Everything a method's ``build`` receives (see the module docstring)."""

    zoo: Sequence[nn.Module]  # a zootune.Zoo, or a zootune.Hub for hub methods
    task: Any  # a zootune.tasks.Task
    config: Any = None  # the method's options: an instance of spec.config (None if it has none)
    data: Any = None  # the target's DatasetSplits (train / val / test); None when rebuilding a saved model
    source_data: Any = None  # DatasetSplits of a source task, for methods that need one (needs_source_data)
    fitted: Mapping[str, Any] = field(default_factory=dict)  # finalized models of spec.requires
    member: int | None = None  # the zoo member of a per_member method
    member_val_metrics: Sequence[float] | None = None  # each member's fine-tuned validation metric, when run
    # The caller's ranking of the members on the target, higher = better (zootune rl: each source
    # agent's zero-shot return): a method that starts from a ranking uses it instead of measuring one.
    member_scores: Sequence[float] | None = None
    train_config: Any = None  # the zootune.engine.TrainConfig the target is trained with
    seed: int = 0
    rebuilding: bool = False  # only the structure is wanted: a saved model's weights come from its file
    # Options that build resolved from the data (e.g. the members' ranking): written back here so
    # that a saved model records them and is rebuilt the same way without data.
    resolved: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.fitted is None:
            self.fitted = {}

    def require_data(self, why: str):
        """``self.data``, or a ZootuneError saying the method needs the target's data and why."""
        if self.data is None:
            raise ZootuneError(f"this method needs the target's training data ({why}): pass data=DatasetSplits")
        return self.data

    def required(self, name: str):
        """The fitted model(s) of required method ``name``, or a ZootuneError saying what to run first."""
        if name not in self.fitted:
            raise ZootuneError(f"this method needs the models of method {name!r}: fit {name!r} first")
        return self.fitted[name]


@dataclass(frozen=True)
class MethodSpec:
    """What a method is, for the experiment and the CLI.

    ``config``: the dataclass of its options (checked by :func:`zootune.options.parse_config` before
    any work; ``None``: no options). ``requires``: methods whose fitted models ``build`` receives in
    ``ctx.fitted``. ``trains=False``: the built module is used as it is (an ensemble of fitted
    members). ``per_member``: run once per zoo member; the member with the best validation metric is
    the "best on val" single-model row, and the members' validation metrics reach later methods as
    ``ctx.member_val_metrics``. ``hub``: expects a :class:`zootune.Hub`. ``task_types``: the task
    classes it supports (None: any). ``in_default_run=False`` (with ``default_run_note`` saying why):
    left out of ``zootune run`` unless named. ``needs_source_data``: uses ``ctx.source_data``.
    ``reports_gates``: the built module has ``record_gates()``/``gate_statistics()`` (gate heatmaps).
    ``layer_types_option``: the name of the option that takes the layer types to change, for
    ``--aggregate`` (None: the method aggregates no layers).
    ``plain_model``: what ``finalize()`` returns is a plain model of the zoo's architecture.
    ``candidates(ctx)``: called with the first build's context (``ctx.resolved`` filled), a list of
    option overrides to train the same way as further candidates; the one with the best validation
    metric is kept and its overrides recorded with the resolved options (empty list: one training).
    """

    name: str
    help: str
    build: Callable[[BuildContext], nn.Module]
    config: type | None = None
    requires: tuple[str, ...] = ()
    trains: bool = True
    per_member: bool = False
    hub: bool = False
    task_types: tuple[type, ...] | None = None
    in_default_run: bool = True
    default_run_note: str = ""
    needs_source_data: bool = False
    reports_gates: bool = False
    plain_model: bool = False  # finalize() gives a plain model of the zoo's architecture (no method modules)
    candidates: Callable[[BuildContext], list[dict]] | None = None
    # The name of the option that takes the layer types to change, for --aggregate (None: the method
    # aggregates no layers and --aggregate does not apply to it).
    layer_types_option: str | None = None

    def supports(self, task) -> bool:
        return self.task_types is None or isinstance(task, self.task_types)

    def parse_options(self, options: Mapping[str, Any] | Any | None):
        """The options as an instance of ``config``: a dict is checked field by field (unknown names,
        types, ranges: :class:`zootune.errors.OptionError`); an instance passes as it is."""
        from zootune.errors import OptionError
        from zootune.options import parse_config

        if self.config is None:
            if options:
                raise OptionError(f"method {self.name!r} takes no options, got {', '.join(sorted(options))}")
            return None
        if isinstance(options, self.config):
            return options
        if options is not None and not isinstance(options, Mapping):
            raise OptionError(f"options of {self.name!r} must be a dict or a {self.config.__name__}")
        return parse_config(self.config, options, what=self.name)

    def option_names(self) -> list[str]:
        return [] if self.config is None else [f.name for f in dataclasses.fields(self.config) if f.init]


METHODS: dict[str, MethodSpec] = {}
DEFAULT_METHOD = "zoo-tuning"  # what `zootune fit` trains when no --method is given
# What `zootune rl` compares when no --methods is given (docs/rl.md): learning from scratch, fine-tuning
# the zero-shot-best source (per-member), robust Zoo-Tuning and Lite (both started on that source).
DEFAULT_RL_METHODS = ("scratch", "finetune", "zoo-tuning", "lite")

# Modules that register methods when imported, in the order tables list them.
_METHOD_MODULES = (
    "zootune.methods.finetune",
    "zootune.methods.scratch",
    "zootune.methods.ensemble",
    "zootune.methods.distill",
    "zootune.methods.knowledge_flow",
    "zootune.methods.soup",
    "zootune.methods.fisher_merge",
    "zootune.methods.zoo_tuning",
    "zootune.methods.hub_pathway",
    "zootune.methods.pac_net",
)


# A model folder's former formats (config.json "format" values a method wrote before the one format):
# format -> reader(config, config_path) returning the config in the current form.
FORMER_FOLDER_FORMATS: dict[str, Callable[[dict, Any], dict]] = {}


def register_former_folder_format(name: str, reader: Callable[[dict, Any], dict]) -> None:
    """Let :mod:`zootune.model_dir` read folders a method wrote in its own former format ``name``."""
    FORMER_FOLDER_FORMATS[name] = reader


def former_folder_formats() -> dict[str, Callable[[dict, Any], dict]]:
    """Every registered former model-folder format (the method modules imported first)."""
    _load_all()
    return dict(FORMER_FOLDER_FORMATS)


def register_method(spec: MethodSpec) -> MethodSpec:
    METHODS[spec.name] = spec
    return spec


def _load_all() -> None:
    for module in _METHOD_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def _table_position(spec: MethodSpec) -> int:
    module = getattr(spec.build, "__module__", "") or ""
    for i, name in enumerate(_METHOD_MODULES):
        if module == name or module.startswith(name + "."):
            return i
    return len(_METHOD_MODULES)


def available_methods() -> dict[str, MethodSpec]:
    """Every registered method, in table order (the order of ``_METHOD_MODULES``)."""
    _load_all()
    return dict(sorted(METHODS.items(), key=lambda item: _table_position(item[1])))


def get_method(name: str) -> MethodSpec:
    methods = available_methods()
    if name not in methods:
        raise ZootuneError(f"unknown method {name!r}; choose from: {', '.join(methods)}")
    return methods[name]


def with_requirements(names: Sequence[str]) -> list[MethodSpec]:
    """The methods ``names`` in registry order, every method one of them ``requires`` placed before
    it (transitively). An unknown name or a cycle of requirements raises :class:`ZootuneError`."""
    registered = available_methods()
    ordered: list[str] = []

    def add(name: str, chain: tuple[str, ...] = ()) -> None:
        if name in ordered:
            return
        if name in chain:
            raise ZootuneError(f"methods require each other in a cycle: {' -> '.join(chain + (name,))}")
        for required in get_method(name).requires:
            add(required, chain + (name,))
        ordered.append(name)

    for name in sorted((get_method(n).name for n in names), key=list(registered).index):
        add(name)
    return [registered[n] for n in ordered]


def build_method(name: str, zoo, task, *, options: Mapping[str, Any] | None = None, **context) -> nn.Module:
    """Build registered method ``name`` from Python: ``build_method("lite", zoo, task,
    options={"align": "none"}, data=splits)``; ``context`` fills the other :class:`BuildContext`
    fields (``data``, ``fitted``, ``member``, ``member_val_metrics``, ``train_config``, ...)."""
    spec = get_method(name)
    return spec.build(BuildContext(zoo=zoo, task=task, config=spec.parse_options(options), **context))


__all__ = ["BuildContext", "DEFAULT_METHOD", "DEFAULT_RL_METHODS", "MethodSpec", "METHODS", "available_methods", "build_method", "get_method",
           "former_folder_formats", "register_former_folder_format", "register_method",
           "with_requirements"]
