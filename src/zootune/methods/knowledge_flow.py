"""Knowledge Flow (Liu, Peng, Schwing, "Knowledge Flow: Improve Upon Your Teachers", ICLR 2019).

Frozen teachers' intermediate features flow into a student of the same architecture at chosen *flow
points* (module names). At flow point l the student's next layer receives, instead of the student's
own output h_s^l::

    h^l = w_s^l * h_s^l + sum_j w_j^l * Q_j^l(h_{t_j}^l),    (w_s^l, w_1^l..w_m^l) = softmax(theta^l)

with Q_j^l a trainable 1x1 transform (a channel-mixing matrix plus bias) and theta^l learnable
scalars, one set per flow point. Training minimises::

    L = L_task + lambda1(t) * sum_l sum_j (w_j^l)^2 + lambda2 * KL(p_prev(x) || p(x))
    lambda1(t) = lambda1 * t,  t in [0, 1]

so the teachers' weights are pushed to 0 ever harder as training proceeds (t is the engine's training
progress, given through ``set_training_progress``), while the second term keeps each step's prediction
p(x) = softmax(f_theta(x)) close to that of the previous iterate, p_prev(x) = softmax(f_theta_prev(x))
on the same batch (theta_prev: the parameters before the last optimizer step), so that taking the
teachers' weight away changes the student's predictions gradually. At the end the teachers are dropped: the finalized
model is the student alone, a plain model of the zoo's architecture (:meth:`KnowledgeFlow.finalize`).

Choices the paper leaves open (ours, each can be changed by an option):

- Teachers: the *pretrained* zoo members, all of them (as in the paper, where teachers are pretrained
  models used as they are); ``teachers="finetuned"`` uses ``fitted["finetune"]`` instead. Teachers
  are frozen and run in eval mode (their BN statistics are their own).
- Student: a copy of a pretrained zoo member with the task's new head: the member whose fine-tuned copy
  had the best validation metric when ``val_metrics`` is given (``zootune run`` passes them), else
  ``student_member`` (default 0) -- the same rule as distillation.
- Flow points: ``layer1..layer4`` outputs for ResNet-like models (the input of each following stage /
  of the pooling head); for timm models the last four modules of their ``feature_info`` (ConvNeXt's
  and BiT's stages, a ViT's last four blocks); any list of module names for other architectures. Teacher and student share
  the architecture, so the feature at a flow point has the same shape in both.
- Where the channels are: Q_j mixes channels, which are dim 1 of channels-first maps (B, C, H, W) but
  the last dim of token sequences (B, N, C) (ViT blocks) and of channels-last maps. The channel count
  C comes from the flow-point module's last layer (Conv, BatchNorm/GroupNorm, Linear, LayerNorm) or
  from the output probed with ``example_input``; the dim is the one of size C in the output (probed,
  else the first teacher feature), dim 1 or the last. When both have size C, the last layer decides
  (a Conv or a BatchNorm/GroupNorm: channels first; a Linear or LayerNorm: channels last);
  ``channel_dim=1`` or ``-1`` says it explicitly. An output with C at neither end is refused in one
  line, never guessed (a transform over the wrong dim would mix tokens, silently).
- Q_j initialised to the identity (zero bias) when channel counts agree: at the start the flow is a
  convex combination of the teachers' own features, which the student's next layer can already use
  (``transform_init="zero"`` starts with Q_j = 0 instead).
- Initial weights: ``build`` starts the student at w_s = ``initial_student_weight`` = 0.8 at every
  flow point (the teachers share 0.2 equally); ``None`` gives the uniform 1/(m+1) (theta = 0). With
  uniform weights the student's own features enter its next layer at 1/6 (five teachers): its later
  layers are trained on mostly teacher features and the student alone, which is what is exported,
  validated worse (defaults and measurements: docs/baselines.md).
- lambda1 grows linearly from 0 to ``lambda1`` (default 10): the teachers help early and are pushed
  out late; measured on the MiniZoo, the teachers' weights end at ~0.01 each (w_s ~0.95-0.99) before
  the teacher-free phase. lambda1 = 50 or an earlier teacher-free phase (0.7) validated no better. The mixing scalars get a larger learning
  rate (``mix_lr_mult``, default 10) and no weight decay: weight decay on theta would pull the weights
  back to uniform, and with the base rate the penalty's gradient on theta (of order 2/(m+1)^3 at the
  start) would barely move them.
- Teacher-free phase: from progress ``student_only_from`` (default 0.9) on, the teachers are switched
  off (w_s = 1) so the student -- its BatchNorm statistics in particular -- adapts to running alone
  before it is exported. Evaluation (eval mode) always runs the student alone, so validation-based
  model selection scores exactly the model that ``finalize`` returns.
- lambda2 term: the previous iterate is a copy of the student (flow points included) that is not a
  submodule (it is neither trained, nor saved, nor counted in the parameters); each training forward
  first runs it (no gradient, same teacher features, BatchNorm on batch statistics like the student)
  and then copies the current parameters and buffers into it. On the first step after construction
  (or after a resume) it equals the current student, so the term is 0. KL is over the softmax of the
  outputs, i.e. it assumes class logits: ``build`` uses ``lambda2`` only for classification tasks.
  It costs one more student forward per step (counted by the FLOP counter; the paper's 28.83 GFLOPs
  train cost, 6 x 4.12 + the 1x1 transforms, suggests its own implementation did not re-run the
  model). ``lambda2=0`` leaves it out (no copy, no extra forward). ``build``'s default 0.1 validated
  best of {0, 0.1, 1}.

Cost: a training-mode forward runs every teacher up to the flow points and the student (paper:
28.83 GFLOPs train vs 4.12 inference for five ResNet-50 teachers); after ``finalize`` only the student.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zootune.errors import ZootuneError
from zootune.methods.distill import pick_student_member
from zootune.methods.finetune import check_member_index, copy_with_new_head
from zootune.methods.registry import BuildContext, MethodSpec, register_method
from zootune.options import require
from zootune.layers.wrapper import LayerWrapper, replace_layer
from zootune.layers.wrapper import merge_and_unload as unload
from zootune.tasks import ClassificationTask

RESNET_FLOW_POINTS = ("layer1", "layer2", "layer3", "layer4")
LAMBDA2_DEFAULT = 0.1  # chosen on validation (docs/baselines.md)
INITIAL_STUDENT_WEIGHT_DEFAULT = 0.8  # likewise


class _TeacherFeaturesReached(Exception):
    """Raised from a hook to stop a teacher's forward once all flow-point features are captured."""


class ChannelTransform(nn.Module):
    """Q(h) = W h + b applied along the channel dim: dim 1 of a (B, C, ...) tensor (a 1x1 convolution
    for feature maps, a Linear for vectors) or, with ``channel_dim=-1``, the last dim of (B, ..., C)
    tokens. ``init="identity"``: W = I when the channel counts agree (else Kaiming uniform);
    ``init="zero"``: W = 0 (the teacher adds nothing until Q is learned)."""

    def __init__(self, in_channels: int, out_channels: int, init: str = "identity", channel_dim: int = 1):
        super().__init__()
        self.channel_dim = channel_dim
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        if init == "zero":
            nn.init.zeros_(self.weight)
        elif init != "identity":
            raise ZootuneError(f"transform_init must be 'identity' or 'zero', got {init!r}")
        elif in_channels == out_channels:
            nn.init.eye_(self.weight)
        else:
            nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.channel_dim == -1:
            return F.linear(h, self.weight, self.bias)
        if h.dim() == 4:
            return F.conv2d(h, self.weight[:, :, None, None], self.bias)
        if h.dim() == 2:
            return F.linear(h, self.weight, self.bias)
        out = torch.einsum("oc,bc...->bo...", self.weight, h)
        return out + self.bias.view(1, -1, *([1] * (h.dim() - 2)))


class FlowPoint(LayerWrapper):
    """Wraps the student's module at a flow point: ``w_s * base_layer(x) + sum_j w_j * Q_j(h_tj)``.

    ``teacher_features`` is set by :class:`KnowledgeFlow` for one forward; when it is ``None`` the
    wrapper returns ``base_layer(x)`` unchanged (student alone, i.e. w_s = 1, w_j = 0).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        student_channels: int,
        teacher_channels: int,
        num_teachers: int,
        initial_student_weight: float | None = None,
        transform_init: str = "identity",
        channel_dim: int | None = 1,
        layer_hint: int | None = None,
    ):
        super().__init__()
        self.base_layer = base_layer
        # None: found from the first teacher feature (the dim of size teacher_channels)
        self.channel_dim = channel_dim
        self.layer_hint = layer_hint
        self.transforms = nn.ModuleList(
            ChannelTransform(teacher_channels, student_channels, transform_init, channel_dim or 1)
            for _ in range(num_teachers)
        )
        self.mix_logits = nn.Parameter(torch.zeros(num_teachers + 1))  # theta: [student, teacher_1..m]
        if initial_student_weight is not None:
            # theta_s = log(w_s m / (1 - w_s)) and theta_j = 0 give w_s exactly, the teachers (1 - w_s)/m each.
            w_s = float(initial_student_weight)
            with torch.no_grad():
                self.mix_logits[0] = math.log(w_s * num_teachers / (1.0 - w_s))
        self.teacher_features: list[torch.Tensor] | None = None

    def merge(self) -> nn.Module:
        """The student's own module (a copy): the teachers' flow goes away with the wrapper."""
        return copy.deepcopy(self.base_layer)

    def set_channel_dim(self, dim: int) -> None:
        self.channel_dim = dim
        for transform in self.transforms:
            transform.channel_dim = dim

    def mix_weights(self) -> torch.Tensor:
        """(w_s, w_1, ..., w_m) = softmax(theta)."""
        return torch.softmax(self.mix_logits, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        if self.teacher_features is None:
            return h
        w = self.mix_weights()
        out = w[0] * h
        if self.channel_dim is None:
            self.set_channel_dim(locate_channels(tuple(self.teacher_features[0].shape),
                                                 self.transforms[0].weight.shape[1], self.layer_hint))
        for j, (transform, h_t) in enumerate(zip(self.transforms, self.teacher_features)):
            if h_t.dim() < 2 or h_t.shape[self.channel_dim] != transform.weight.shape[1]:
                raise ZootuneError(
                    f"knowledge flow: a teacher feature of shape {tuple(h_t.shape)} has not "
                    f"{transform.weight.shape[1]} channels at dim {self.channel_dim}; pass example_input=... "
                    "or channel_dim=1 (channels first) / -1 (channels last, tokens)")
            flowed = transform(h_t)
            if flowed.shape != h.shape:
                raise ZootuneError(
                    f"knowledge flow: teacher feature of shape {tuple(flowed.shape)} cannot flow into the "
                    f"student's {tuple(h.shape)}; teachers and student must share the architecture"
                )
            out = out + w[j + 1] * flowed
        return out


def previous_iterate_kl(previous_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(previous_logits) || softmax(logits)), averaged over the batch (the lambda2 term)."""
    log_p_prev = F.log_softmax(previous_logits, dim=1)
    log_p = F.log_softmax(logits, dim=1)
    return (log_p_prev.exp() * (log_p_prev - log_p)).sum(dim=1).mean()


def output_layout(module: nn.Module) -> tuple[int, int] | None:
    """(channels, channel dim) of a module's output, read from its last registered layer that says:
    BatchNorm/GroupNorm/Conv -> (C, 1), channels first; Linear/LayerNorm -> (C, -1), channels last
    (tokens). None when no such layer is found."""
    for sub in reversed(list(module.modules())):
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            return sub.num_features, 1
        if isinstance(sub, nn.GroupNorm):
            return sub.num_channels, 1
        if isinstance(sub, nn.modules.conv._ConvNd):
            return sub.out_channels, 1
        if isinstance(sub, nn.Linear):
            return sub.out_features, -1
        if isinstance(sub, nn.LayerNorm) and len(sub.normalized_shape) == 1:
            return sub.normalized_shape[0], -1
    return None


def output_channels(module: nn.Module) -> int:
    """Channels of a module's output, read from its last registered BatchNorm/Conv/Linear/norm layer."""
    layout = output_layout(module)
    if layout is None:
        raise ZootuneError(
            f"cannot tell the output channels of {type(module).__name__}; pass example_input=... to probe them"
        )
    return layout[0]


def locate_channels(shape: tuple[int, ...], channels: int, hint: int | None = None) -> int:
    """The channel dim (1 or -1) of an output of ``shape`` with ``channels`` channels: the end of size
    ``channels``; when both ends have it, ``hint`` (the last layer's kind) decides."""
    if len(shape) == 2 and shape[1] == channels:
        return 1
    first, last = len(shape) > 2 and shape[1] == channels, len(shape) > 2 and shape[-1] == channels
    if first and last and hint is not None:
        return hint
    if first != last:
        return 1 if first else -1
    raise ZootuneError(
        f"knowledge flow: cannot tell where the {channels} channels are in a feature of shape {shape} "
        + ("(both dim 1 and the last have that size)" if first else "(neither dim 1 nor the last has that size)")
        + "; pass channel_dim=1 (channels first) or -1 (channels last, tokens), or another flow point")


def _layout(name: str, module: nn.Module, shape: tuple[int, ...] | None,
            forced: int | None) -> tuple[int, int | None, int | None]:
    """(channels, channel dim -- None: decided on the first teacher feature --, the last layer's hint)."""
    layer = output_layout(module)
    hint = layer[1] if layer is not None else None
    if shape is None:
        if layer is None:
            raise ZootuneError(f"flow point {name!r}: cannot tell the output channels of {type(module).__name__} "
                               "(no Conv/Linear/norm layer in it); pass example_input=... to probe them")
        return layer[0], forced, hint
    if forced is not None:
        return shape[forced], forced, hint
    if len(shape) == 2:
        return shape[1], 1, hint
    if layer is None and len(shape) == 4:
        return shape[1], 1, hint  # a feature map and no layer to say otherwise: channels first
    if layer is None or layer[0] not in (shape[1], shape[-1]):
        raise ZootuneError(
            f"flow point {name!r}: cannot tell where the channels are in its output of shape {shape}"
            + (f" (its last layer has {layer[0]})" if layer is not None else "")
            + "; pass channel_dim=1 (channels first) or -1 (channels last, tokens)")
    return layer[0], locate_channels(shape, layer[0], hint), hint


def probe_shapes(model: nn.Module, names: Sequence[str], example_input: torch.Tensor) -> list[tuple[int, ...]]:
    """Shapes of the outputs of ``names`` in one forward of ``example_input`` (eval mode)."""
    found: dict[str, tuple[int, ...]] = {}

    def keep(name, out):
        if not isinstance(out, torch.Tensor):
            raise ZootuneError(f"flow point {name!r} returns a {type(out).__name__}, not a tensor; choose "
                               "a module whose output is one feature tensor")
        found[name] = tuple(out.shape)

    handles = [
        model.get_submodule(name).register_forward_hook(lambda _m, _i, out, name=name: keep(name, out))
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
    missing = [name for name in names if name not in found]
    if missing:
        raise ZootuneError(f"flow point {missing[0]!r} is never called by the model's forward")
    return [found[name] for name in names]


def probe_channels(model: nn.Module, names: Sequence[str], example_input: torch.Tensor) -> list[int]:
    """Channels (dim 1) of the outputs of ``names`` in one forward of ``example_input`` (eval mode)."""
    return [shape[1] for shape in probe_shapes(model, names, example_input)]


def default_flow_points(model: nn.Module) -> list[str]:
    """``layer1..layer4`` of a ResNet; for a timm model the last four of the modules its
    ``feature_info`` lists (stage outputs; a ViT's last four blocks)."""
    modules = dict(model.named_modules())
    if all(name in modules for name in RESNET_FLOW_POINTS):
        return list(RESNET_FLOW_POINTS)
    listed = [info.get("module") for info in getattr(model, "feature_info", None) or [] if isinstance(info, dict)]
    listed = [name for name in listed if name and name in modules]
    if listed:
        return listed[-4:]
    raise ZootuneError(
        f"{type(model).__name__} has no layer1..layer4; name the flow points with flow_points=[...module names]"
    )


def _mark_previous_stale(module: "KnowledgeFlow", _incompatible_keys) -> None:
    module._previous_stale = True


def _check_arguments(teachers: Sequence[nn.Module], lambda1: float, lambda2: float, mix_lr_mult: float,
                     initial_student_weight: float | None, channel_dim: int | None) -> None:
    if channel_dim not in (None, 1, -1):
        raise ZootuneError(f"channel_dim must be 1 (channels first), -1 (channels last) or None, got {channel_dim!r}")
    if len(teachers) == 0:
        raise ZootuneError("knowledge flow needs at least one teacher")
    if lambda1 < 0 or lambda2 < 0 or mix_lr_mult <= 0:
        raise ZootuneError("knowledge flow needs lambda1 >= 0, lambda2 >= 0 and mix_lr_mult > 0")
    if initial_student_weight is not None and not 0.0 < initial_student_weight < 1.0:
        raise ZootuneError(f"initial_student_weight must be in (0, 1), got {initial_student_weight}")


def _checked_flow_points(student: nn.Module, teachers: Sequence[nn.Module],
                         flow_points: Sequence[str] | None) -> list[str]:
    """``flow_points`` (default: :func:`default_flow_points` of the student), each a module of the
    student and of every teacher."""
    names = list(flow_points) if flow_points is not None else default_flow_points(student)
    if not names:
        raise ZootuneError("knowledge flow needs at least one flow point")
    student_modules = dict(student.named_modules())
    for name in names:
        if name not in student_modules or name == "":
            raise ZootuneError(f"flow point {name!r} is not a module of the student")
        for i, teacher in enumerate(teachers):
            if name not in dict(teacher.named_modules()):
                raise ZootuneError(f"flow point {name!r} is not a module of teacher {i}")
    return names


def _flow_point_layouts(student: nn.Module, teacher: nn.Module, flow_points: Sequence[str],
                        example_input: torch.Tensor | None, channel_dim: int | None) -> list[list[tuple]]:
    """Per model (the student, then the teacher), per flow point: (channels, dim or None, the last
    layer's hint), traced on ``example_input`` when given."""
    layouts = []
    for model in (student, teacher):
        shapes = (probe_shapes(model, flow_points, example_input) if example_input is not None
                  else [None] * len(flow_points))
        layouts.append([_layout(name, model.get_submodule(name), shape, channel_dim)
                        for name, shape in zip(flow_points, shapes)])
    return layouts


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
        lambda2: float = 0.0,
        initial_student_weight: float | None = None,
        transform_init: str = "identity",
        channel_dim: int | None = None,
    ):
        super().__init__()
        _check_arguments(teachers, lambda1, lambda2, mix_lr_mult, initial_student_weight, channel_dim)
        self.flow_points = _checked_flow_points(student, teachers, flow_points)
        layouts = _flow_point_layouts(student, teachers[0], self.flow_points, example_input, channel_dim)
        self.teachers = nn.ModuleList(teachers)
        for p in self.teachers.parameters():
            p.requires_grad_(False)
        self.teachers.eval()
        # Wrap the student's flow-point modules in place (the wrapper keeps the original as base_layer).
        for name, (c_s, _, _), (c_t, dim, hint) in zip(self.flow_points, *layouts):
            flow_point = FlowPoint(
                student.get_submodule(name), c_s, c_t, len(teachers), initial_student_weight, transform_init, dim, hint
            )
            replace_layer(student, name, flow_point)
        self.student = student
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)
        self.mix_lr_mult = float(mix_lr_mult)
        self.student_only_from = float(student_only_from)
        self.progress = 0.0
        # The previous iterate for the lambda2 term; kept in a list so that nn.Module does not register
        # it (it must not be trained, saved in the state_dict, or counted as a parameter).
        self._previous: list[nn.Module] = [copy.deepcopy(student)] if self.lambda2 > 0 else []
        self._previous_logits: torch.Tensor | None = None
        self._previous_stale = False
        # Loading a state_dict (e.g. resuming) replaces the student: its previous iterate is unknown,
        # so the next step starts the comparison afresh (term 0) instead of using stale weights.
        self.register_load_state_dict_post_hook(_mark_previous_stale)

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
        loss = self.lambda1_at(self.progress) * self.teacher_penalty()
        previous, self._previous_logits = self._previous_logits, None
        if self.lambda2 > 0 and previous is not None:
            loss = loss + self.lambda2 * previous_iterate_kl(previous, outputs)
        return loss

    def param_groups(self, base_lr: float) -> list[dict]:
        mix = [fp.mix_logits for fp in self.flow_modules()]
        mix_ids = {id(p) for p in mix}
        rest = [p for p in self.student.parameters() if p.requires_grad and id(p) not in mix_ids]
        return [
            {"params": rest, "lr": base_lr, "name": "student+transforms"},
            {"params": mix, "lr": base_lr * self.mix_lr_mult, "weight_decay": 0.0, "name": "flow weights"},
        ]

    def merge_and_unload(self) -> nn.Module:
        """The student alone: a plain copy with every flow point back to its (trained) module."""
        return unload(self.student)

    def finalize(self) -> nn.Module:
        return self.merge_and_unload()

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
        tracks_previous = self.training and self.lambda2 > 0
        if not self.teachers_active():
            if tracks_previous:
                self._previous_logits = self._run_previous(x, None)
            return self.student(x)
        features = self.teacher_features(x)
        if tracks_previous:
            self._previous_logits = self._run_previous(x, features)
        flow_modules = self.flow_modules()
        for fp, feats in zip(flow_modules, features):
            fp.teacher_features = feats
        try:
            return self.student(x)
        finally:
            for fp in flow_modules:
                fp.teacher_features = None

    def _run_previous(self, x: torch.Tensor, features: list[list[torch.Tensor]] | None) -> torch.Tensor:
        """Logits of the previous iterate on ``x`` (no gradient); then make the current parameters the
        previous iterate of the next step."""
        previous = self._previous[0]
        reference = next(self.student.parameters())
        if next(previous.parameters()).device != reference.device:
            previous.to(reference.device)
        if self._previous_stale:
            self._copy_into_previous()
            self._previous_stale = False
        previous.train(self.student.training)
        flow_modules = [previous.get_submodule(name) for name in self.flow_points]
        with torch.no_grad():
            for fp, feats in zip(flow_modules, features or [None] * len(flow_modules)):
                fp.teacher_features = feats
            try:
                logits = previous(x)
            finally:
                for fp in flow_modules:
                    fp.teacher_features = None
        self._copy_into_previous()
        return logits.detach()

    def _copy_into_previous(self) -> None:
        with torch.no_grad():
            for old, new in zip(self._previous[0].state_dict().values(), self.student.state_dict().values()):
                old.copy_(new)


@dataclass
class KnowledgeFlowConfig:
    """Options of ``knowledge-flow`` (see the module docstring for each choice)."""

    teachers: Literal["pretrained", "finetuned"] = "pretrained"
    student_member: int | None = None  # default: the best fine-tuned member on validation, else 0
    flow_points: list[str] | None = None  # module names; default: the ResNet stages, or a timm model's feature_info
    lambda1: float = 10.0
    mix_lr_mult: float = 10.0
    student_only_from: float = 0.9
    head_name: str | None = None
    lambda2: float = LAMBDA2_DEFAULT
    initial_student_weight: float | None = INITIAL_STUDENT_WEIGHT_DEFAULT
    transform_init: Literal["identity", "zero"] = "identity"
    channel_dim: int | None = None  # None: located from the features; 1 channels first; -1 tokens

    def __post_init__(self):
        require(self.channel_dim in (None, 1, -1),
                f"channel_dim must be 1 (channels first), -1 (channels last) or None, got {self.channel_dim!r}")
        require(self.lambda1 >= 0, f"lambda1 must be >= 0, got {self.lambda1}")
        require(self.lambda2 >= 0, f"lambda2 must be >= 0, got {self.lambda2}")
        require(self.mix_lr_mult > 0, f"mix_lr_mult must be > 0, got {self.mix_lr_mult}")
        require(0.0 <= self.student_only_from <= 1.0, f"student_only_from must be in [0, 1], got {self.student_only_from}")
        require(self.initial_student_weight is None or 0.0 < self.initial_student_weight < 1.0,
                f"initial_student_weight must be in (0, 1), got {self.initial_student_weight}")


def build(ctx: BuildContext) -> KnowledgeFlow:
    """Knowledge Flow from the zoo into a copy of a pretrained member with a new head: the best by
    ``ctx.member_val_metrics`` (fine-tuned members' validation metrics) when known, else
    ``student_member``. The example input that traces the flow points' shapes is a few training
    images when ``ctx.data`` is given."""
    config, task, zoo = ctx.config or KnowledgeFlowConfig(), ctx.task, ctx.zoo
    index = pick_student_member(len(zoo), ctx.member_val_metrics, task.higher_is_better, config.student_member)
    student, _ = copy_with_new_head(zoo[check_member_index(zoo, index)], task, config.head_name)
    if config.teachers == "pretrained":
        # Copies: the teachers are frozen (requires_grad off), which must not leak into the user's zoo.
        teacher_models = [copy.deepcopy(m) for m in zoo]
    else:
        teacher_models = list(ctx.required("finetune"))
    example_input = None
    if ctx.data is not None:
        train = ctx.data.train
        example_input = torch.stack([train[i][0] for i in range(min(2, len(train)))])
    return KnowledgeFlow(
        student,
        teacher_models,
        flow_points=config.flow_points,
        lambda1=config.lambda1,
        mix_lr_mult=config.mix_lr_mult,
        student_only_from=config.student_only_from,
        example_input=example_input,
        # KL between softmaxes is meaningful for class logits only.
        lambda2=config.lambda2 if isinstance(task, ClassificationTask) else 0.0,
        initial_student_weight=config.initial_student_weight,
        transform_init=config.transform_init,
        channel_dim=config.channel_dim,
    )


register_method(
    MethodSpec(
        name="knowledge-flow",
        help="Knowledge Flow: frozen teachers' features flow into a student; teachers dropped at the end",
        build=build,
        plain_model=True,
        config=KnowledgeFlowConfig,
    )
)
