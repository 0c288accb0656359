"""Tasks: what a method is trained *for* -- the head, the loss and the metric.

Methods never special-case a task: they ask the task for a head of the right size and the engine
asks it for the loss and the metric. Classification is the default; landmark regression
(:class:`LandmarkTask`) and RL (:class:`zootune.rl.RLTask`, kept with the RL code so that the
optional ``minatar`` dependency stays out of the core) add their own ``Task``.
"""

from zootune.tasks.base import Task
from zootune.tasks.classification import ClassificationTask
from zootune.tasks.landmarks import LandmarkTask

__all__ = ["Task", "ClassificationTask", "LandmarkTask"]
