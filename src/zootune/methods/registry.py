"""Names of methods for the CLI's ``--method`` and the ``zootune run`` comparison.

Each method file registers a :class:`MethodSpec` when imported. ``build`` has the signature::

    build(zoo, task, *, member=None, fitted=None, **options) -> nn.Module

- ``zoo``: a :class:`zootune.Zoo` (or a :class:`zootune.Hub` for hub methods);
- ``task``: a :class:`zootune.tasks.Task` (gives the head, loss, metric);
- ``member``: the zoo member's index for ``per_member`` methods (single fine-tune);
- ``fitted``: trained models of the methods named in ``requires`` (e.g. the ensemble and
  distillation receive ``fitted["finetune"]``, the list of fine-tuned members);
- ``options``: method-specific keyword options (documented on the method).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable

from torch import nn

from zootune.errors import ZootuneError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    help: str
    build: Callable[..., nn.Module]
    requires: tuple[str, ...] = ()  # methods whose fitted models ``build`` receives in ``fitted``
    trains: bool = True  # False: the built model is used as it is (e.g. an ensemble of fitted members)
    per_member: bool = False  # run once per zoo member
    hub: bool = False  # expects a zootune.Hub (members of different architectures)
    task_types: tuple[type, ...] | None = None  # the Task classes it supports; None: any task

    def supports(self, task) -> bool:
        return self.task_types is None or isinstance(task, self.task_types)


METHODS: dict[str, MethodSpec] = {}

# Modules that register methods when imported, in the order tables list them.
_METHOD_MODULES = (
    "zootune.methods.finetune",
    "zootune.methods.ensemble",
    "zootune.methods.distill",
    "zootune.methods.knowledge_flow",
    "zootune.methods.soup",
    "zootune.methods.zoo_tuning",
    "zootune.methods.hub_pathway",
    "zootune.methods.pac_net",
)


def register_method(spec: MethodSpec) -> MethodSpec:
    METHODS[spec.name] = spec
    return spec


def _load_all() -> None:
    for module in _METHOD_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def available_methods() -> dict[str, MethodSpec]:
    _load_all()
    return dict(METHODS)


def get_method(name: str) -> MethodSpec:
    methods = available_methods()
    if name not in methods:
        raise ZootuneError(f"unknown method {name!r}; choose from: {', '.join(methods)}")
    return methods[name]
