"""Ensemble of the fine-tuned zoo members (Zoo-Tuning paper, Table 1 "Ensemble").

Each member is fine-tuned on the target (method ``finetune``); the ensemble averages their
predictions. For a classification task with member logits z_i (i = 1..m), ``combine="prob"``::

    p(y | x) = (1/m) * sum_i softmax(z_i(x))            output: log p(y | x)

and ``combine="logit"``::

    z(x) = (1/m) * sum_i z_i(x)                          output: z(x)

Why probabilities by default: averaging probabilities is the ensemble of the members' predictive
distributions (a mixture), which is what "averaging the models' predictions" means for classifiers
and is robust to members whose logits have different scales (a confident member does not dominate as
it does in logit space). The output is the *log* of the averaged probability so that the task's
cross-entropy (log-softmax of the output) is exactly the mixture's negative log-likelihood and argmax
is the mixture's prediction. ``"logit"`` is the plain output average, the right choice for regression
tasks (landmarks), where it is the default.

Cost: every input runs all m members (train = inference = m models), the paper's 5x row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import nn

from zootune.errors import ZootuneError
from zootune.methods.registry import BuildContext, MethodSpec, register_method
from zootune.options import require
from zootune.tasks import ClassificationTask

COMBINE_MODES = ("prob", "logit")


class Ensemble(nn.Module):
    """Average of ``members``' predictions; see the module docstring for ``combine``.

    The members are frozen and always run in eval mode (an ensemble of fitted models is evaluated,
    not trained).
    """

    def __init__(self, members: Sequence[nn.Module], combine: str = "prob"):
        super().__init__()
        if len(members) == 0:
            raise ZootuneError("an ensemble needs at least one fitted member")
        if combine not in COMBINE_MODES:
            raise ZootuneError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
        self.members = nn.ModuleList(members)
        self.combine = combine
        for p in self.members.parameters():
            p.requires_grad_(False)
        self.members.eval()

    def train(self, mode: bool = True) -> "Ensemble":
        super().train(mode)
        self.members.eval()  # BN statistics of fitted members must not drift
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [member(x) for member in self.members]
        if self.combine == "logit":
            return torch.stack(outputs).mean(dim=0)
        # log mean_i softmax(z_i) computed stably as logsumexp_i log_softmax(z_i) - log m.
        log_probs = torch.stack([torch.log_softmax(z, dim=1) for z in outputs])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(outputs))


@dataclass
class EnsembleConfig:
    # "prob": mean of probabilities (classification's default); "logit": plain mean of the outputs
    combine: Literal["prob", "logit"] | None = None

    def __post_init__(self):
        require(self.combine in (None, *COMBINE_MODES), f"combine must be one of {COMBINE_MODES}, got {self.combine!r}")


def build(ctx: BuildContext) -> Ensemble:
    """The ensemble of ``ctx.fitted["finetune"]`` (the fine-tuned members, one per zoo member)."""
    combine = (ctx.config or EnsembleConfig()).combine
    if combine is None:
        combine = "prob" if isinstance(ctx.task, ClassificationTask) else "logit"
    return Ensemble(list(ctx.required("finetune")), combine=combine)


register_method(
    MethodSpec(
        name="ensemble",
        help="average the predictions of the fine-tuned members (probabilities for classification)",
        build=build,
        config=EnsembleConfig,
        requires=("finetune",),
        trains=False,
    )
)
