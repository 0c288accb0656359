"""Knowledge Flow (Liu, Peng, Schwing, "Knowledge Flow: Improve Upon Your Teachers", ICLR 2019).

Frozen teachers' intermediate features flow into a student of the same architecture at chosen *flow
points* (module names). At flow point l the student's next layer receives, instead of the student's
own output h_s^l::

    h^l = w_s^l * h_s^l + sum_j w_j^l * Q_j^l(h_{t_j}^l),    (w_s^l, w_1^l..w_m^l) = softmax(theta^l)

with Q_j^l a trainable 1x1 transform (a channel-mixing matrix plus bias) and theta^l learnable
scalars, one set per flow point. Training minimises::

    L = L_task + lambda1(t) * sum_l sum_j (w_j^l)^2,        lambda1(t) = lambda1 * t,  t in [0, 1]

so the teachers' weights are pushed to 0 ever harder as training proceeds (t is the engine's training
progress, given through ``set_training_progress``). At the end the teachers are dropped: the finalized
model is the student alone, a plain model of the zoo's architecture (:meth:`KnowledgeFlow.finalize`).

Choices the paper leaves open (ours, each can be changed by an option):

- Teachers: the *pretrained* zoo members, all of them (as in the paper, where teachers are pretrained
  models used as they are); ``teachers="finetuned"`` uses ``fitted["finetune"]`` instead. Teachers
  are frozen and run in eval mode (their BN statistics are their own).
- Student: a copy of zoo member ``student_member`` (default 0) with the task's new head.
- Flow points: ``layer1..layer4`` outputs for ResNet-like models (the input of each following stage /
  of the pooling head); any list of module names for other architectures. Teacher and student share
  the architecture, so the feature at a flow point has the same shape in both.
- Q_j initialised to the identity (zero bias) when channel counts agree: at the start the flow is a
  convex combination of the teachers' own features, which the student's next layer can already use.
  theta initialised to 0 (all weights 1/(m+1)).
- lambda1 grows linearly from 0 to ``lambda1`` (default 10). The mixing scalars get a larger learning
  rate (``mix_lr_mult``, default 10) and no weight decay: weight decay on theta would pull the weights
  back to uniform, and with the base rate the penalty's gradient on theta (of order 2/(m+1)^3 at the
  start) would barely move them.
- Teacher-free phase: from progress ``student_only_from`` (default 0.9) on, the teachers are switched
  off (w_s = 1) so the student -- its BatchNorm statistics in particular -- adapts to running alone
  before it is exported. Evaluation (eval mode) always runs the student alone, so validation-based
  model selection scores exactly the model that ``finalize`` returns.
- The paper's second term, lambda2 * KL(previous-iterate prediction || current prediction), is left
  out: it needs a copy of the previous iterate and a second forward per step (one more model in memory
  and compute), and its purpose -- that removing the teachers does not change the student's
  predictions abruptly -- is served here by the gradual lambda1 schedule, the teacher-free phase and
  selecting the best epoch on the student alone. (The paper's own train cost, 28.83 GFLOPs = 6 x 4.12
  for five teachers and the student + ~4.1 for the 1x1 transforms on ResNet-50's four stage outputs,
  leaves no room for an extra forward either.)

Cost: a training-mode forward runs every teacher up to the flow points and the student (paper:
28.83 GFLOPs train vs 4.12 inference for five ResNet-50 teachers); after ``finalize`` only the student.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zootune.errors import ZootuneError
from zootune.methods.finetune import check_member_index, copy_with_new_head
from zootune.methods.registry import MethodSpec, register_method
from zootune.models.heads import set_submodule
from zootune.tasks import Task

RESNET_FLOW_POINTS = ("layer1", "layer2", "layer3", "layer4")


class _TeacherFeaturesReached(Exception):
    """Raised from a hook to stop a teacher's forward once all flow-point features are captured."""


class ChannelTransform(nn.Module):
    """Q(h) = W h + b applied along dim 1 of a (B, C, ...) tensor: a 1x1 convolution for feature maps,
    a Linear for vectors."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        if in_channels == out_channels:
            nn.init.eye_(self.weight)
        else:
            nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() == 4:
            return F.conv2d(h, self.weight[:, :, None, None], self.bias)
        if h.dim() == 2:
            return F.linear(h, self.weight, self.bias)
        out = torch.einsum("oc,bc...->bo...", self.weight, h)
        return out + self.bias.view(1, -1, *([1] * (h.dim() - 2)))


class FlowPoint(nn.Module):
    """Wraps the student's module at a flow point: ``w_s * base_layer(x) + sum_j w_j * Q_j(h_tj)``.

    ``teacher_features`` is set by :class:`KnowledgeFlow` for one forward; when it is ``None`` the
    wrapper returns ``base_layer(x)`` unchanged (student alone, i.e. w_s = 1, w_j = 0).
    """

    def __init__(self, base_layer: nn.Module, student_channels: int, teacher_channels: int, num_teachers: int):
        super().__init__()
        self.base_layer = base_layer
        self.transforms = nn.ModuleList(
            ChannelTransform(teacher_channels, student_channels) for _ in range(num_teachers)
        )
        self.mix_logits = nn.Parameter(torch.zeros(num_teachers + 1))  # theta: [student, teacher_1..m]
        self.teacher_features: list[torch.Tensor] | None = None

    def mix_weights(self) -> torch.Tensor:
        """(w_s, w_1, ..., w_m) = softmax(theta)."""
        return torch.softmax(self.mix_logits, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        if self.teacher_features is None:
            return h
        w = self.mix_weights()
        out = w[0] * h
        for j, (transform, h_t) in enumerate(zip(self.transforms, self.teacher_features)):
            flowed = transform(h_t)
            if flowed.shape != h.shape:
                raise ZootuneError(
                    f"knowledge flow: teacher feature of shape {tuple(flowed.shape)} cannot flow into the "
                    f"student's {tuple(h.shape)}; teachers and student must share the architecture"
                )
            out = out + w[j + 1] * flowed
        return out


def output_channels(module: nn.Module) -> int:
    """Channels of a module's output, read from its last registered BatchNorm/Conv/Linear."""
    for sub in reversed(list(module.modules())):
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            return sub.num_features
        if isinstance(sub, nn.modules.conv._ConvNd):
            return sub.out_channels
        if isinstance(sub, nn.Linear):
            return sub.out_features
    raise ZootuneError(
        f"cannot tell the output channels of {type(module).__name__}; pass example_input=... to probe them"
    )


def probe_channels(model: nn.Module, names: Sequence[str], example_input: torch.Tensor) -> list[int]:
    """Channels (dim 1) of the outputs of ``names`` in one forward of ``example_input`` (eval mode)."""
    found: dict[str, int] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: found.__setitem__(name, out.shape[1])
        )
        for name in names
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [found[name] for name in names]


def default_flow_points(model: nn.Module) -> list[str]:
    modules = dict(model.named_modules())
    if all(name in modules for name in RESNET_FLOW_POINTS):
        return list(RESNET_FLOW_POINTS)
    raise ZootuneError(
        f"{type(model).__name__} has no layer1..layer4; name the flow points with flow_points=[...module names]"
    )


class KnowledgeFlow(nn.Module):
    """Student with teachers' features flowing in at ``flow_points``; see the module docstring."""

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[nn.Module],
        flow_points: Sequence[str] | None = None,
        lambda1: float = 10.0,
        mix_lr_mult: float = 10.0,
        student_only_from: float = 0.9,
        example_input: torch.Tensor | None = None,
    ):
        super().__init__()
        if len(teachers) == 0:
            raise ZootuneError("knowledge flow needs at least one teacher")
        if lambda1 < 0 or mix_lr_mult <= 0:
            raise ZootuneError("knowledge flow needs lambda1 >= 0 and mix_lr_mult > 0")
        self.flow_points = list(flow_points) if flow_points is not None else default_flow_points(student)
        if not self.flow_points:
            raise ZootuneError("knowledge flow needs at least one flow point")
        student_modules = dict(student.named_modules())
        for name in self.flow_points:
            if name not in student_modules or name == "":
                raise ZootuneError(f"flow point {name!r} is not a module of the student")
            for i, teacher in enumerate(teachers):
                if name not in dict(teacher.named_modules()):
                    raise ZootuneError(f"flow point {name!r} is not a module of teacher {i}")
        if example_input is not None:
            student_channels = probe_channels(student, self.flow_points, example_input)
            teacher_channels = probe_channels(teachers[0], self.flow_points, example_input)
        else:
            student_channels = [output_channels(student.get_submodule(n)) for n in self.flow_points]
            teacher_channels = [output_channels(teachers[0].get_submodule(n)) for n in self.flow_points]

        self.teachers = nn.ModuleList(teachers)
        for p in self.teachers.parameters():
            p.requires_grad_(False)
        self.teachers.eval()
        # Wrap the student's flow-point modules in place (the wrapper keeps the original as base_layer).
        for name, c_s, c_t in zip(self.flow_points, student_channels, teacher_channels):
            set_submodule(student, name, FlowPoint(student.get_submodule(name), c_s, c_t, len(teachers)))
        self.student = student
        self.lambda1 = float(lambda1)
        self.mix_lr_mult = float(mix_lr_mult)
        self.student_only_from = float(student_only_from)
        self.progress = 0.0

    # -- the engine's hooks -------------------------------------------------------------------------
    def set_training_progress(self, fraction: float) -> None:
        self.progress = float(fraction)

    def lambda1_at(self, fraction: float) -> float:
        """lambda1(t) = lambda1 * t."""
        return self.lambda1 * min(max(fraction, 0.0), 1.0)

    def teacher_penalty(self) -> torch.Tensor:
        """sum over flow points and teachers of w_j^2."""
        return sum(fp.mix_weights()[1:].pow(2).sum() for fp in self.flow_modules())

    def auxiliary_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.lambda1_at(self.progress) * self.teacher_penalty()

    def param_groups(self, base_lr: float) -> list[dict]:
        mix = [fp.mix_logits for fp in self.flow_modules()]
        mix_ids = {id(p) for p in mix}
        rest = [p for p in self.student.parameters() if p.requires_grad and id(p) not in mix_ids]
        return [
            {"params": rest, "lr": base_lr, "name": "student+transforms"},
            {"params": mix, "lr": base_lr * self.mix_lr_mult, "weight_decay": 0.0, "name": "flow weights"},
        ]

    def finalize(self) -> nn.Module:
        """The student alone: a copy with every flow point unwrapped back to its original module."""
        student = copy.deepcopy(self.student)
        for name in self.flow_points:
            set_submodule(student, name, student.get_submodule(name).base_layer)
        return student

    # -- forward ------------------------------------------------------------------------------------
    def flow_modules(self) -> list[FlowPoint]:
        return [self.student.get_submodule(name) for name in self.flow_points]

    def teachers_active(self) -> bool:
        return self.training and self.progress < self.student_only_from

    def train(self, mode: bool = True) -> "KnowledgeFlow":
        super().train(mode)
        self.teachers.eval()
        return self

    def teacher_features(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """features[l][j]: output of flow point l in teacher j (no gradient).

        Each teacher's forward stops as soon as every flow point has been reached: the layers after
        the last flow point (and the teacher's head) are never run.
        """
        features: list[list[torch.Tensor]] = [[] for _ in self.flow_points]
        with torch.no_grad():
            for j, teacher in enumerate(self.teachers):

                def capture(_module, _inputs, out, l):
                    features[l].append(out.detach())
                    if all(len(f) == j + 1 for f in features):
                        raise _TeacherFeaturesReached

                handles = [
                    teacher.get_submodule(name).register_forward_hook(
                        lambda m, i, out, l=l: capture(m, i, out, l)
                    )
                    for l, name in enumerate(self.flow_points)
                ]
                try:
                    teacher(x)
                except _TeacherFeaturesReached:
                    pass
                finally:
                    for handle in handles:
                        handle.remove()
                if any(len(f) != j + 1 for f in features):
                    raise ZootuneError(
                        f"teacher {j} did not run each flow point exactly once: {self.flow_points}"
                    )
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.teachers_active():
            return self.student(x)
        flow_modules = self.flow_modules()
        for fp, feats in zip(flow_modules, self.teacher_features(x)):
            fp.teacher_features = feats
        try:
            return self.student(x)
        finally:
            for fp in flow_modules:
                fp.teacher_features = None


def build(
    zoo: Sequence[nn.Module],
    task: Task,
    *,
    member=None,
    fitted=None,
    teachers: str = "pretrained",
    student_member: int | None = None,
    flow_points: Sequence[str] | None = None,
    lambda1: float = 10.0,
    mix_lr_mult: float = 10.0,
    student_only_from: float = 0.9,
    example_input: torch.Tensor | None = None,
    head_name: str | None = None,
) -> KnowledgeFlow:
    """Knowledge Flow from the zoo into a copy of member ``student_member`` with a new head."""
    index = check_member_index(zoo, student_member)
    student, _ = copy_with_new_head(zoo[index], task, head_name)
    if teachers == "pretrained":
        # Copies: the teachers are frozen (requires_grad off), which must not leak into the user's zoo.
        teacher_models = [copy.deepcopy(m) for m in zoo]
    elif teachers == "finetuned":
        if not fitted or "finetune" not in fitted:
            raise ZootuneError("teachers='finetuned' needs the fine-tuned members: run method 'finetune' first")
        teacher_models = list(fitted["finetune"])
    else:
        raise ZootuneError(f"teachers must be 'pretrained' or 'finetuned', got {teachers!r}")
    return KnowledgeFlow(
        student,
        teacher_models,
        flow_points=flow_points,
        lambda1=lambda1,
        mix_lr_mult=mix_lr_mult,
        student_only_from=student_only_from,
        example_input=example_input,
    )


register_method(
    MethodSpec(
        name="knowledge-flow",
        help="Knowledge Flow: frozen teachers' features flow into a student; teachers dropped at the end",
        build=build,
    )
)
