"""Task types by name, for a model folder's config.json, and the task of a target's data.

A task is recorded as ``task.to_config()``: ``{"type": name, **its constructor's arguments}`` (JSON
values), e.g. ``{"type": "classification", "num_classes": 10}``. :func:`task_from_config` reads it
back through :data:`TASK_TYPES`; each argument is checked against the constructor's annotations
(:func:`zootune.options.check_kwargs`) and then by the constructor itself. Nothing is imported by
name: a type that is not in the table is refused.
"""

from __future__ import annotations

from typing import Any, Mapping

from zootune.errors import ZootuneError
from zootune.tasks.base import Task
from zootune.tasks.classification import ClassificationTask
from zootune.tasks.landmarks import LandmarkTask

TASK_TYPES: dict[str, type[Task]] = {
    "classification": ClassificationTask,
    "landmarks": LandmarkTask,
}


def task_from_config(config: Mapping[str, Any]) -> Task:
    """The task a ``to_config()`` record describes. An unknown type, an unknown, missing or mistyped
    argument, or a value the task refuses: a one-line :class:`ZootuneError`."""
    from zootune.options import check_kwargs

    if not isinstance(config, Mapping) or not isinstance(config.get("type"), str):
        raise ZootuneError(f"a task must be recorded as a JSON object with a \"type\" string, got {config!r}")
    arguments = {k: v for k, v in config.items() if k != "type"}
    name = config["type"]
    if name not in TASK_TYPES:
        raise ZootuneError(f"unknown task type {name!r}; known: {', '.join(TASK_TYPES)}")
    cls = TASK_TYPES[name]
    try:
        return cls(**check_kwargs(cls.__init__, arguments, what=f"task {name!r}"))
    except TypeError as e:  # a required argument is missing
        raise ZootuneError(f"task {name!r}: {e}") from None


def task_for(splits) -> Task:
    """The task a target's data splits are trained for: their own ``task`` when they carry one
    (landmarks, RL), else classification of their ``num_classes`` (an image folder)."""
    return getattr(splits, "task", None) or ClassificationTask(splits.num_classes)


__all__ = ["TASK_TYPES", "task_for", "task_from_config"]
