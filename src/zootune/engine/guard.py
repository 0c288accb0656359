"""The divergence guard: a training that blows up goes back to its last good epoch at a lower rate.

Every method trains through the engine, and every one can diverge at a rate that is too high for its
data: a loss that becomes NaN/inf, or a validation loss that explodes while the training loss looks
normal (BatchNorm's running statistics lagging behind weights that moved too far). Instead of
stopping, or keeping the damage, the engine keeps the state at the start of each epoch and, when

    the training loss is non-finite,  or  weights became non-finite,  or
    val_loss(epoch) > ``factor`` x val_loss(before training)   (or is non-finite)

restores that state (model, optimizer, random generators: the epoch is repeated with the same data
order and augmentations), multiplies every group's learning rate by ``lr_decay`` for the rest of the
run, logs one line and counts the rollback. After ``max_rollbacks`` the old behaviour applies: a
non-finite loss stops training with an error, a high validation loss is kept.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from zootune.engine.checkpoint import capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)


class Diverged(Exception):
    """Raised inside an epoch when the guard will roll it back (carries the reason)."""


@dataclass
class DivergenceGuard:
    """See the module docstring. ``factor=None`` disables the validation check."""

    factor: float | None = 10.0
    lr_decay: float = 0.5
    max_rollbacks: int = 3
    reference_val_loss: float | None = None
    lr_factor: float = 1.0
    events: list[dict] = field(default_factory=list)
    _saved: dict | None = None

    @property
    def can_roll_back(self) -> bool:
        return len(self.events) < self.max_rollbacks

    def remember(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """The state the next rollback returns to (call at the start of every epoch)."""
        self._saved = {"model": copy.deepcopy(module.state_dict()),
                       "optimizer": copy.deepcopy(optimizer.state_dict()), "rng": capture_rng_state()}

    def val_problem(self, val_loss: float | None) -> str | None:
        """Why this validation loss means divergence, or None."""
        if val_loss is None or self.factor is None or not self.can_roll_back:
            return None
        if not math.isfinite(val_loss):
            return f"validation loss {val_loss}"
        if self.reference_val_loss is not None and val_loss > self.factor * self.reference_val_loss:
            return (f"validation loss {val_loss:.4g} > {self.factor:g} x its value before training "
                    f"({self.reference_val_loss:.4g})")
        return None

    def roll_back(self, module: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, reason: str) -> None:
        """Back to the remembered state; every group's rate x ``lr_decay`` from now on."""
        module.load_state_dict(self._saved["model"])
        optimizer.load_state_dict(self._saved["optimizer"])
        restore_rng_state(self._saved["rng"])
        self.lr_factor *= self.lr_decay
        self.apply_lr_factor(optimizer, self.lr_decay)
        self.events.append({"epoch": epoch, "reason": reason, "lr_factor": self.lr_factor})
        log.warning("divergence guard: %s in epoch %d; rolled back to the start of the epoch and continuing "
                    "with the learning rate x %g (rollback %d of at most %d)", reason, epoch, self.lr_factor,
                    len(self.events), self.max_rollbacks)

    @staticmethod
    def apply_lr_factor(optimizer: torch.optim.Optimizer, factor: float) -> None:
        for group in optimizer.param_groups:
            group["initial_lr"] = group["initial_lr"] * factor
            group["lr"] = group["lr"] * factor

    def state_dict(self) -> dict:
        return {"reference_val_loss": self.reference_val_loss, "lr_factor": self.lr_factor, "events": self.events}

    def load_state_dict(self, state: dict | None, optimizer: torch.optim.Optimizer) -> None:
        """Read back from a checkpoint; the optimizer's rates (set from the resuming run's config)
        get the factor again."""
        if not state:
            return
        self.reference_val_loss = state["reference_val_loss"]
        self.lr_factor = float(state["lr_factor"])
        self.events = list(state["events"])
        if self.lr_factor != 1.0:
            self.apply_lr_factor(optimizer, self.lr_factor)


__all__ = ["DivergenceGuard", "Diverged"]
