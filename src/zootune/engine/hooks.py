"""What a module may do before training starts, and keep in the checkpoint: the preparation hook.

Any module of the trained model -- the model itself or any submodule -- may define::

    prepare_for_training(context)      # once per fit(), before the first step, outside any forward
    training_state() -> dict           # JSON-able; stored in every checkpoint, given back on resume

The engine calls every ``prepare_for_training`` in ``named_modules()`` order, on every process,
once the model is on its device in its training layout, the checkpoint (if resuming) is loaded,
and before the model is wrapped for DistributedDataParallel. The ``context``
(:class:`PreparationContext`) gives what such a step needs: the example batch, the device, the
config, the state the module kept in the checkpoint and a way to agree across processes.

What it is for: a computation a module can run in several exact, equivalent ways whose speed
depends on the machine (``TrainConfig.exact_choices``: by measured time or by the fewest
multiply-adds) is chosen once here -- timed on the example batch -- instead of inside ``forward``
(where timing would run a backward pass inside DDP's and ``torch.compile``'s view). Each way sums in
its own order, so the choice decides the last bits of the numbers: the module returns it from
``training_state()``, the engine writes it into every checkpoint, and a resumed run gets it back
(``context.saved_state``) and computes exactly what the interrupted run did. Under ``torchrun``
the processes' timings may disagree; ``context.agree`` gives every process rank 0's choice.

A module that runs 2-d convolutions without being an ``nn.Conv2d`` sets the attribute
``convolves_2d = True``, so that the engine's channels-last rule (``TrainConfig.channels_last=None``)
counts it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping

import torch
from torch import nn

from zootune.engine.config import TrainConfig
from zootune.errors import CheckpointError

# Where the checkpoint keeps {module name: training_state()}.
TRAINING_STATES_KEY = "training_states"
# Where checkpoints written before this hook existed kept the same mapping, for the one kind of module
# that had a state then, leaving out empty states; read so that those checkpoints still resume exactly.
OLDER_TRAINING_STATES_KEY = "formulations"


@dataclass(frozen=True)
class PreparationContext:
    """What ``prepare_for_training`` is given.

    - ``model``: the module being trained (not the DDP wrapper); ``name``: the hooked module's
      dotted name in it ("" for the model itself).
    - ``example_batch()``: a batch of the training batch's shape, on the device and in the layout
      training uses (read when first asked for, every random stream restored afterwards).
    - ``device``, ``config`` (:class:`~zootune.engine.TrainConfig`), ``is_main`` (rank 0, or the only
      process: the one that logs and writes shared files).
    - ``saved_state``: what this module's ``training_state()`` returned when the checkpoint was
      written (``{}`` when the checkpoint holds nothing for it); ``None`` on a fresh start, or when
      the checkpoint holds no module states at all. A hook raises ``ValueError`` when the state does
      not fit the module (the engine reports a :class:`~zootune.errors.CheckpointError`).
    - ``agree(value)``: rank 0's ``value`` on every process (``value`` itself with one process); a
      collective: every process must call it.
    - ``autocast()``: the autocast context of training's forward passes (a no-op for fp32).
    - ``cache_dir``: the user cache folder (``$ZOOTUNE_CACHE``), for what a hook measures on this
      machine and reuses in later runs.
    """

    model: nn.Module
    name: str
    device: torch.device
    config: TrainConfig
    saved_state: dict | None
    is_main: bool
    cache_dir: Path
    example_batch: Callable[[], torch.Tensor]
    agree: Callable[[Any], Any]
    autocast: Callable[[], ContextManager]


def optional_method(obj: Any, name: str) -> Callable | None:
    """``obj``'s method ``name`` when it defines one (a hook), else None."""
    fn = getattr(obj, name, None)
    return fn if callable(fn) else None


def prepared_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` (itself included) that define ``prepare_for_training``, by dotted name."""
    return {name: m for name, m in model.named_modules() if optional_method(m, "prepare_for_training")}


def training_states(model: nn.Module) -> dict[str, dict]:
    """``{module name: training_state()}`` of the modules that keep one (for the checkpoint)."""
    return {name: m.training_state() for name, m in model.named_modules() if optional_method(m, "training_state")}


def saved_training_states(checkpoint: Mapping[str, Any]) -> dict[str, dict] | None:
    """A loaded checkpoint's ``{module name: state}``, or None when it holds none."""
    states = checkpoint.get(TRAINING_STATES_KEY)
    return states if states is not None else checkpoint.get(OLDER_TRAINING_STATES_KEY)


def prepare_for_training(model: nn.Module, context: PreparationContext, saved_states: Mapping[str, dict] | None,
                         checkpoint: Path | None = None) -> None:
    """Call every hooked module's ``prepare_for_training`` with its own ``name`` and ``saved_state``
    (from ``saved_states``, the checkpoint's ``{module name: state}``, or None on a fresh start).

    Raises :class:`~zootune.errors.CheckpointError` (naming ``checkpoint``) when the checkpoint holds
    states of modules this model does not have, or a hook finds its state does not fit."""
    modules = prepared_modules(model)
    if saved_states is not None:
        unknown = sorted(set(saved_states) - set(modules))
        if unknown:
            raise CheckpointError(f"{checkpoint}: training states for modules this model does not have: "
                                  f"{', '.join(unknown[:5])}")
    for name, module in modules.items():
        saved = None if saved_states is None else saved_states.get(name, {})
        try:
            module.prepare_for_training(dataclasses.replace(context, name=name, saved_state=saved))
        except ValueError as err:
            if saved is None:  # not about the checkpoint
                raise
            raise CheckpointError(f"{checkpoint}: {err}") from None


__all__ = ["PreparationContext", "TRAINING_STATES_KEY", "optional_method", "prepare_for_training",
           "prepared_modules", "saved_training_states", "training_states"]
