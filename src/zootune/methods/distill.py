"""Multi-teacher knowledge distillation into one model (Zoo-Tuning paper, Table 1 "Distill").

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (2015), with the teacher
distribution averaged over the zoo. Teachers are the zoo members fine-tuned on the target (the
ensemble's members), frozen and in eval mode; the student has the zoo's architecture. With teacher
logits t_i (i = 1..m), student logits s and temperature T::

    p_T(x)  = (1/m) * sum_i softmax(t_i(x) / T)                     averaged teacher distribution
    q_T(x)  = softmax(s(x) / T)
    L       = (1 - alpha) * L_task(s, y) + alpha * T^2 * KL(p_T || q_T)

T^2 keeps the soft term's gradient on the scale of the task term (Hinton et al., Sec. 2). Defaults
T = 4, alpha = 0.1, p_T the average of probabilities (the Zoo-Tuning paper does not state its own).
They were chosen on validation accuracy on the MiniZoo targets (docs/baselines.md has the
measurements): alpha 0.5 / 0.25 / 0.1 gave mean val 75.7 / 77.1 / 79.4 % over count, textures and
digits8x8 (seed 0); T in {1, 2, 8} and averaging logits were no better than T = 4 and probabilities.
With these heterogeneous members the averaged teacher is often worse than the best member, so a
small alpha (mostly the task loss, the teachers as a soft regulariser) does best; alpha -> 0 is
fine-tuning the best-validated member.

Choices the paper leaves open (ours):

- Student initialisation: the *pretrained* zoo member (with a new head) whose fine-tuned copy had the
  best validation metric when ``val_metrics`` is given, else ``student_member`` (default 0). Starting
  from pretrained weights matches the other rows of Table 1, which all start from the zoo.
- The engine adds ``auxiliary_loss`` to the task loss, so that hook returns
  ``alpha * (T^2 * KL - L_task)``, making the total exactly L above.

Cost: in training mode ``forward`` runs every teacher and the student (paper: 24.72 = 6 x 4.12 GFLOPs
for five teachers); in eval mode and after :meth:`Distill.finalize` only the student runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zootune.errors import ZootuneError
from zootune.methods.finetune import check_member_index, copy_with_new_head
from zootune.methods.registry import BuildContext, MethodSpec, register_method
from zootune.options import require
from zootune.tasks import ClassificationTask, Task

ALPHA_DEFAULT = 0.1  # weight of the distillation term; chosen on validation (module docstring)


@dataclass
class DistillConfig:
    """Options of ``distill`` (see the module docstring)."""

    temperature: float = 4.0
    alpha: float = ALPHA_DEFAULT
    average: Literal["probs", "logits"] = "probs"
    student_member: int | None = None  # default: the best fine-tuned member on validation, else 0
    head_name: str | None = None

    def __post_init__(self):
        require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        require(0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}")
        require(self.average in ("probs", "logits"), f"average must be 'probs' or 'logits', got {self.average!r}")


def averaged_teacher_probs(
    teacher_logits: Sequence[torch.Tensor], temperature: float, average: str = "probs"
) -> torch.Tensor:
    """The teachers' averaged tempered prediction, shape (B, C)::

        average="probs":   p_T = (1/m) sum_i softmax(t_i / T)
        average="logits":  p_T = softmax(((1/m) sum_i t_i) / T)
    """
    if average == "probs":
        return torch.stack([F.softmax(t / temperature, dim=1) for t in teacher_logits]).mean(dim=0)
    if average == "logits":
        return F.softmax(torch.stack(list(teacher_logits)).mean(dim=0) / temperature, dim=1)
    raise ZootuneError(f"average must be 'probs' or 'logits', got {average!r}")


def distillation_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(p_T || softmax(s / T)), averaged over the batch.

    Zero exactly when the student's tempered distribution equals ``teacher_probs``.
    """
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    # kl_div(input=log q, target=p) = sum p (log p - log q); p = 0 terms contribute 0.
    kl = F.kl_div(log_q, teacher_probs, reduction="batchmean")
    return temperature**2 * kl


class Distill(nn.Module):
    """Student trained against the averaged, tempered predictions of frozen ``teachers``."""

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[nn.Module],
        task: Task,
        temperature: float = 4.0,
        alpha: float = ALPHA_DEFAULT,
        average: str = "probs",
    ):
        super().__init__()
        if len(teachers) == 0:
            raise ZootuneError("distillation needs at least one teacher (fine-tuned member)")
        DistillConfig(temperature=temperature, alpha=alpha, average=average)  # the rules live there
        self.student = student
        self.teachers = nn.ModuleList(teachers)
        for p in self.teachers.parameters():
            p.requires_grad_(False)
        self.teachers.eval()
        self.task = task
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.average = average
        self._teacher_probs: torch.Tensor | None = None

    def train(self, mode: bool = True) -> "Distill":
        super().train(mode)
        self.teachers.eval()  # frozen teachers: their BN statistics stay the fine-tuned ones
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self._teacher_probs = averaged_teacher_probs([t(x) for t in self.teachers], self.temperature, self.average)
        return self.student(x)

    def auxiliary_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self._teacher_probs is None:
            raise RuntimeError("Distill.auxiliary_loss called without a training-mode forward first")
        teacher_probs, self._teacher_probs = self._teacher_probs, None
        kd = distillation_loss(outputs, teacher_probs, self.temperature)
        return self.alpha * (kd - self.task.loss(outputs, targets))

    def merge_and_unload(self) -> nn.Module:
        """The student alone (the teachers only shape its training)."""
        return self.student

    def finalize(self) -> nn.Module:
        return self.merge_and_unload()


def pick_student_member(
    num_members: int, val_metrics: Sequence[float] | None, higher_is_better: bool, student_member: int | None
) -> int:
    """Index of the member the student starts from (see the module docstring)."""
    if student_member is not None:
        return int(student_member)
    if val_metrics is None:
        return 0
    if len(val_metrics) != num_members:
        raise ZootuneError(f"val_metrics has {len(val_metrics)} values for a zoo of {num_members} members")
    values = list(val_metrics)
    best = max(values) if higher_is_better else min(values)
    return values.index(best)


def build(ctx: BuildContext) -> Distill:
    """Distil the fine-tuned members (``ctx.fitted["finetune"]``) into a copy of a pretrained zoo
    member with a new head: the best by ``ctx.member_val_metrics`` when known, else ``student_member``."""
    config = ctx.config or DistillConfig()
    teachers = list(ctx.required("finetune"))
    task = ctx.task
    if not isinstance(task, ClassificationTask):  # its soft targets are class distributions
        raise ZootuneError(
            f"distillation matches the teachers' class probabilities and is for classification only, not {task!r}; "
            "leave it out (e.g. --methods finetune,ensemble,soup,zoo-tuning,lite)"
        )
    index = pick_student_member(len(ctx.zoo), ctx.member_val_metrics, task.higher_is_better, config.student_member)
    student, _ = copy_with_new_head(ctx.zoo[check_member_index(ctx.zoo, index)], task, config.head_name)
    # The fitted members are used as they are (not copied): they are finished models, and five
    # ResNet-50 copies would double the memory.
    return Distill(student, teachers, task, temperature=config.temperature, alpha=config.alpha,
                   average=config.average)


register_method(
    MethodSpec(
        name="distill",
        help="distil the fine-tuned members (averaged soft predictions) into one model",
        build=build,
        plain_model=True,
        config=DistillConfig,
        requires=("finetune",),
        task_types=(ClassificationTask,),  # soft targets are class distributions
    )
)
