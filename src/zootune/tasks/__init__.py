"""Tasks: what a method is trained *for* -- the head, the loss and the metric.

Methods never special-case a task: they ask the task for a head of the right size and the engine
asks it for the loss and the metric. Classification is the default; landmark regression
(:class:`LandmarkTask`) and RL (:class:`zootune.rl.RLTask`, kept with the RL code so that the
optional ``minatar`` dependency stays out of the core) add their own ``Task``.

A model folder records its task (``task.to_config()``) and is loaded with the task rebuilt from that
record (:func:`task_from_config`, through the table :data:`TASK_TYPES`); :func:`task_for` is the task
of a target's data splits.
"""

from zootune.tasks.base import Task
from zootune.tasks.classification import ClassificationTask
from zootune.tasks.landmarks import LandmarkTask
from zootune.tasks.registry import TASK_TYPES, task_for, task_from_config

__all__ = ["Task", "ClassificationTask", "LandmarkTask", "TASK_TYPES", "task_for", "task_from_config"]
