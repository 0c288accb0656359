"""Choosing the learning rate on the user's data (``zootune fit --lr auto``, the default).

The rule: **the largest candidate rate at which a short fine-tune trains without diverging**.
Candidates (SGD 0.1, 0.03, 0.01; Adam/AdamW 1e-3, 3e-4, 1e-4) are probed from the largest down:
one zoo member is fine-tuned for ``PROBE_EPOCHS`` epochs (the schedule compressed into them); a rate
whose probe made the divergence guard roll back (:mod:`zootune.engine.guard`: a non-finite loss or
weights, or a validation loss 10x its value before training) or stop is refused, and the next
smaller one probed. The first that trains is kept; when none does, the smallest.

Why not the best validation metric of the probe: a probe of a few steps is biased towards small
rates (the short-horizon bias, Wu, Ren, Liao and Grosse, ICLR 2018) -- a large rate moves the
pretrained weights further before it settles, looks worse early and ends better (measured on four
folders in docs/dev-notes/cli-and-run.md). Rates above the candidates are not tried: a rate can
ruin a run without the guard seeing it. What a few steps can tell is whether a rate is usable at all.

The member is the one the method trains from when it says so (``--member`` of a per-member
method), else the member LogME ranks first on the training images (You et al., ICML 2021; one
forward pass per member, :mod:`zootune.methods.logme`). Every method of a run gets the rate by the
same rule. Cost: ``PROBE_EPOCHS`` epochs of one model when the largest rate trains.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from zootune.errors import NonFiniteLossError
from zootune.methods.finetune import probe_run
from zootune.methods.logme import best_member

CANDIDATES = {"sgd": (0.1, 0.03, 0.01), "adam": (1e-3, 3e-4, 1e-4), "adamw": (1e-3, 3e-4, 1e-4)}
PROBE_EPOCHS = 2


@dataclass
class LearningRateChoice:
    """What the probe measured: the chosen rate, the member probed, the best validation metric of
    each rate probed (None where the guard stopped the probe), and the rates refused."""

    lr: float
    member: int
    metric_name: str
    metrics: dict[float, float | None]
    diverged: list[float] = field(default_factory=list)

    def summary(self) -> str:
        shown = " / ".join(f"{lr:g}: " + ("diverged" if lr in self.diverged else f"val {self.metric_name} {value:.2f}")
                           for lr, value in self.metrics.items())
        return (f"--lr auto: lr {self.lr:g}, the largest rate at which member {self.member} fine-tunes for "
                f"{PROBE_EPOCHS} epochs without diverging ({shown})")

    def to_dict(self) -> dict:
        return {"lr": self.lr, "member": self.member, "probe_epochs": PROBE_EPOCHS,
                "rule": "largest rate that trains without diverging",
                "diverged": [f"{lr:g}" for lr in self.diverged],
                "val_" + self.metric_name: {f"{lr:g}": value for lr, value in self.metrics.items()}}


def choose_learning_rate(zoo, task, splits, train_config, member: int | None = None) -> LearningRateChoice:
    """The rule of the module docstring on ``splits`` (train / val) with ``train_config``'s other settings."""
    if member is None:
        member = best_member(zoo, splits.train)
    candidates = CANDIDATES[train_config.optimizer]
    metrics: dict[float, float | None] = {}
    diverged = []
    for lr in candidates:
        config = dataclasses.replace(train_config, lr=lr)
        try:
            result = probe_run(zoo[member], task, splits.train, splits.val, config, PROBE_EPOCHS)
        except NonFiniteLossError:  # the guard's rollbacks ran out
            result = None
        metrics[lr] = None if result is None else result.best_val_metric
        if result is not None and not result.rollbacks:
            return LearningRateChoice(lr, member, task.metric_name, metrics, diverged)
        diverged.append(lr)
    return LearningRateChoice(candidates[-1], member, task.metric_name, metrics, diverged)


__all__ = ["CANDIDATES", "LearningRateChoice", "PROBE_EPOCHS", "choose_learning_rate"]
