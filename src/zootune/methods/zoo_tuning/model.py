"""Zoo-Tuning and Lite Zoo-Tuning as one ``nn.Module`` built from a zoo of same-architecture models.

Shu, Kou, Cao, Wang, Long. "Zoo-Tuning: Adaptive Transfer from a Zoo of Models", ICML 2021.
Every targeted layer l of a copy of member 0 is replaced in place (PEFT-style) by an
:class:`~zootune.layers.AggregatedLayer` computing, per sample b,

    y_b = (sum_i a_i^l(h_b) T_i^l W_i^l) * h_b,

with all m source kernels W_i^l trainable, channel alignment T_i^l and a gate a^l on the layer's own
input. Norm layers are not aggregated: their affine parameters are the mean over the sources and
their running statistics are reset (0 mean, unit variance) to be re-estimated on the target data.
Every other parameter that is not targeted (and not the head) is the mean over the sources too.
The head is replaced by the new target head.

Which layers are aggregated, which are averaged and why is in :attr:`ZooTuning.report` (an
:class:`AggregationReport`, also logged); a warning says when most of the model's parameters are
only averaged (a ViT with the default convolution targets aggregates its patch embedding alone).
Left out by default, with the reason in the report: layers whose parent reads their ``.weight``
directly instead of calling them (``nn.MultiheadAttention.out_proj``: the attention's functional
forward uses the tensor, so an aggregation layer in its place is never called), and convolution
subclasses with a forward that is not a known variant of the plain one (:mod:`zootune.layers.variants`). Lite Zoo-Tuning (``lite=True``) shares one gate per
batch in training and folds into a plain model of the zoo's architecture (``merge_and_unload``).

Learning rates (our addition; the paper trains every parameter at one rate for 15k iterations).
When a normalisation layer follows an aggregated layer, the output is invariant to the scale of the
aggregated kernel W^ = sum_i a_i T_i W_i, and SGD's effective (angular) step on W^ relative to a
plain layer's step on one source kernel W is

    rho = (sum_i a_i^2 ||W_i||^2) / ||sum_i a_i W_i||^2  ->  (sum_i ||W_i||^2) / ||sum_i W_i||^2  (equal gates)

which is 1 for uncorrelated sources and 1/m for identical ones: aggregating a zoo of similar models
(the paper's detection/segmentation backbones all start from one ImageNet model; the MiniZoo's
members share an initialisation too) trains the aggregated kernel up to m times more slowly than
fine-tuning one of them. With ``bank_lr_scale="auto"`` the bank and the alignment of such a layer
get the learning rate base_lr / rho, measured once at construction; m identical sources then train
exactly like one fine-tuned source (tested). Layers not followed by a normalisation layer keep
base_lr. The gates are new, randomly initialised parameters and get ``gate_lr_scale`` x base_lr.

The two other trained factors of the kernel, preconditioned (``gate_lr_scale="auto"``,
``align_lr_scale="auto"``; the robust variant's default with a start member). A gradient step on a
factor moves the kernel further than the same step on the kernel itself, by the factor's Jacobian:

    T_i:  Δ(T_i W_i) = -lr G W_i^T W_i     ~ (||W_i||_F^2 / out) x a plain step  ->  lr_T = lr_W · min_i out / ||W_i||_F^2
    a_i:  ΔW^ = Δa_i W_i,  Δa_i ∝ <G, W_i>  ~ ||W_i||_F^2 x a plain step       ->  lr_a = base_lr / mean_i ||W_i||_F^2

(G: the kernel's gradient). Unscaled, at lr 0.1 both moved the aggregated kernel several times
further per step than fine-tuning moves a kernel, and the gates (the larger, ||W||_F^2 up to ~190 on
the MiniZoo) swung the per-input kernels so far that the eval-mode loss, with BatchNorm's running
statistics lagging, reached 10^3 after 10 steps where fine-tuning the same start member stayed at 5
(docs/dev-notes/zoo-tuning.md). With the gates and alignments frozen the robust start trains exactly
as fine-tuning its start member (tested step for step).

Variants. ``variant="paper"`` is the method above (with the two training choices of ours measured
earlier: the gate's output layer at zero, the per-layer bank learning rate); its outputs equal those
of the release before the robust variant (tested). ``variant="robust"`` (the default) differs only
when it is given a ranking of the members (``member_scores``, higher = better, e.g. from
:func:`zootune.methods.zoo_tuning.start.score_members`; or ``start_member``):

    s = argmax_i score_i                                        the start member
    kept = {i : score_i >= score_s - prune_margin}              (prune_margin = inf: every member)
    a_i(h) = [i = s] + tanh(V relu(U pool(h)) + c)_i,   V = 0, c = 0 at the start

and every untargeted parameter and buffer -- norm affine AND running statistics -- is member s's.
So step 0 computes exactly member s with the new head (train and eval mode; Lite folded too); the
other members enter with weights of either sign, bounded by the tanh, only as far as the gradient
finds them useful; the gates and alignments train at the preconditioned rates above. Why (measured in
docs/dev-notes/zoo-tuning.md): from the paper's start -- every member at gate 1/2, the mean of the
members' norm affine -- a zoo with one good member and several harmful ones starts as (and stays
near) the harmful majority: the gates hardly move in a few hundred steps, whatever their learning
rate or activation. Without a ranking the robust variant starts like the paper's.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import logging
import math
import warnings
import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from zootune.errors import ZootuneError, ZooMismatchError
from zootune.layers import AggregatedLayer, is_aggregatable
from zootune.methods.zoo_tuning import io as zt_io
from zootune.methods.zoo_tuning.options import NORM_INITS, ZooTuningOptions
from zootune.layers.gate import GATE_ACTIVATIONS
from zootune.layers.targets import resolve_layer_types
from zootune.models.heads import find_head_name, head_in_features, new_linear_head, replace_head, set_submodule

log = logging.getLogger(__name__)

# Parents that read a child layer's tensors directly instead of calling it: replacing the child by
# an aggregation layer would break (or silently bypass) them. {parent type: (child, why)}.
_READS_CHILD_WEIGHT: dict[type, tuple[str, str]] = {
    nn.MultiheadAttention: ("out_proj", "nn.MultiheadAttention reads out_proj.weight directly "
                                        "(F.multi_head_attention_forward), never calling the layer"),
}
COVERAGE_WARNING_FRACTION = 0.5  # warn when less than this share of the parameters is aggregated
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_CONV_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_HOMOGENEOUS_TYPES = (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                      nn.AvgPool3d, nn.Identity, nn.Dropout)
DEFAULT_GATE_LR_SCALE = 5.0  # chosen on the MiniZoo targets' validation splits (docs/dev-notes/zoo-tuning.md)
# The robust variant's defaults (chosen by measurement: docs/dev-notes/zoo-tuning.md)
ROBUST_GATE = "tanh"
ROBUST_OFF_GATE = 0.05
ROBUST_PRUNE_MARGIN = math.inf
ROBUST_LR_SCALE = "auto"  # the gates' and alignments' rates, preconditioned (module docstring)


@dataclass
class ZooTuningConfig:
    """What a :class:`ZooTuning` model was built with: its options as resolved (the variant's defaults
    filled in, the start and the kept members chosen) and what was measured on the zoo (``lr_scales``,
    the aggregated layers). A record: the model is rebuilt from :meth:`ZooTuning.rebuild_options`."""

    num_sources: int
    variant: str = "paper"
    member_scores: list[float] | None = None  # as given, one per zoo member (before pruning)
    kept_members: list[int] | None = None  # zoo indices of the aggregated members (after pruning)
    num_zoo_members: int | None = None
    start_member: int | None = None  # index among the kept members; None: the uniform start
    off_gate: float | None = None
    norm_init: str = "mean"
    lite: bool = False
    align: str = "kernel>1"
    gate: str = "sigmoid"
    gate_init: str = "zero"
    keep_bn_stats: bool = False
    lite_momentum: float = 0.9
    formulation: str = "auto"
    bank_lr_scale: str | float | dict[str, float] = "auto"  # as given (the measured multipliers: lr_scales)
    gate_lr_scale: str | float | dict[str, float] = DEFAULT_GATE_LR_SCALE  # as resolved for the variant
    align_lr_scale: str | float | dict[str, float] = 1.0  # as resolved for the variant
    align_weight_decay: float | None = None  # None: the optimizer's
    lr_scales: dict[str, float] = field(default_factory=dict)  # per aggregated layer, as measured
    gate_lr_scales: dict[str, float] = field(default_factory=dict)  # per aggregated layer
    align_lr_scales: dict[str, float] = field(default_factory=dict)  # per aggregated layer (x its lr_scale)
    target_types: list[str] = field(default_factory=lambda: ["Conv1d", "Conv2d"])
    include: list[str] | None = None
    exclude: list[str] | None = None
    head_name: str | None = None
    aggregated_layers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


_UNTARGETED_ACTIONS = ("averaged", "copied")  # what LayerChoice.action says of a module not aggregated


@dataclass(frozen=True)
class LayerChoice:
    """What Zoo-Tuning did with one module that has parameters of its own."""

    name: str
    kind: str  # the module's class name
    parameters: int  # its own parameters (one member's)
    # "aggregated"; "averaged" (mean over the sources) or "copied" (from the start member, with its
    # buffers: norm_init="start"); or "new head"
    action: str
    reason: str = ""  # why it is not aggregated, and for a norm layer what its affine and statistics are


@dataclass
class AggregationReport:
    """Every module with parameters of its own, in registration order: aggregated; not aggregated
    (and why), then averaged over the sources or, with ``start_member``, copied from that member; or
    the head replaced by the new one."""

    layers: list[LayerChoice]
    num_sources: int
    model: str
    start_member: int | None = None  # zoo index of the member the untargeted modules are copied from

    def of(self, action: str) -> list[LayerChoice]:
        return [layer for layer in self.layers if layer.action == action]

    @property
    def aggregated(self) -> list[str]:
        return [layer.name for layer in self.of("aggregated")]

    @property
    def averaged(self) -> dict[str, str]:
        """{module name: why it is averaged instead of aggregated}."""
        return {layer.name: layer.reason for layer in self.of("averaged")}

    @property
    def untargeted(self) -> dict[str, str]:
        """{module name: why it is not aggregated}, averaged or copied from the start member."""
        return {layer.name: layer.reason for layer in self.layers if layer.action in _UNTARGETED_ACTIONS}

    def aggregated_fraction(self) -> float:
        """Share of the model's parameters (head excluded) in aggregated layers."""
        body = sum(layer.parameters for layer in self.layers if layer.action != "new head")
        return sum(layer.parameters for layer in self.of("aggregated")) / body if body else 0.0

    def untargeted_by_reason(self) -> dict[str, list[LayerChoice]]:
        """The modules not aggregated, grouped by reason, the group with the most parameters first."""
        groups: dict[str, list[LayerChoice]] = {}
        for layer in self.layers:
            if layer.action in _UNTARGETED_ACTIONS:
                groups.setdefault(layer.reason, []).append(layer)
        return dict(sorted(groups.items(), key=lambda item: -sum(layer.parameters for layer in item[1])))

    @property
    def untargeted_source(self) -> str:
        """What the modules that are not aggregated hold: the sources' mean or the start member's."""
        if self.start_member is None:
            return "averaged over the sources"
        return f"copied from the start member (zoo member {self.start_member})"

    def summary(self) -> str:
        """A few lines: how much is aggregated, and each reason for not aggregating with its layers
        and what they hold instead."""
        aggregated = self.of("aggregated")
        lines = [f"Zoo-Tuning on {self.model} ({self.num_sources} sources): {len(aggregated)} layer(s) "
                 f"aggregated, {_millions(sum(l.parameters for l in aggregated))} parameters, "
                 f"{100 * self.aggregated_fraction():.1f}% of the model (head excluded)"]
        for reason, layers in self.untargeted_by_reason().items():
            lines.append(f"  {self.untargeted_source}, {_millions(sum(l.parameters for l in layers))} parameters in "
                         f"{len(layers)} module(s) ({_names(layers)}): {reason}")
        heads = self.of("new head")
        if heads:
            lines.append(f"  new head: {', '.join(l.name for l in heads)}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"model": self.model, "num_sources": self.num_sources, "start_member": self.start_member,
                "aggregated_fraction": self.aggregated_fraction(), "layers": [asdict(l) for l in self.layers]}

    def __str__(self) -> str:
        return self.summary()


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 10_000 else str(count)


def _names(layers: list[LayerChoice], shown: int = 3) -> str:
    names = [layer.name for layer in layers[:shown]]
    return ", ".join(names) + (f", ... {len(layers) - shown} more" if len(layers) > shown else "")


def _norm_reason(module: nn.Module, keep_bn_stats: bool, start_member: int | None) -> str:
    """What a norm layer holds: the sources' mean affine and reset (or mean) running statistics, or
    with a start member (norm_init="start") that member's affine and running statistics."""
    reason = "normalisation layer (the paper aggregates convolutions only): "
    statistics = getattr(module, "track_running_stats", False)
    if start_member is not None:
        what = "affine and running statistics" if statistics else "affine"
        return reason + f"{what} = the start member's (zoo member {start_member})"
    reason += "affine = mean over the sources"
    if statistics:
        reason += (", running statistics kept (mean over the sources)" if keep_bn_stats
                   else ", running statistics reset (re-estimated on the target data)")
    return reason


def _choose_layers(model: nn.Module, target_types: tuple[type, ...], include, exclude, is_head,
                   keep_bn_stats: bool, start_member: int | None = None) -> list[LayerChoice]:
    """One :class:`LayerChoice` per module with own parameters, and per targeted-type layer; the
    modules not aggregated are averaged, or copied from ``start_member`` (a zoo index) when given."""
    modules = dict(model.named_modules())
    type_names = "/".join(t.__name__ for t in target_types)
    choices = []
    for name, module in modules.items():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if not name or (not own and not isinstance(module, target_types)):
            continue
        kind = type(module).__name__
        if is_head(name):  # the head and its submodules: replaced as a whole
            if not any(is_head(choice.name) for choice in choices):
                head_name = next(n for n in modules if is_head(n))
                head = modules[head_name]
                choices.append(LayerChoice(head_name, type(head).__name__, sum(p.numel() for p in head.parameters()),
                                           "new head", "replaced by the task's head"))
            continue
        parent = modules[name.rpartition(".")[0]]
        child = name.rpartition(".")[2]
        reads = next((why for cls, (attr, why) in _READS_CHILD_WEIGHT.items()
                      if isinstance(parent, cls) and child == attr), None)
        if isinstance(module, target_types):
            if reads is not None:
                reason = reads
            elif not is_aggregatable(module):
                reason = (f"{kind} subclasses {next(t.__name__ for t in target_types if isinstance(module, t))} "
                          "with its own forward, not a known variant (zootune.layers.variants)")
            elif include is not None and not _matches(name, include):
                reason = f"not matched by include={include}"
            elif _matches(name, exclude):
                reason = f"excluded by exclude={exclude}"
            else:
                choices.append(LayerChoice(name, kind, own, "aggregated"))
                continue
        elif isinstance(module, _NORM_TYPES):
            reason = _norm_reason(module, keep_bn_stats, start_member)
        elif isinstance(module, (nn.Linear, *_CONV_LAYER_TYPES)):
            reason = (f"{'Linear' if isinstance(module, nn.Linear) else 'convolution'} layers are not in "
                      f"target_types ({type_names}); add them with target_types=(..., "
                      f"nn.{'Linear' if isinstance(module, nn.Linear) else kind}) or the CLI's --aggregate")
        else:
            params = ", ".join(n for n, _ in module.named_parameters(recurse=False))
            reason = f"{kind}'s own parameters ({params}): not a layer Zoo-Tuning aggregates"
        choices.append(LayerChoice(name, kind, own, "averaged" if start_member is None else "copied", reason))
    return choices


def _matches(name: str, patterns: list[str] | None) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns or ())


def _check_same_architecture(members: Sequence[nn.Module], head: str | None = None) -> None:
    """Same keys, shapes and module types; the head (about to be replaced) may differ."""
    def outside_head(name: str) -> bool:
        return head is None or not (name == head or name.startswith(head + "."))

    def layout(member):
        return ({name: tuple(t.shape) for name, t in member.state_dict().items() if outside_head(name)},
                [type(m) for name, m in member.named_modules() if outside_head(name)])

    reference, reference_types = layout(members[0])
    for index, member in enumerate(members[1:], start=1):
        shapes, types = layout(member)
        if shapes != reference or types != reference_types:
            differing = sorted(set(shapes) ^ set(reference)) or sorted(
                k for k in shapes if shapes[k] != reference.get(k))
            detail = f" (first difference: {differing[0]})" if differing else ""
            raise ZooMismatchError(f"zoo member {index} does not have member 0's architecture{detail}")


def _followed_by_norm(modules: list[tuple[str, nn.Module]], name: str, out_channels: int) -> bool:
    """Whether the next module registered after ``name`` (outside it), skipping positively
    homogeneous parameter-free ones (ReLU, max/avg pooling, Identity, Dropout: they keep the scale
    invariance), normalises its output channels — how ResNets, VGG-BN and ConvNeXt-style blocks
    order conv and norm."""
    index = next(i for i, (n, _) in enumerate(modules) if n == name)
    for other, module in modules[index + 1:]:
        if other.startswith(name + ".") or isinstance(module, _HOMOGENEOUS_TYPES):
            continue
        if isinstance(module, nn.modules.batchnorm._NormBase):
            return module.num_features == out_channels
        if isinstance(module, nn.GroupNorm):
            return module.num_channels == out_channels
        if isinstance(module, nn.LayerNorm):
            return tuple(module.normalized_shape) == (out_channels,)
        return False
    return False


@torch.no_grad()
def _bank_lr_scales(members, targets, bank_lr_scale, gates: torch.Tensor | None = None) -> dict[str, float]:
    """1/rho per targeted layer (see the module docstring) at the initial gates ``gates`` (m,)
    (equal gates when None), or the given multiplier(s)."""
    if isinstance(bank_lr_scale, dict):
        return {name: float(bank_lr_scale.get(name, 1.0)) for name in targets}
    if bank_lr_scale != "auto":
        return {name: float(bank_lr_scale) for name in targets}
    scales = {}
    modules = list(members[0].named_modules())  # registration order
    a = torch.ones(len(members), dtype=torch.float64) if gates is None else gates.detach().double()
    for name in targets:
        weights = [member.get_submodule(name).weight.detach() for member in members]
        bank = torch.stack([w.flatten() for w in weights]).double() * a[:, None]
        if _followed_by_norm(modules, name, weights[0].shape[0]):
            scales[name] = float(bank.sum(0).square().sum() / bank.square().sum().clamp_min(1e-30))
        else:
            scales[name] = 1.0
    return scales


def _gate_rate(kernels: list[torch.Tensor]) -> float:
    """1 / mean_i ||W_i||_F^2: a gate step Δa_i moves the kernel by Δa_i W_i, and its gradient is
    <G, W_i>, so the kernel's step through the gate is ||W_i||^2 times a plain step."""
    return float(len(kernels) / sum(float(w.square().sum()) for w in kernels))


def _align_rate(kernels: list[torch.Tensor]) -> float:
    """min_i out / ||W_i||_F^2: the step of T_i W_i through T_i is ΔT_i W_i = -lr G W_i^T W_i, on
    average ||W_i||_F^2 / out times a plain step (the mean eigenvalue of W_i W_i^T)."""
    return min(float(w.shape[0] / w.square().sum().clamp_min(1e-30)) for w in kernels)


@torch.no_grad()
def _factor_lr_scales(members, targets, scale, rate) -> dict[str, float]:
    """Per targeted layer: the given multiplier(s), or for "auto" ``rate`` of the members' kernels
    (each flattened to (out, fan_in), float64)."""
    if isinstance(scale, dict):
        return {name: float(scale.get(name, 1.0)) for name in targets}
    if scale != "auto":
        return {name: float(scale) for name in targets}
    return {name: rate([m.get_submodule(name).weight.detach().flatten(1).double() for m in members])
            for name in targets}


@dataclass(frozen=True)
class _StartPlan:
    """Where a Zoo-Tuning model starts: which members it keeps, on which one its gates start."""

    num_zoo_members: int
    kept: list[int]
    start: int | None  # zoo index
    off_gate: float | None
    norm_init: str
    gate: str
    scores: list[float] | None


def _start_plan(m: int, options: ZooTuningOptions) -> _StartPlan:
    """The variant's defaults, overridden by what ``options`` give explicitly; every check of the start
    options against the zoo's m members."""
    scores = None
    if options.member_scores is not None:
        scores = [float(v) for v in options.member_scores]
        if len(scores) != m:
            raise ZootuneError(f"member_scores has {len(scores)} entries but the zoo has {m} members")
        if not all(math.isfinite(v) for v in scores):
            raise ZootuneError(f"member_scores must be finite numbers, got {scores}")
    start = options.start_member
    if start is not None and not (isinstance(start, int) and 0 <= start < m):
        raise ZootuneError(f"start_member must be a member index in [0, {m}), got {start!r}")
    robust = options.variant == "robust"
    if start is None and robust and scores is not None:
        start = max(range(m), key=lambda i: scores[i])  # first of equals: deterministic
    if options.keep_members is not None:
        kept = sorted({int(i) for i in options.keep_members})
        if not kept or any(not 0 <= i < m for i in kept):
            raise ZootuneError(f"keep_members must be member indices in [0, {m}), got {list(options.keep_members)}")
    elif robust and scores is not None:
        kept = prune_members(scores, start, options.prune_margin)
    else:
        kept = list(range(m))
    if start is not None and start not in kept:
        raise ZootuneError(f"start member {start} is not among the kept members {kept}")
    norm_init = options.norm_init
    if norm_init is None:
        norm_init = "start" if (robust and start is not None) else "mean"
    if norm_init not in NORM_INITS:
        raise ZootuneError(f"norm_init must be one of {NORM_INITS}, got {norm_init!r}")
    if norm_init == "start" and start is None:
        raise ZootuneError("norm_init='start' needs a start member (start_member=... or member_scores=...)")
    gate = options.gate or (ROBUST_GATE if (robust and start is not None) else "sigmoid")
    if gate in ("tanh", "linear") and start is None:
        raise ZootuneError(f"{gate} gates start at 0 for every member and need a start member "
                           "(start_member=... or member_scores=...)")
    off_gate = options.off_gate
    if start is not None:
        if gate in ("linear", "tanh"):  # no saturation: the other members can start at exactly 0
            off_gate = 0.0 if off_gate is None else float(off_gate)
        else:
            off_gate = ROBUST_OFF_GATE if off_gate is None else float(off_gate)
        limit = 1.0 / len(kept) if gate == "softmax" else 0.5 if gate == "sigmoid" else 1.0
        if not (0.0 < off_gate or gate in ("linear", "tanh")) or not 0.0 <= off_gate <= limit:
            raise ZootuneError(f"off_gate must be in (0, {limit:g}] for {gate} gates over {len(kept)} members, "
                               f"got {off_gate}")
    elif off_gate is not None:
        raise ZootuneError("off_gate needs a start member (start_member=... or member_scores=...)")
    if gate not in GATE_ACTIVATIONS:
        raise ZootuneError(f"gate must be one of {GATE_ACTIVATIONS}, got {gate!r}")
    return _StartPlan(m, kept, start, off_gate, norm_init, gate, scores)


def _factor_lr_scale_options(options: ZooTuningOptions, plan: _StartPlan) -> tuple:
    """The gates' and the alignments' learning-rate multipliers as given, else the variant's:
    preconditioned ("auto") for the robust variant with a start member, else the paper's (5 and 1)."""
    robust_start = options.variant == "robust" and plan.start is not None
    gate_lr_scale, align_lr_scale = options.gate_lr_scale, options.align_lr_scale
    if gate_lr_scale is None:
        gate_lr_scale = ROBUST_LR_SCALE if robust_start else DEFAULT_GATE_LR_SCALE
    if align_lr_scale is None:
        align_lr_scale = ROBUST_LR_SCALE if robust_start else 1.0
    return gate_lr_scale, align_lr_scale


def _aggregation_report(members: list[nn.Module], target_types: tuple[type, ...], options: ZooTuningOptions,
                        is_head, copied_from: int | None) -> AggregationReport:
    """Which modules of the (kept) members are aggregated, which averaged or copied, and why; raises
    when no layer is aggregated."""
    choices = _choose_layers(members[0], target_types, options.include, options.exclude, is_head,
                             options.keep_bn_stats, copied_from)
    report = AggregationReport(choices, len(members), type(members[0]).__name__, copied_from)
    if not report.aggregated:
        left_out = [c for c in choices if c.action in _UNTARGETED_ACTIONS
                    and isinstance(members[0].get_submodule(c.name), target_types)]
        raise ZootuneError(
            "no layer to aggregate: no module matches target_types="
            f"{[t.__name__ for t in target_types]}, include={options.include}, exclude={options.exclude}"
            + (f" (left out: {_names(left_out)}: {left_out[0].reason})" if left_out else ""))
    return report


def prune_members(scores: Sequence[float], start: int | None = None, margin: float | None = None) -> list[int]:
    """Indices of the members kept for aggregation: every member whose score is at least
    ``scores[start] - margin`` (``start``: the best-scored member by default; ``margin``:
    :data:`ROBUST_PRUNE_MARGIN`). ``None`` margin from the caller means the default; ``inf`` keeps all."""
    margin = ROBUST_PRUNE_MARGIN if margin is None else float(margin)
    best = scores[start] if start is not None else max(scores)
    return [i for i, v in enumerate(scores) if v >= best - margin or i == start]


def _initial_gates(m: int, start: int | None, off_gate: float | None, gate: str) -> torch.Tensor | None:
    """The gate values every input gets at step 0: ``off_gate`` for the members other than the start
    member; the start member gets 1 - off_gate (sigmoid), what the softmax leaves, or 1 (tanh and
    linear offsets); None (no start member): act(0), the paper's uniform start."""
    if start is None:
        return None
    gates = torch.full((m,), off_gate, dtype=torch.float64)
    if gate == "sigmoid":
        gates[start] = 1.0 - off_gate
    elif gate == "softmax":
        gates[start] = 1.0 - off_gate * (m - 1)
    else:  # tanh / linear offsets: the start member at exactly 1, the others at off_gate (0 by default)
        gates[start] = 1.0
    return gates


@torch.no_grad()
def _set_initial_gates(layer: AggregatedLayer, gates: torch.Tensor) -> None:
    """The gate's fixed prior such that act(prior) = ``gates`` (its output layer starts at 0, so every
    input gets these gates), and Lite's ā = ``gates`` (so the folded model at step 0 is the same)."""
    layer.gate.set_prior(gates)
    layer.gate_ema.copy_(gates.to(layer.gate_ema.dtype))


class ZooTuning(nn.Module):
    """Adaptive aggregation of a zoo of pretrained models (Zoo-Tuning, and Lite with ``lite=True``).

    Args:
        zoo: m >= 1 models of one architecture (a :class:`zootune.Zoo` or any sequence of modules).
        head: the new task head put in place of the members' head; or ``num_outputs`` for a fresh
            Linear head (N(0, 0.01) weights); with neither, the members' head is kept (and
            aggregated or averaged like any other layer).
        head_name: dotted name of the head (found automatically when omitted).
        target_types: layer types to aggregate (Conv1d/2d/3d, Linear), as classes or names
            (``"conv"`` = Conv1d/2d/3d, ``"linear"``, ``"conv2d"``, ...).
        include / exclude: glob patterns on dotted layer names (``"layer4.*"``) restricting targets.
        align: channel alignment on ``"kernel>1"`` layers (the reference), ``"all"`` or ``"none"``.
        gate: ``"sigmoid"`` (paper), ``"softmax"``, ``"tanh"`` (robust: prior + tanh offsets) or
            ``"linear"`` (prior + unbounded offsets; unstable at the usual gate rates); None: the
            variant's.
        gate_init: ``"zero"`` (every gate starts at act(0) for every input; ours, see
            :mod:`zootune.layers.gate` for why) or ``"reference"`` (kaiming, as the reference code).
        lite: Lite Zoo-Tuning (batch-shared gate, temporal ensemble, foldable).
        keep_bn_stats: keep the mean of the sources' running statistics instead of resetting them
            (``norm_init="mean"`` only; ``"start"`` keeps the start member's).
        lite_momentum: α of Lite's temporal ensemble ā <- α ā + (1 - α) ā_batch.
        formulation: ``"auto"`` (measured fastest per layer shape) or one of
            :data:`zootune.layers.FORMULATIONS` for every layer (where it applies).
        bank_lr_scale: learning-rate multiplier of each layer's source kernels and alignment:
            ``"auto"`` (1/rho above at the initial gates, for layers followed by a normalisation
            layer; 1 elsewhere), a number for every layer, or a dict {layer name: multiplier}.
        gate_lr_scale: learning-rate multiplier of the gates (used by :meth:`param_groups`): a
            number, a dict {layer: number}, or ``"auto"`` (1 / mean_i ||W_i||_F^2 per layer, see the
            module docstring); None: the variant's (paper 5, robust with a start member "auto").
        align_lr_scale: multiplier of the alignments' rate on top of the bank's, as above; "auto":
            min_i out / ||W_i||_F^2 per layer; None: the variant's (paper 1, robust with a start "auto").
        variant: ``"robust"`` (default) or ``"paper"``; see the module docstring.
        member_scores: one score per zoo member, higher = better; the robust variant starts on the
            best one and drops those more than ``prune_margin`` below it.
        start_member: the member to start on (overrides the scores' choice); any variant.
        start_candidates: k; robust variant, used by the experiment (``fit_method``), not by this
            module: train from each of the k first-ranked members and keep the one that validates
            best, s* = argmax_{s in top-k} val(ZooTuning started on s) (default 2, ``options.ROBUST_START_CANDIDATES``;
            a start the user chose is one candidate).
        keep_members: zoo indices to aggregate (overrides pruning).
        prune_margin: see the module docstring (default ``ROBUST_PRUNE_MARGIN``).
        off_gate: the other members' initial gate when there is a start member (tanh/linear gates:
            0; sigmoid: the start member gets 1 - off_gate; softmax: what the others leave).
        norm_init: ``"start"`` (the start member's norm layers and other untargeted parameters) or
            ``"mean"`` (the paper's); default: ``"start"`` for the robust variant with a start member.
        align_weight_decay: weight decay of the alignments T_i (None: the optimizer's).

    Attributes: ``model`` (the wrapped copy), ``config`` (:class:`ZooTuningConfig`), ``report``
    (:class:`AggregationReport`: which layers are aggregated, which averaged and why).
    """

    def __init__(self, zoo: Sequence[nn.Module], head: nn.Module | None = None, *,
                 options: ZooTuningOptions | None = None, num_outputs: int | None = None, lite: bool = False,
                 **option_values):
        super().__init__()
        if options is None:
            from zootune.options import parse_config

            options = parse_config(ZooTuningOptions, option_values, what="zoo-tuning")
        elif option_values:
            raise ZootuneError(f"give ZooTuning either options= or keyword options, not both ({sorted(option_values)})")
        self.options = options
        members = list(zoo)
        if not members:
            raise ZootuneError("Zoo-Tuning needs a zoo of at least one model; got an empty zoo")
        plan = _start_plan(len(members), options)
        gate_lr_scale, align_lr_scale = _factor_lr_scale_options(options, plan)
        target_types = resolve_layer_types(options.target_types)
        replacing_head = head is not None or num_outputs is not None
        head_name = find_head_name(members[0], options.head_name) if replacing_head else None
        _check_same_architecture(members, head_name)
        members = [members[i] for i in plan.kept]  # pruned members are never copied or aggregated
        start = plan.kept.index(plan.start) if plan.start is not None else None  # among the kept members
        initial_gates = _initial_gates(len(members), start, plan.off_gate, plan.gate)
        model = copy.deepcopy(members[0] if start is None else members[start])
        if head is None and num_outputs is not None:
            head = new_linear_head(head_in_features(model, head_name), num_outputs)

        def is_head(name: str) -> bool:
            return head_name is not None and (name == head_name or name.startswith(head_name + "."))

        copied_from = plan.start if plan.norm_init == "start" else None  # zoo index, as the user gave it
        self.report = _aggregation_report(members, target_types, options, is_head, copied_from)
        targets = self.report.aggregated
        lr_scales = _bank_lr_scales(members, targets, options.bank_lr_scale, initial_gates)
        gate_lr_scales = _factor_lr_scales(members, targets, gate_lr_scale, _gate_rate)
        align_lr_scales = _factor_lr_scales(members, targets, align_lr_scale, _align_rate)
        if plan.norm_init == "start":
            self._copy_untargeted(model, members[start], targets, is_head)
        else:
            self._average_untargeted(model, members, targets, is_head, options.keep_bn_stats)
        if head is not None:
            replace_head(model, head, head_name)  # a Linear replacing a 1x1 conv head becomes one
        self._aggregate(model, members, targets, plan.gate, initial_gates, lite)
        self.model = model
        self.config = ZooTuningConfig(
            num_sources=len(members), variant=options.variant, member_scores=plan.scores, kept_members=plan.kept,
            num_zoo_members=plan.num_zoo_members, start_member=start, off_gate=plan.off_gate,
            norm_init=plan.norm_init, lite=lite, align=options.align, gate=plan.gate, gate_init=options.gate_init,
            keep_bn_stats=options.keep_bn_stats, lite_momentum=options.lite_momentum,
            formulation=options.formulation, bank_lr_scale=options.bank_lr_scale, gate_lr_scale=gate_lr_scale,
            align_lr_scale=align_lr_scale, lr_scales=lr_scales, gate_lr_scales=gate_lr_scales,
            align_lr_scales=align_lr_scales, align_weight_decay=options.align_weight_decay,
            target_types=[t.__name__ for t in target_types], include=options.include, exclude=options.exclude,
            head_name=head_name, aggregated_layers=targets,
        )
        log.info("%s", self.report.summary())
        self._warn_if_mostly_not_aggregated()

    def _aggregate(self, model: nn.Module, members: list[nn.Module], targets: list[str], gate: str,
                   initial_gates: torch.Tensor | None, lite: bool) -> None:
        """Put an :class:`AggregatedLayer` over the members' layers in place of each target of ``model``."""
        options = self.options
        # With a start member, each layer's gate is drawn from its own seed (one draw from the global
        # stream for all): the random initialisation then does not depend on how many members there
        # are, so adding a member changes the model only through that member (what a zoo with junk
        # members added measures). The paper's start keeps the global stream as it always was.
        gate_seed = int(torch.randint(0, 2**31 - 1 - len(targets), ())) if initial_gates is not None else None
        for index, name in enumerate(targets):
            sources = [member.get_submodule(name) for member in members]
            kernel = sources[0].weight.shape[2:]
            aligned = options.align == "all" or (options.align == "kernel>1" and any(k > 1 for k in kernel))
            with contextlib.ExitStack() as stack:
                if gate_seed is not None:
                    stack.enter_context(torch.random.fork_rng(devices=[]))
                    torch.manual_seed(gate_seed + index)
                layer = AggregatedLayer(sources, align=aligned, gate=gate, gate_init=options.gate_init, lite=lite,
                                        lite_momentum=options.lite_momentum, formulation=options.formulation)
                if gate_seed is not None:  # U again, first: nn.Linear's own init of V drew m-dependent numbers
                    torch.manual_seed(gate_seed + index)
                    layer.gate.reset_parameters()
            if initial_gates is not None:
                _set_initial_gates(layer, initial_gates)
            set_submodule(model, name, layer)

    def _warn_if_mostly_not_aggregated(self) -> None:
        """A warning naming the main reason when less than ``COVERAGE_WARNING_FRACTION`` of the
        parameters is aggregated (e.g. a ViT with the default convolution targets)."""
        fraction = self.report.aggregated_fraction()
        if fraction >= COVERAGE_WARNING_FRACTION:
            return
        reason, layers = next(iter(self.report.untargeted_by_reason().items()))
        warnings.warn(
            f"Zoo-Tuning aggregates only {100 * fraction:.1f}% of {self.report.model}'s parameters "
            f"({len(self.report.aggregated)} layer(s)); the rest is {self.report.untargeted_source}, mostly "
            f"{_millions(sum(l.parameters for l in layers))} parameters in {len(layers)} module(s) because: {reason}. "
            "See ZooTuning(...).report", stacklevel=3)  # the caller of ZooTuning(...)

    @staticmethod
    @torch.no_grad()
    def _copy_untargeted(model, start_member, targets, is_head) -> None:
        """Untargeted parameters and buffers (norm affine AND running statistics) := the start member's,
        so that with the gates on that member the model computes its function at step 0."""
        start_modules = dict(start_member.named_modules())

        def inside(name: str, roots: list[str]) -> bool:
            return any(name == root or name.startswith(root + ".") for root in roots)

        for name, module in model.named_modules():
            if inside(name, targets) or is_head(name):
                continue
            source = start_modules[name]
            for pname, param in module.named_parameters(recurse=False):
                param.copy_(getattr(source, pname).detach())
            for bname, buffer in module.named_buffers(recurse=False):
                if buffer is not None:
                    buffer.copy_(getattr(source, bname))

    @staticmethod
    @torch.no_grad()
    def _average_untargeted(model, members, targets, is_head, keep_bn_stats) -> None:
        """Untargeted parameters and float buffers := mean over the sources; norm stats reset."""
        member_modules = [dict(member.named_modules()) for member in members]

        def inside(name: str, roots: list[str]) -> bool:
            return any(name == root or name.startswith(root + ".") for root in roots)

        for name, module in model.named_modules():
            if inside(name, targets) or is_head(name):
                continue
            counterparts = [modules[name] for modules in member_modules]
            for pname, param in module.named_parameters(recurse=False):
                param.copy_(torch.stack([getattr(c, pname).detach() for c in counterparts]).mean(0))
            for bname, buffer in module.named_buffers(recurse=False):
                if buffer is None or not buffer.is_floating_point():
                    continue
                buffer.copy_(torch.stack([getattr(c, bname) for c in counterparts]).mean(0))
            if isinstance(module, _NORM_TYPES) and getattr(module, "track_running_stats", False):
                if not keep_bn_stats:
                    module.reset_running_stats()  # running mean 0, var 1, num_batches_tracked 0
                elif module.num_batches_tracked is not None:
                    module.num_batches_tracked.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # ------------------------------------------------------------------ inspection
    def aggregated_layers(self) -> dict[str, AggregatedLayer]:
        """The aggregation layers by dotted name (relative to the wrapped model)."""
        return {name: module for name, module in self.model.named_modules() if isinstance(module, AggregatedLayer)}

    @contextlib.contextmanager
    def record_gates(self) -> Iterator[None]:
        """Within the block, every forward adds its per-sample gates to per-layer running sums;
        read them with :meth:`gate_statistics` (the sums restart when the block is entered)."""
        layers = list(self.aggregated_layers().values())
        for layer in layers:
            layer.reset_recording()
            layer.recording = True
        try:
            yield
        finally:
            for layer in layers:
                layer.recording = False

    def gate_statistics(self) -> dict[str, torch.Tensor]:
        """Mean gate weights (m,) per layer over the samples seen in the last :meth:`record_gates`
        block (Lite in training: the batch means; Lite in eval: the per-sample gates it would have)."""
        stats = {}
        for name, layer in self.aggregated_layers().items():
            mean = layer.recorded_gate_mean()
            if mean is not None:
                stats[name] = mean
        return stats

    def lite_gates(self) -> dict[str, torch.Tensor]:
        """Lite's temporal ensembles ā (m,) per layer: the gates the folded model uses."""
        return {name: layer.gate_ema.detach().clone() for name, layer in self.aggregated_layers().items()}

    def rebuild_options(self) -> ZooTuningOptions:
        """Options that rebuild exactly this module on its kept members, without data: the start
        member (among the kept ones), gate, off gate, norm init and gate rate as resolved, and the
        learning-rate multipliers as measured on the original zoo (a builder's copies would measure
        other ones); no scores, no pruning (already applied)."""
        built = self.config
        return dataclasses.replace(
            self.options, member_scores=None, keep_members=None, prune_margin=None,
            start_member=built.start_member, off_gate=built.off_gate, norm_init=built.norm_init, gate=built.gate,
            gate_lr_scale=dict(built.gate_lr_scales), align_lr_scale=dict(built.align_lr_scales),
            head_name=built.head_name,
            bank_lr_scale=dict(built.lr_scales) if built.lr_scales else self.options.bank_lr_scale)

    # ------------------------------------------------------------------ engine contract
    def merge_and_unload(self) -> nn.Module:
        """Lite only: the plain model of the zoo's architecture with ā and T folded into each layer."""
        from zootune.methods.zoo_tuning.fold import merge_and_unload

        return merge_and_unload(self)

    def param_groups(self, base_lr: float) -> list[dict]:
        """Optimizer groups (the engine's hook), per aggregated layer l: its bank and bias bank at
        ``base_lr * lr_scales[l]``, its alignment at that times ``align_lr_scales[l]`` (with
        ``align_weight_decay`` if set), its gate at ``base_lr * gate_lr_scales[l]``; everything else
        (norms, head, untargeted layers) at ``base_lr``."""
        groups, seen = [], set()
        cfg = self.config
        for name, layer in self.aggregated_layers().items():
            lr = base_lr * cfg.lr_scales.get(name, 1.0)
            groups.append({"params": [p for p in (layer.bank, layer.bias_bank) if p is not None], "lr": lr})
            align = layer._align_weight()
            if align is not None:
                group = {"params": [align], "lr": lr * cfg.align_lr_scales.get(name, 1.0)}
                groups.append(group if cfg.align_weight_decay is None else
                              {**group, "weight_decay": cfg.align_weight_decay})
            groups.append({"params": list(layer.gate.parameters()),
                           "lr": base_lr * cfg.gate_lr_scales.get(name, DEFAULT_GATE_LR_SCALE)})
            seen.update(id(p) for p in layer.parameters())
        groups.append({"params": [p for p in self.parameters() if id(p) not in seen], "lr": base_lr})
        return [g for g in groups if g["params"]]

    def finalize(self) -> nn.Module:
        """What the engine evaluates and exports: the folded plain model for Lite, else ``self``."""
        return self.merge_and_unload() if self.config.lite else self

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, directory) -> None:
        """Write ``model.safetensors`` and ``config.json`` (see :mod:`zootune.methods.zoo_tuning.io`)."""
        zt_io.save_pretrained(self, directory)

    @classmethod
    def load_pretrained(cls, directory, zoo_or_builder, head: nn.Module | None = None) -> "ZooTuning":
        """Rebuild a saved model; ``zoo_or_builder`` is the zoo or a callable returning one fresh
        model of the zoo's architecture (its weights are overwritten by the saved ones)."""
        return zt_io.load_pretrained(cls, directory, zoo_or_builder, head=head)
