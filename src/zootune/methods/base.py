"""The contract between a method and the training engine.

A method builds an ``nn.Module`` (from a zoo, a hub or one model, plus a :class:`zootune.tasks.Task`)
that :class:`zootune.engine.Trainer` trains like any model. Per optimisation step the engine does::

    module.set_training_progress(step / total_steps)        # if defined (e.g. Knowledge Flow's growing penalty)
    outputs = model(inputs)                                  # through DistributedDataParallel when distributed
    loss = task.loss(outputs, targets)
    loss = loss + module.auxiliary_loss(outputs, targets)    # if defined: state stashed by forward
    loss.backward(); optimizer.step()
    module.after_optimizer_step()                            # if defined (e.g. PAC-Net re-applies masks)

and builds its optimizer from ``module.param_groups(base_lr)`` when defined (e.g. a lower backbone
learning rate), else from all parameters with ``requires_grad``. When training ends the engine calls
``module.finalize()`` if defined and evaluates/exports what it returns. A method whose result is a
plain model of the zoo's architecture gives it under one public name, ``merge_and_unload()``, and
its ``finalize()`` returns that (Lite Zoo-Tuning: the folded model; Knowledge Flow, distillation,
fine-tuning: the student / the model). Methods that change layers in place do it with
:class:`zootune.layers.wrapper.LayerWrapper` s (the replaced layer kept as ``base_layer``) and unload
them through :func:`zootune.layers.wrapper.merge_and_unload`. The hooks are optional: a plain model
is a valid method output.

``MethodModule`` documents these hooks as a typing Protocol; nothing needs to inherit from it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class MethodModule(Protocol):
    def auxiliary_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def set_training_progress(self, fraction: float) -> None: ...

    def after_optimizer_step(self) -> None: ...

    def param_groups(self, base_lr: float) -> list[dict]: ...

    def finalize(self) -> nn.Module: ...

    def merge_and_unload(self) -> nn.Module: ...

