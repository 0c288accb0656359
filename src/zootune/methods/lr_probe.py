"""Choosing the learning rate on the user's data (``zootune fit --lr auto``, the default).

A rate that suits one folder and zoo does not suit another (docs/dev-notes/cli-and-run.md). The
probe fine-tunes one zoo member briefly at each candidate rate and keeps the best on validation:

    lr* = argmax_{lr in candidates} val( fine-tune(member, lr, ``epochs`` epochs, schedule compressed) )

(the first of equals). The member is the one the method trains from when it says so (``--member``
of a per-member method), else the member LogME ranks first on the training images (You et al., ICML
2021; one forward pass per member, :mod:`zootune.methods.logme`). Candidates: SGD 0.01, 0.03, 0.1;
Adam/AdamW 1e-4, 3e-4, 1e-3. Every method of a run gets the rate by the same rule. Cost: 3 x
``epochs`` epochs of one model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from zootune.methods.finetune import probe_fine_tune

CANDIDATES = {"sgd": (0.01, 0.03, 0.1), "adam": (1e-4, 3e-4, 1e-3), "adamw": (1e-4, 3e-4, 1e-3)}
PROBE_EPOCHS = 2


@dataclass
class LearningRateChoice:
    """What the probe measured: the chosen rate, the member probed, the validation metric per rate."""

    lr: float
    member: int
    metric_name: str
    metrics: dict[float, float]

    def summary(self) -> str:
        shown = " / ".join(f"{lr:g}: {value:.2f}" for lr, value in self.metrics.items())
        return (f"--lr auto: member {self.member} fine-tuned for {PROBE_EPOCHS} epochs at each rate, "
                f"val {self.metric_name} {shown} -> lr {self.lr:g}")

    def to_dict(self) -> dict:
        return {"lr": self.lr, "member": self.member, "probe_epochs": PROBE_EPOCHS,
                "val_" + self.metric_name: {f"{lr:g}": value for lr, value in self.metrics.items()}}


def choose_learning_rate(zoo, task, splits, train_config, member: int | None = None) -> LearningRateChoice:
    """The probe of the module docstring on ``splits`` (train / val) with ``train_config``'s other settings."""
    if member is None:
        member = _logme_best(zoo, splits.train)
    metrics = {}
    for lr in CANDIDATES[train_config.optimizer]:
        config = dataclasses.replace(train_config, lr=lr)
        metrics[lr] = probe_fine_tune(zoo[member], task, splits.train, splits.val, config, PROBE_EPOCHS)
    pick = max if task.higher_is_better else min
    best = pick(metrics.values())
    chosen = next(lr for lr, value in metrics.items() if value == best)
    return LearningRateChoice(chosen, member, task.metric_name, metrics)


def _logme_best(zoo, train_dataset) -> int:
    if len(zoo) == 1:
        return 0
    from zootune.methods.logme import rank_zoo

    data = train_dataset.with_transform(None) if hasattr(train_dataset, "with_transform") else train_dataset
    names = [f"m{i}" for i in range(len(zoo))]
    return names.index(rank_zoo(list(zoo), data, names=names)[0][0])


__all__ = ["CANDIDATES", "LearningRateChoice", "PROBE_EPOCHS", "choose_learning_rate"]
