r"""Zoo-Tuning aggregation layers: m source kernels mixed per sample by a gate on the layer's input.

Shu, Kou, Cao, Wang, Long. "Zoo-Tuning: Adaptive Transfer from a Zoo of Models", ICML 2021.
For a layer with sources W_i (bank of shape (m, C_out, C_in/groups, *k)), biases b_i, alignment
T_i (:mod:`zootune.layers.align`) and gate a(h) (:mod:`zootune.layers.gate`), sample b computes

    y_b = W^_b * h_b + b^_b,      W^_b = sum_i a_i(h_b) T_i W_i,      b^_b = sum_i a_i(h_b) T_i b_i.

``*`` is the layer's convolution (Conv1d/2d/3d with its stride, padding, dilation and groups) or a
Linear map. Write W~_i = T_i W_i (the aligned bank, computed once per forward, never per sample).
Because ``*`` is linear in the kernel and in the input, the same y_b has several exact formulations,
with different costs (P = output pixels, K = |W_i| / C_out, M = B*P*C_out*K the plain layer's
multiply-adds):

``grouped``  build W^_b for every sample (B*m*|W| MACs) and run ONE grouped convolution with the
             batch folded into channels (groups = B*groups): conv(h reshaped (1, B*C_in, ...),
             W^ reshaped (B*C_out, C_in/g, *k)). Exact: group b of the folded conv sees only h_b and
             W^_b. Cost M + B*m*|W|; writes B*|W| floats (memory-bound for big kernels, few pixels).
``bmm``      for 1x1 convolutions without padding and for Linear layers the layer is a matrix
             product, so y_b = W^_b h_b is one batched matmul (torch.bmm) with per-sample W^_b.
             Cost as ``grouped`` but without the grouped-conv kernel's overheads.
``stacked``  conv is linear in h, so y_b = sum_i W~_i * (a_i h_b) = [W~_1 .. W~_m] * [a_1 h_b; ..;
             a_m h_b]: ONE ordinary convolution over the input stacked m times along channels
             (each copy scaled by its gate) against the concatenated bank (C_out, m*C_in/g, *k).
             Cost m*M, but no per-sample kernels (good when B*|W| is large and P small... or for
             Linear layers with few tokens).
``outputs``  y_b = sum_i a_i T_i (W_i * h_b): ONE convolution with the m raw kernels concatenated
             along output channels, then the alignment and the gate-weighted sum as ONE matmul,
             T_cat (C_out, m*C_out) @ [a_1 z_1; ..; a_m z_m]. Exact for groups = 1 because T_i acts
             on output channels, which the convolution keeps apart (with groups the bank is aligned
             first). Cost m*M + B*P*m*C_out^2 instead of aligning the bank (m*C_out*|W|, paid by
             every other formulation in training): the cheaper way where pixels are few and
             channels many (ResNet-50's last stage at 112², batch 16).
``shared``   when the whole batch shares one gate g (Lite Zoo-Tuning, :class:`AggregatedLayer` with
             ``lite=True``), W = sum_i g_i W~_i is one kernel and the layer is one plain convolution:
             the plain layer's cost plus m*|W| to mix the kernel (plus the alignment). Lite training
             chooses between ``shared`` and ``outputs`` (with a = g for every sample).

In training the alignment T_i W_i costs m*C_out*|W| multiply-adds per step whatever the batch
(ResNet-50, align on 3x3 convs: ~23 GMACs forward at any input size, about 1.4x a plain forward at
112², batch 16); it is counted in the comparisons. In inference the aligned bank is computed once
and cached until a parameter changes.

With ``formulation="auto"`` the forward runs the formulation stored in ``formulation_choice``
(``{"train": name}``, and ``"eval"`` if tuned for inference; set by
:func:`zootune.layers.autotune.tune`, an explicit step
that times the candidates once before training, outside any forward); a layer that was never tuned
takes, per call, the candidate with the fewest multiply-adds for the input's shape (deterministic
and cheap: a few integer products). A fixed name makes every layer use that formulation. All
formulations agree up to floating-point rounding; the simple per-sample loop they must equal is in
``tests/test_layers_aggregate.py``.

Mixed precision: under ``torch.autocast`` the gate is computed in the parameters' dtype (a few
multiply-adds per sample; it weighs every kernel), the convolutions and matmuls run in the autocast
dtype, and the eval-time cache holds the aligned bank in the parameters' dtype, so it is the same
with and without autocast.

Convolution subclasses whose forward is a known variant of the plain one -- dynamic "same" padding,
weight standardisation (timm's ``Conv2dSame``, ``StdConv2d``) -- are aggregated as
:mod:`zootune.layers.variants` describes (input padding, and a kernel transform per source and after
aggregation); other subclasses with their own forward are not aggregatable.

Lite Zoo-Tuning: in training the gate is the batch mean ā_batch = mean_b a(h_b) (one shared kernel);
a buffer keeps the temporal ensemble ā <- α ā + (1 - α) ā_batch (α = ``lite_momentum`` = 0.9; the
first update sets ā = ā_batch, before it ā = 1/m), updated without gradient and, under
torch.distributed, from ā_batch averaged over all workers. In eval the gate is ā for every input, so
the layer folds into one plain layer (:meth:`AggregatedLayer.merge`).
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from zootune.layers.align import ChannelAlign, align_bank
from zootune.layers.autotune import TunableLayer
from zootune.layers.gate import GATE_INITS, Gate
from zootune.layers.variants import variant_of
from zootune.layers.wrapper import LayerWrapper

FORMULATIONS = ("grouped", "bmm", "stacked", "outputs")
_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Layers whose forward is exactly the library's: a subclass with its own forward (weight
# standardisation, "same" padding done by hand, ...) would not be computed faithfully here.
_SUPPORTED_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward}


def _autocast_off(device_type: str):
    """A context without autocast on ``device_type`` (a no-op context when it is not on)."""
    if device_type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def is_aggregatable(module: nn.Module) -> bool:
    """True for Conv1d/2d/3d and Linear layers: subclasses only if they keep the plain forward or
    their forward is a known variant of it (:mod:`zootune.layers.variants`)."""
    return isinstance(module, (*_CONV_TYPES, nn.Linear)) and (
        type(module).forward in _SUPPORTED_FORWARDS or variant_of(module) is not None)


def _sources_shape_check(sources: Sequence[nn.Module]) -> None:
    first = sources[0]
    for other in sources[1:]:
        if type(other) is not type(first) or other.weight.shape != first.weight.shape or (
            (other.bias is None) != (first.bias is None)
        ):
            raise ValueError("aggregated sources must be layers of one type and shape")


def _shell(layer: nn.Module) -> nn.Module:
    """A copy of ``layer`` without its weight and bias tensors (its class and settings only)."""
    params = {name: getattr(layer, name) for name in ("weight", "bias")}
    try:
        for name in params:
            layer._parameters[name] = None
        shell = copy.deepcopy(layer)
    finally:
        for name, value in params.items():
            layer._parameters[name] = value
    return shell


class AggregatedLayer(LayerWrapper, TunableLayer):
    """A Conv1d/2d/3d or Linear layer replaced by a Zoo-Tuning aggregation of m source layers.

    Args:
        sources: the m source layers (same type and shape); their weights become the trainable bank.
        align: learn a channel alignment T_i per source (identity init).
        gate: ``"sigmoid"`` (paper) or ``"softmax"`` gate activation.
        lite: Lite Zoo-Tuning (batch-shared gate in training, temporal ensemble ā in eval).
        lite_momentum: α of the temporal ensemble.
        gate_init: ``"zero"`` (gate output layer V = 0: every gate starts at act(0) for every input;
            our default, see :mod:`zootune.layers.gate`) or ``"reference"`` (kaiming, as U).
        formulation: ``"auto"`` (the tuned choice, else the fewest multiply-adds; see the module
            docstring) or one of :data:`FORMULATIONS`; a fixed ``"grouped"`` runs as ``"bmm"`` on
            Linear layers and ``"bmm"`` as ``"grouped"`` on convolutions it does not apply to (both
            build per-sample kernels).

    Parameters: ``bank`` (m, C_out, C_in/groups, *k) or (m, C_out, C_in); ``bias_bank`` (m, C_out)
    when the sources have a bias; ``align.weight`` (m, C_out, C_out); ``gate.*``.
    Buffers (Lite): ``gate_ema`` (m,), ``gate_updates`` (number of EMA updates so far).
    ``formulation_choice``: ``{"train": name}`` (and ``"eval"``) chosen by
    :func:`zootune.layers.autotune.tune` (empty: not tuned); a plain attribute, not state, so that
    models and their files do not change with the machine they were tuned on.
    """

    def __init__(self, sources: Sequence[nn.Module], *, align: bool = True, gate: str = "sigmoid",
                 lite: bool = False, lite_momentum: float = 0.9, formulation: str = "auto",
                 gate_init: str = "zero"):
        super().__init__()
        if not sources:
            raise ValueError("need at least one source layer")
        _sources_shape_check(sources)
        first = sources[0]
        if not is_aggregatable(first):
            raise TypeError(f"cannot aggregate {type(first).__name__}")
        if formulation != "auto" and formulation not in FORMULATIONS:
            raise ValueError(f"formulation must be 'auto' or one of {FORMULATIONS}, got {formulation!r}")
        self.num_sources = m = len(sources)
        self.is_linear = isinstance(first, nn.Linear)
        self.lite = lite
        self.lite_momentum = float(lite_momentum)
        self.formulation = formulation
        # A known variant of the plain conv (dynamic "same" padding, weight standardisation), or None.
        self.variant = None if type(first).forward in _SUPPORTED_FORWARDS else variant_of(first)
        weight = first.weight
        with torch.no_grad():
            self.bank = nn.Parameter(torch.stack([s.weight.detach() for s in sources]).clone())
            self.bias_bank = (
                nn.Parameter(torch.stack([s.bias.detach() for s in sources]).clone())
                if first.bias is not None else None
            )
        self.out_channels = weight.shape[0]
        if self.is_linear:
            self.in_channels = first.in_features
            self.groups = 1
        else:
            self.in_channels = first.in_channels
            self.groups = first.groups
            self.stride, self.dilation = tuple(first.stride), tuple(first.dilation)
            self.padding = first.padding if isinstance(first.padding, str) else tuple(first.padding)
            self.padding_mode = first.padding_mode
            # Non-zero padding modes pad the input first, as nn.ConvNd does.
            self._pre_pad = tuple(first._reversed_padding_repeated_twice)
            self._conv = _CONV_FUNCTIONS[weight.dim() - 2]
        self.align = ChannelAlign(m, self.out_channels, dtype=weight.dtype, device=weight.device) if align else None
        if gate_init not in GATE_INITS:
            raise ValueError(f"gate_init must be one of {GATE_INITS}, got {gate_init!r}")
        self.gate = Gate(self.in_channels, m, gate, channels_last=self.is_linear,
                         zero_init=gate_init == "zero").to(weight.device, weight.dtype)
        self.register_buffer("gate_ema", torch.full((m,), 1.0 / m, dtype=weight.dtype, device=weight.device))
        self.register_buffer("gate_updates", torch.zeros((), dtype=torch.long, device=weight.device))
        # The replaced layer, kept as ``base_layer`` (the PEFT pattern) for its class and settings
        # (stride, padding, a variant's own attributes); its weight and bias live in the bank, so
        # the shell holds no tensor: nothing is duplicated in memory or in the state_dict.
        self.base_layer = _shell(first)
        self.formulation_choice: dict[str, str] = {}
        self._eval_cache: tuple | None = None
        self._gate_sum: torch.Tensor | None = None
        self._gate_count = 0
        self.recording = False

    # ----------------------------------------------------------------- kernels
    def _align_weight(self) -> torch.Tensor | None:
        return self.align.weight if self.align is not None else None

    @staticmethod
    def _aligned(bank, bias, align_weight):
        """(T_i W_i, T_i b_i) for all i; unchanged when ``align_weight`` is None."""
        if align_weight is None:
            return bank, bias
        return (align_bank(align_weight, bank) if bank is not None else None,
                align_bank(align_weight, bias) if bias is not None else None)

    def _source_bank(self) -> torch.Tensor:
        """The source kernels as their layers use them (standardised for a standardising variant)."""
        return self.bank if self.variant is None else self.variant.source_bank(self.bank)

    def aligned_bank(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W~, b~): the bank and bias bank after channel alignment."""
        return self._aligned(self._source_bank(), self.bias_bank, self._align_weight())

    def fold(self, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One kernel for a shared gate g (m,): W = sum_i g_i W~_i, b = sum_i g_i b~_i."""
        bank, bias = self.aligned_bank()
        gate = gate.to(bank.dtype)
        weight = torch.tensordot(gate, bank, dims=1)
        return weight, (gate @ bias if bias is not None else None)

    def _cached(self, build: Callable[[], tuple]) -> tuple:
        """``build()`` cached while no parameter or buffer it reads has changed (inference only)."""
        tensors = [t for t in (self.bank, self.bias_bank, self.gate_ema, self._align_weight()) if t is not None]
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        if self._eval_cache is None or self._eval_cache[0] != key:
            # Built in the parameters' dtype whatever the autocast state, so that one cache serves
            # runs with and without autocast (each convolution casts what it reads).
            with _autocast_off(self.bank.device.type):
                self._eval_cache = (key, build())
        return self._eval_cache[1]

    def _inference(self) -> bool:
        return not torch.is_grad_enabled() or not any(
            t.requires_grad for t in (self.bank, self._align_weight()) if t is not None)

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError("Zoo-Tuning layers need a batch dimension (input of at least 2 dims)")
        if self.lite:
            return self._forward_lite(x)
        a = self.gate(x)
        self._record(a)
        x = self._pad(x)
        if self._inference() and not self.training:
            # Inference: the aligned bank is a constant, computed once and reused.
            bank, bias = self._cached(self.aligned_bank)
            align_weight = None
        else:
            bank, bias, align_weight = self._source_bank(), self.bias_bank, self._align_weight()
        name = self._choose(x, align_weight is not None, self.applicable_formulations())
        return self._formulation(name)(x, a, bank, bias, align_weight)

    def _forward_lite(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            batch_gate = self.gate(x).mean(0)
            self._record(batch_gate.unsqueeze(0).expand(x.shape[0], -1))
            self._update_ema(batch_gate)
            x = self._pad(x)
            align_weight = self._align_weight()
            # Shared kernel (fold, then one conv), or -- when the alignment matmul m*C_out*|W|
            # costs more than the layer itself (few pixels, wide layers) -- the m source outputs
            # aligned and mixed after one conv ("outputs"). Both are exact.
            name = self._choose(x, align_weight is not None, self.lite_training_formulations())
            return self._formulation(name)(x, batch_gate, self._source_bank(), self.bias_bank, align_weight)
        if self.recording:
            self._record(self.gate(x))
        if self._inference():
            weight, bias = self._cached(lambda: self.fold(self.gate_ema))
        else:
            weight, bias = self.fold(self.gate_ema)
        return self._shared_kernel(self._pad(x), weight, bias)

    # ----------------------------------------------------------------- choosing a formulation
    def lite_training_formulations(self) -> tuple[str, ...]:
        """Lite training's candidates: the shared kernel, or the aligned outputs when aligning (and
        the kernel enters the convolution linearly: not for a weight-standardising variant)."""
        return ("shared", "outputs") if self.align is not None and self._linear_in_kernel() else ("shared",)

    def candidate_formulations(self, phase: str) -> tuple[str, ...]:
        """The formulations a forward in ``phase`` ("train": module in training mode, "eval")
        chooses from (Lite in eval always folds into the shared kernel)."""
        if phase not in ("train", "eval"):
            raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
        if self.lite:
            return self.lite_training_formulations() if phase == "train" else ("shared",)
        return self.applicable_formulations()

    def _choose(self, x: torch.Tensor, aligning: bool, names: tuple[str, ...]) -> str:
        """The formulation this forward runs: a fixed ``formulation``, else the stored tuned choice
        of the phase, else the candidate with the fewest multiply-adds for x's shape (first of the
        cheapest in ``names``' order)."""
        if self.formulation != "auto":
            if self.lite:
                return "outputs" if self.formulation == "outputs" and "outputs" in names else "shared"
            if self.formulation in names:
                return self.formulation
            # "grouped" and "bmm" are the same per-sample-kernel idea; each layer kind has one
            return "bmm" if self.formulation == "grouped" else "grouped"
        chosen = self.formulation_choice.get("train" if self.training else "eval")
        if chosen in names:
            return chosen
        if len(names) == 1:
            return names[0]
        macs = self._macs(x, aligning)
        return min(names, key=macs.__getitem__)

    @torch.no_grad()
    def _update_ema(self, batch_gate: torch.Tensor) -> None:
        batch_gate = batch_gate.detach().to(self.gate_ema.dtype).clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_gate)
            batch_gate /= dist.get_world_size()
        # The first update takes the batch gate as it is; branch-free (no host sync, no graph break
        # under torch.compile).
        smoothed = torch.add(self.gate_ema * self.lite_momentum, batch_gate, alpha=1.0 - self.lite_momentum)
        self.gate_ema.copy_(torch.where(self.gate_updates == 0, batch_gate, smoothed))
        self.gate_updates += 1

    def _record(self, a: torch.Tensor) -> None:
        if self.recording:
            total = a.detach().sum(0).double()
            self._gate_sum = total if self._gate_sum is None else self._gate_sum + total
            self._gate_count += a.shape[0]

    def recorded_gate_mean(self) -> torch.Tensor | None:
        """Mean gate over the samples seen while ``recording`` (None if none)."""
        if self._gate_sum is None or self._gate_count == 0:
            return None
        return (self._gate_sum / self._gate_count).float()

    def reset_recording(self) -> None:
        self._gate_sum, self._gate_count = None, 0

    # ----------------------------------------------------------------- formulations
    # Each takes (x, a, bank, bias, align_weight): x already padded for non-zero padding modes;
    # a (B, m) per-sample gates, or (m,) for "shared" and Lite's "outputs"; the raw bank and bias
    # bank with align_weight T (m, C_out, C_out), or an already aligned bank with T = None.
    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant is not None:
            x = self.variant.pad_input(x)
        if self.is_linear or self.padding_mode == "zeros":
            return x
        return F.pad(x, self._pre_pad, mode=self.padding_mode)

    @property
    def _conv_padding(self):
        return self.padding if self.padding_mode == "zeros" else 0

    def _formulation(self, name: str) -> Callable:
        if name != "shared" and name not in self.applicable_formulations():
            raise ValueError(f"formulation {name!r} does not apply to this layer; "
                             f"choose from {self.applicable_formulations()}")
        if name == "shared":
            return self._shared
        prefix = "_linear_" if self.is_linear else "_conv_"
        return getattr(self, prefix + name)

    def applicable_formulations(self) -> tuple[str, ...]:
        """The per-sample formulations this layer can use ("shared" needs one gate per batch)."""
        if self.is_linear:
            return ("bmm", "stacked", "outputs")
        names = ["grouped", "stacked", "outputs"]
        padding_free = self._conv_padding in ("valid", "same") or not any(
            self._conv_padding if isinstance(self._conv_padding, tuple) else (self._conv_padding,))
        if all(k == 1 for k in self.bank.shape[3:]) and self.groups == 1 and padding_free:
            names.insert(1, "bmm")
        if not self._linear_in_kernel():  # the kernel transform needs each sample's own kernel
            names = [name for name in names if name in ("grouped", "bmm")]
        return tuple(names)

    def _linear_in_kernel(self) -> bool:
        return self.variant is None or self.variant.linear_in_kernel

    def _run_conv(self, x, weight, bias, groups):
        return self._conv(x, weight, bias, self.stride, self._conv_padding, self.dilation, groups)

    def _shared_kernel(self, x, weight, bias):
        if self.is_linear:
            return F.linear(x, weight, bias)
        if self.variant is not None:
            weight = self.variant.kernel(weight, out_dim=0)
        return self._run_conv(x, weight, bias, self.groups)

    def _shared(self, x, gate, bank, bias, align_weight):
        bank, bias = self._aligned(bank, bias, align_weight)
        # tensordot is not an autocast op: under autocast the aligned bank (a bmm) is in the
        # autocast dtype while the gate is not, so match them here.
        weight = torch.tensordot(gate.to(bank.dtype), bank, dims=1)
        return self._shared_kernel(x, weight, gate @ bias if bias is not None else None)

    def _per_sample(self, a, bank, bias, align_weight):
        """W^_b (B, C_out, ...) and b^_b (B, C_out) or None."""
        bank, bias = self._aligned(bank, bias, align_weight)
        batch = a.shape[0]
        weights = (a @ bank.reshape(self.num_sources, -1)).view(batch, *bank.shape[1:])
        if self.variant is not None:
            weights = self.variant.kernel(weights, out_dim=1)
        return weights, (a @ bias if bias is not None else None)

    def _conv_grouped(self, x, a, bank, bias, align_weight):
        batch = x.shape[0]
        weights, biases = self._per_sample(a, bank, bias, align_weight)
        y = self._run_conv(
            x.reshape(1, batch * x.shape[1], *x.shape[2:]),
            weights.reshape(batch * self.out_channels, *bank.shape[2:]),
            biases.reshape(-1) if biases is not None else None,
            batch * self.groups,
        )
        return y.view(batch, self.out_channels, *y.shape[2:])

    def _conv_bmm(self, x, a, bank, bias, align_weight):
        # 1x1 kernel, no padding: the stride just subsamples the input.
        x = x[(slice(None), slice(None), *(slice(None, None, s) for s in self.stride))]
        batch, spatial = x.shape[0], x.shape[2:]
        weights, biases = self._per_sample(a, bank, bias, align_weight)
        flat = x.reshape(batch, self.in_channels, -1)
        weights = weights.view(batch, self.out_channels, self.in_channels)
        y = torch.bmm(weights, flat) if biases is None else torch.baddbmm(biases.unsqueeze(-1), weights, flat)
        return y.view(batch, self.out_channels, *spatial)

    def _conv_stacked(self, x, a, bank, bias, align_weight):
        bank, bias = self._aligned(bank, bias, align_weight)
        m, g = self.num_sources, self.groups
        batch, spatial = x.shape[0], x.shape[2:]
        ones = (1,) * len(spatial)
        # Input channels ordered (group, source, channel-in-group) so each conv group sees its own
        # channels of every source; the bank is reordered to match.
        a = a.to(x.dtype)  # under autocast: scale the activations in their own dtype
        stacked = (x.view(batch, g, 1, -1, *spatial) * a.view(batch, 1, m, 1, *ones)).reshape(batch, -1, *spatial)
        k = bank.shape[3:]
        weight = (bank.view(m, g, self.out_channels // g, -1, *k).permute(1, 2, 0, 3, *range(4, 4 + len(k)))
                  .reshape(self.out_channels, -1, *k))
        y = self._run_conv(stacked, weight, None, g)
        return y if bias is None else y + (a @ bias).view(batch, -1, *ones)

    def _mix_outputs(self, z, a, bias, align_weight):
        """y = sum_i a_i T_i z_i (+ sum_i a_i T_i b_i) for per-source outputs z (B, m, C_out, P).

        With alignment this is ONE matmul: T_cat (C_out, m*C_out) @ (a_i z_i stacked over i), where
        T_cat[o, (i, c)] = T_i[o, c]; it costs B*P*m*C_out^2, against m*C_out*|W| for aligning the
        bank, which is cheaper when B*P < |W|/C_out... i.e. few pixels (late layers, small inputs)."""
        batch, m = z.shape[:2]
        a = a.expand(batch, m) if a.dim() == 1 else a
        scaled = z * a.to(z.dtype).view(batch, m, 1, 1)  # under autocast z is bf16/fp16: stay there
        if align_weight is None:
            y = scaled.sum(1)
        else:
            t_cat = align_weight.transpose(0, 1).reshape(self.out_channels, m * self.out_channels)
            y = torch.matmul(t_cat, scaled.reshape(batch, m * self.out_channels, -1))
        if bias is not None:
            _, bias = self._aligned(None, bias, align_weight)
            y = y + (a @ bias).unsqueeze(-1)
        return y

    def _conv_outputs(self, x, a, bank, bias, align_weight):
        m, g = self.num_sources, self.groups
        if g > 1 and align_weight is not None:
            # T_i mixes kernel rows across groups, which read other input channels: with groups
            # "align the outputs" is not the same map, so align the bank first.
            bank, bias = self._aligned(bank, bias, align_weight)
            align_weight = None
        # Output channels ordered (group, source, channel-in-group) to respect the conv's groups.
        weight = bank.view(m, g, self.out_channels // g, *bank.shape[2:]).transpose(0, 1).reshape(-1, *bank.shape[2:])
        z = self._run_conv(x, weight, None, g)
        batch, spatial = z.shape[0], z.shape[2:]
        z = z.view(batch, g, m, self.out_channels // g, -1).transpose(1, 2).reshape(batch, m, self.out_channels, -1)
        return self._mix_outputs(z, a, bias, align_weight).view(batch, self.out_channels, *spatial)

    def _linear_bmm(self, x, a, bank, bias, align_weight):
        batch = x.shape[0]
        flat = x.reshape(batch, -1, self.in_channels)
        weights, biases = self._per_sample(a, bank, bias, align_weight)
        weights = weights.transpose(1, 2)
        y = torch.bmm(flat, weights) if biases is None else torch.baddbmm(biases.unsqueeze(1), flat, weights)
        return y.view(*x.shape[:-1], self.out_channels)

    def _linear_stacked(self, x, a, bank, bias, align_weight):
        bank, bias = self._aligned(bank, bias, align_weight)
        batch, m = x.shape[0], self.num_sources
        flat = x.reshape(batch, -1, 1, self.in_channels)
        stacked = (flat * a.to(x.dtype).view(batch, 1, m, 1)).flatten(2)
        y = F.linear(stacked, bank.transpose(0, 1).reshape(self.out_channels, -1))
        if bias is not None:
            y = y + (a @ bias).unsqueeze(1)
        return y.view(*x.shape[:-1], self.out_channels)

    def _linear_outputs(self, x, a, bank, bias, align_weight):
        batch, m = x.shape[0], self.num_sources
        flat = x.reshape(batch, -1, self.in_channels)
        tokens = flat.shape[1]
        z = F.linear(flat, bank.reshape(m * self.out_channels, self.in_channels))
        z = z.view(batch, tokens, m, self.out_channels).permute(0, 2, 3, 1)  # (B, m, C_out, N)
        y = self._mix_outputs(z, a, bias, align_weight).transpose(1, 2)
        return y.reshape(*x.shape[:-1], self.out_channels)

    # ----------------------------------------------------------------- autotuning
    def _macs(self, x: torch.Tensor, aligning: bool) -> dict[str, float]:
        """Multiply-add estimates per formulation (used only to skip hopeless candidates)."""
        m, batch = self.num_sources, x.shape[0]
        kernel_numel = self.bank[0].numel()
        if self.is_linear:
            pixels_out = pixels_in = x[0].numel() // self.in_channels
        else:
            pixels_in = math.prod(x.shape[2:])
            pixels_out = 1
            for size, k, s, d, p in zip(x.shape[2:], self.bank.shape[3:], self.stride, self.dilation,
                                        self._pad_amounts()):
                pixels_out *= max(1, (size + 2 * p - d * (k - 1) - 1) // s + 1)
        plain = batch * pixels_out * kernel_numel
        per_sample = plain + batch * m * kernel_numel
        align_bank_cost = m * self.out_channels * kernel_numel if aligning else 0
        align_outputs_cost = batch * pixels_out * m * self.out_channels ** 2 if aligning else 0
        return {
            "grouped": per_sample + align_bank_cost, "bmm": per_sample + align_bank_cost,
            "stacked": m * plain + batch * m * self.in_channels * pixels_in + align_bank_cost,
            "outputs": m * plain + batch * m * self.out_channels * pixels_out + align_outputs_cost,
            "shared": plain + m * kernel_numel + align_bank_cost,
        }

    def _pad_amounts(self) -> tuple[int, ...]:
        pad = self._conv_padding
        ndim = self.bank.dim() - 3
        if pad == "valid":
            return (0,) * ndim
        if pad == "same":
            return tuple(d * (k - 1) // 2 for d, k in zip(self.dilation, self.bank.shape[3:]))
        return pad if isinstance(pad, tuple) else (pad,) * ndim

    def timing_runners(self, x: torch.Tensor, phase: str) -> tuple[dict[str, Callable[[], None]], dict[str, float]]:
        """For :func:`zootune.layers.autotune.tune`: ``({name: run}, {name: multiply-adds})`` for this
        layer's candidates in ``phase`` on the layer input ``x`` (unpadded, as forward receives it).

        ``run()`` computes the formulation once as forward would in that phase: "train" on leaf copies
        of x, the gate, the bank and the alignment, with a backward pass; "eval" without gradients on
        the aligned bank. Nothing here changes the layer (no EMA update, no recorded gates).
        """
        names = self.candidate_formulations(phase)
        with torch.no_grad():
            a = self.gate(x)
            if self.lite:
                a = a.mean(0)
            x = self._pad(x)
            if phase == "eval":
                bank, bias = self.aligned_bank()
                align_weight = None
            else:
                bank, bias, align_weight = self._source_bank(), self.bias_bank, self._align_weight()
            inputs = [t.detach() if t is not None else None for t in (x, a, bank, bias, align_weight)]

        def runner(name: str) -> Callable[[], None]:
            fn = self._formulation(name)
            if phase == "eval":
                def run() -> None:
                    with torch.no_grad():
                        fn(*inputs)
                return run

            def run_backward() -> None:
                with torch.enable_grad():
                    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
                    fn(*leaves).sum().backward()
            return run_backward

        macs = self._macs(x, inputs[4] is not None)
        return {name: runner(name) for name in names}, {name: macs[name] for name in names}

    # ----------------------------------------------------------------- the engine's hooks
    # (prepare_for_training and training_state: TunableLayer's)
    @property
    def convolves_2d(self) -> bool:
        """Whether this aggregates 2-d convolutions: the engine's channels-last rule counts the layer
        (:mod:`zootune.engine.hooks`)."""
        return self.bank.dim() == 5

    # ----------------------------------------------------------------- folding
    @torch.no_grad()
    def merge(self, gate: torch.Tensor | None = None) -> nn.Module:
        """The plain layer (``base_layer``'s class) computing this layer with the shared gate
        ``gate`` (default: the Lite ensemble ā): weight sum_i g_i T_i W_i, bias sum_i g_i T_i b_i."""
        gate = self.gate_ema if gate is None else gate
        weight, bias = self.fold(gate)
        for name, tensor in (("weight", weight), ("bias", bias)):
            if tensor is not None and not torch.isfinite(tensor).all():
                raise FloatingPointError(f"folded {name} has non-finite values")
        plain = copy.deepcopy(self.base_layer)
        plain.weight = nn.Parameter(weight.detach().clone())
        if bias is not None:
            plain.bias = nn.Parameter(bias.detach().clone())
        return plain

    def extra_repr(self) -> str:
        kind = "Linear" if self.is_linear else f"Conv{self.bank.dim() - 3}d"
        return (f"{kind}, sources={self.num_sources}, in={self.in_channels}, out={self.out_channels}, "
                f"align={self.align is not None}, lite={self.lite}, formulation={self.formulation!r}")
