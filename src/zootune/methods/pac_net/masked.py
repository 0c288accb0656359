"""A layer whose weight is split between a source task and a target task by a fixed mask.

``MaskedLayer`` wraps any module with a ``weight`` parameter (Conv, Linear, ...) in place, keeping
it as ``base_layer`` (the PEFT pattern). With the essential mask ``m`` and the stored weight ``W``:

- route ``"source"`` computes with ``W ⊙ m``: the source task sees only its essential weights, and
  the gradient of every pruned entry is exactly 0 (Allocate);
- route ``"target"`` computes with all of ``W`` (essential + calibrated entries) but detaches the
  essential ones, so only pruned entries receive gradient (Calibrate).

Gradient masking alone does not keep entries fixed: SGD's weight decay and momentum and AdamW's
decoupled decay move a parameter whose gradient is 0. ``PACNet.after_optimizer_step`` therefore
also re-writes the frozen entries after every step (:meth:`zero_pruned`, :meth:`restore_essential`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call

from zootune.layers.wrapper import LayerWrapper

ROUTES = ("source", "target")


class MaskedLayer(LayerWrapper):
    """``base_layer`` with an essential mask (``True`` = source weight) and the allocated source
    weight ``w_S`` (``source_weight``) that Calibrate keeps essential entries at and pulls pruned
    entries towards."""

    def __init__(self, base_layer: nn.Module, essential_mask: torch.Tensor):
        super().__init__()
        weight = getattr(base_layer, "weight", None)
        if not isinstance(weight, nn.Parameter):
            raise TypeError(f"{type(base_layer).__name__} has no weight parameter to mask")
        if essential_mask.shape != weight.shape:
            raise ValueError(f"mask shape {tuple(essential_mask.shape)} != weight shape {tuple(weight.shape)}")
        self.base_layer = base_layer
        self.register_buffer("essential_mask", essential_mask.to(device=weight.device, dtype=torch.bool))
        self.register_buffer("source_weight", weight.detach().clone())
        self.route = "source"

    @property
    def weight(self) -> nn.Parameter:
        return self.base_layer.weight

    def effective_weight(self, route: str | None = None) -> torch.Tensor:
        """The weight the given route computes with (values only; see the module docstring)."""
        route = route or self.route
        w, m = self.base_layer.weight, self.essential_mask
        if route == "source":
            return w * m  # multiplying by the mask zeroes pruned entries and their gradient
        return torch.where(m, w.detach(), w)

    def forward(self, *args, **kwargs):
        # functional_call runs the wrapped layer's own forward with the routed weight, so any layer
        # type with a ``weight`` works without re-implementing its forward.
        return functional_call(self.base_layer, {"weight": self.effective_weight()}, args, kwargs)

    @torch.no_grad()
    def merge(self, task: str | None = None) -> nn.Module:
        """A plain copy of ``base_layer`` whose weight is what route ``task`` computes with."""
        plain = copy.deepcopy(self.base_layer)
        plain.weight.copy_(self.effective_weight(task).detach())
        return plain

    @torch.no_grad()
    def zero_pruned(self) -> None:
        self.base_layer.weight.masked_fill_(~self.essential_mask, 0.0)

    @torch.no_grad()
    def restore_essential(self) -> None:
        w = self.base_layer.weight
        w.copy_(torch.where(self.essential_mask, self.source_weight, w))

    @torch.no_grad()
    def snapshot_source(self) -> None:
        """Record the allocated weights as ``w_S`` (pruned entries are 0 in it)."""
        self.source_weight.copy_(self.base_layer.weight.masked_fill(~self.essential_mask, 0.0))

    def calibration_penalty(self) -> torch.Tensor:
        """``||(W - w_S) ⊙ (1 - m)||²``: squared distance of the calibrated entries from ``w_S``."""
        diff = self.base_layer.weight - self.source_weight
        return diff.masked_fill(self.essential_mask, 0.0).pow(2).sum()

    def extra_repr(self) -> str:
        kept = int(self.essential_mask.sum())
        return f"route={self.route!r}, essential={kept}/{self.essential_mask.numel()}"
