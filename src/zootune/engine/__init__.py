"""The training engine: one loop for every method (hooks in :mod:`zootune.methods.base`).

- :class:`TrainConfig` -- epochs, global batch, optimizer, schedule, seed, ... (JSON-serialisable);
  :func:`check_device` refuses a device that is not usable here before any work;
- :class:`Trainer` -- ``Trainer(model, task, train, val, config, out_dir, resume).fit() -> FitResult``:
  best-on-validation selection, atomic per-epoch checkpoints with all RNG states (exact resume),
  ``metrics.jsonl``/``metrics.csv``, DistributedDataParallel under ``torchrun``;
- :func:`evaluate` / :func:`predict` -- metrics or outputs of a model on a dataset.
"""

from zootune.engine.config import TrainConfig, check_device
from zootune.engine.evaluation import evaluate, predict
from zootune.engine.trainer import FitResult, Trainer

__all__ = ["TrainConfig", "check_device", "Trainer", "FitResult", "evaluate", "predict"]
