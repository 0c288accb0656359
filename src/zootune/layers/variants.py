r"""Convolutions whose forward is a known variant of the plain one, and how to aggregate them.

:class:`~zootune.layers.AggregatedLayer` computes a plain convolution. Some libraries subclass
``nn.Conv2d`` with their own forward; a replaced layer must compute what the source computed, so
such a subclass is aggregated only when its forward is one of these variants (else it is left out,
and the Zoo-Tuning report says so). A variant is two optional steps around the plain convolution:

- **input padding** computed from the input size: TensorFlow's "SAME" padding (timm's
  ``Conv2dSame``, and ``StdConv2dSame`` when its padding is dynamic). Per spatial dim of size i,
  with kernel k, stride s, dilation d: pad = max((ceil(i / s) - 1) s + (k - 1) d + 1 - i, 0),
  pad // 2 before and the rest after; then the convolution with zero padding.
- **kernel standardisation** (Qiao et al., "Micro-Batch Training with Batch-Channel Normalization
  and Weight Standardization", arXiv 1903.10520; BiT's ``StdConv2d``): per output channel o,
  std(W)_o = (W_o - mean(W_o)) / sqrt(var(W_o) + eps), mean and (biased) variance over W_o's
  C_in/groups x k entries.

Aggregating a standardised layer. The sources' raw weights carry per-channel offsets and scales that
their standardisation removes (nothing in training constrains them), so summing raw weights would mix
meaningless quantities. Each source is standardised *before* aggregation, and the layer's own
standardisation is applied to the aggregated kernel *after* it::

    W^_b = std( sum_i a_i(h_b) T_i std(W_i) )

so the layer is still a weight-standardised convolution: with one source and T = I, std(a std(W)) =
std(W) for any gate a > 0 (up to eps), and Lite folds into the same class exactly (its weight is
sum_i ā_i T_i std(W_i), which the layer's forward standardises). The outer standardisation is not
linear in the kernel, so only the formulations that build each sample's kernel (``grouped``,
``bmm``, and Lite's ``shared``) apply.

Known variants are looked up by the class's module and name, so no library is imported here; the
interop tests check that each still equals the library's own layer. :func:`register_variant` adds
one for a user's class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """(before, after) TensorFlow "SAME" padding of one spatial dim (see the module docstring)."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def standardize(weight: torch.Tensor, eps: float, out_dim: int) -> torch.Tensor:
    """Weight standardisation: each slice ``weight[..., o, ...]`` along ``out_dim`` (with everything
    after it) to zero mean and unit (biased) variance, ``eps`` added to the variance."""
    flat = weight.flatten(out_dim + 1)
    mean = flat.mean(-1, keepdim=True)
    var = flat.var(-1, unbiased=False, keepdim=True)
    return ((flat - mean) * torch.rsqrt(var + eps)).view_as(weight)


@dataclass(frozen=True)
class LayerVariant:
    """What a convolution subclass does around the plain convolution.

    ``same_padding``: (kernel, stride, dilation) per spatial dim for dynamic "SAME" input padding,
    or None. ``standardize_eps``: eps of the kernel standardisation, or None.
    """

    name: str
    same_padding: tuple[tuple[int, int, int], ...] | None = None
    standardize_eps: float | None = None

    @property
    def linear_in_kernel(self) -> bool:
        """Whether the layer is linear in its kernel (then every formulation applies)."""
        return self.standardize_eps is None

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_padding is None:
            return x
        spatial = x.shape[-len(self.same_padding):]
        pads: list[int] = []
        for size, (kernel, stride, dilation) in zip(reversed(spatial), reversed(self.same_padding)):
            pads.extend(same_padding(int(size), kernel, stride, dilation))  # F.pad: last dim first
        return F.pad(x, pads) if any(pads) else x

    def source_bank(self, bank: torch.Tensor) -> torch.Tensor:
        """Each source kernel as its layer uses it; ``bank`` is (m, C_out, ...)."""
        return bank if self.standardize_eps is None else standardize(bank, self.standardize_eps, out_dim=1)

    def kernel(self, weight: torch.Tensor, out_dim: int) -> torch.Tensor:
        """The layer's own kernel transform of an aggregated kernel (C_out along ``out_dim``)."""
        return weight if self.standardize_eps is None else standardize(weight, self.standardize_eps, out_dim)


def _spatial(module: nn.Module) -> tuple[tuple[int, int, int], ...]:
    return tuple(zip(module.kernel_size, module.stride, module.dilation))


def _conv2d_same(module: nn.Module) -> LayerVariant:
    return LayerVariant("Conv2dSame", same_padding=_spatial(module))


def _std_conv2d(module: nn.Module) -> LayerVariant:
    return LayerVariant("StdConv2d", standardize_eps=float(module.eps))


def _std_conv2d_same(module: nn.Module) -> LayerVariant:
    return LayerVariant("StdConv2dSame", same_padding=_spatial(module) if module.same_pad else None,
                        standardize_eps=float(module.eps))


# (class module, class name) -> the variant of a layer of that class. Exact classes only: a subclass
# of one of these with yet another forward is not the same computation.
_VARIANTS: dict[tuple[str, str], Callable[[nn.Module], LayerVariant]] = {
    ("timm.layers.conv2d_same", "Conv2dSame"): _conv2d_same,
    ("timm.layers.std_conv", "StdConv2d"): _std_conv2d,
    ("timm.layers.std_conv", "StdConv2dSame"): _std_conv2d_same,
}


def register_variant(cls: type, make: Callable[[nn.Module], LayerVariant]) -> None:
    """Aggregate layers of class ``cls`` (a convolution subclass) as ``make(layer)`` describes."""
    _VARIANTS[(cls.__module__, cls.__qualname__)] = make


def variant_of(module: nn.Module) -> LayerVariant | None:
    """The known variant of ``module``'s class, or None (plain layers and unknown subclasses)."""
    make = _VARIANTS.get((type(module).__module__, type(module).__qualname__))
    return make(module) if make is not None else None
