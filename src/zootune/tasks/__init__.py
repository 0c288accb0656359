"""Tasks: what a method is trained *for* -- the head, the loss and the metric.

Methods never special-case a task: they ask the task for a head of the right size and the engine
asks it for the loss and the metric. Classification is the default; landmark regression and RL add
their own ``Task``.
"""

from zootune.tasks.base import Task
from zootune.tasks.classification import ClassificationTask

__all__ = ["Task", "ClassificationTask"]
