"""Per-sample gate of a Zoo-Tuning layer (Shu et al., ICML 2021, Sec. 3.2).

For a layer input ``h`` of shape (B, C, *spatial) (or (B, *, C) for a Linear layer), the gate is

    a(h) = act(V · relu(U · pool(h)) + c),      U: C -> C//4 + 1 (no bias),  V: C//4 + 1 -> m

where ``pool`` averages over the spatial (or token) dimensions and ``act`` is a sigmoid (independent
gates, the paper's choice) or a softmax over the m sources. ``U`` and ``V`` are the reference's 1x1
convolutions on the pooled vector, i.e. Linear maps; kaiming-normal (fan_out) init, bias 0.

A fixed *prior* p (a buffer, zero unless set; :meth:`Gate.set_prior`) gives every input chosen
initial gates while V = 0: a = act(z + p) for sigmoid/softmax (p = logit / log of the wanted gates),
and for the additive activations used by Zoo-Tuning's robust variant

    a(h) = p + tanh(z)      ("tanh": offsets bounded in (-1, 1))      a(h) = p + z      ("linear")

with z = V relu(U pool(h)) + c. With p = one-hot(s) the gates start EXACTLY on source s (a sigmoid
or softmax can only approach a one-hot), and the others' gates have their full gradient at the start
(tanh'(0) = 1, where a sigmoid at gate 0.01 passes 1% of it). Weight decay pulls V and c towards 0,
i.e. the gates towards the prior.

Initialisation of ``V`` (our choice, ``zero_init=True``): the reference initialises V like U, so at
the start every input gets its own random gate values. The normalisation layer after an aggregated
convolution then sees each sample's output scaled by a different random factor, which scrambles the
pretrained features: Zoo-Tuning over ONE source (which should start as that source) reached 26%
test accuracy where fine-tuning the source reached 59% (MiniZoo, polygons target, 6 epochs; 64%
with V = 0; docs/dev-notes/zoo-tuning.md). With V = 0 every gate starts at act(0) for every input
(1/2, or 1/m for softmax) and U still gets gradients through V once V moves off zero.
"""

from __future__ import annotations

import torch
from torch import nn

GATE_ACTIVATIONS = ("sigmoid", "softmax", "linear", "tanh")
GATE_INITS = ("zero", "reference")


class Gate(nn.Module):
    """``a(h)`` in R^m per sample: pool -> Linear(C, C//4+1, no bias) -> ReLU -> Linear(., m) -> act."""

    def __init__(self, in_channels: int, num_sources: int, activation: str = "sigmoid",
                 channels_last: bool = False, zero_init: bool = True):
        super().__init__()
        if activation not in GATE_ACTIVATIONS:
            raise ValueError(f"gate activation must be one of {GATE_ACTIVATIONS}, got {activation!r}")
        hidden = in_channels // 4 + 1
        self.activation = activation
        # Linear layers keep channels last ((B, *, C)); convolutions keep them in dim 1.
        self.channels_last = channels_last
        self.reduce = nn.Linear(in_channels, hidden, bias=False)
        self.expand = nn.Linear(hidden, num_sources)
        self.zero_init = zero_init
        self.reset_parameters()
        # A fixed offset of the logits (zero: the paper's gate). Kept out of the state_dict: the model
        # that owns the gate sets it from its saved options (Zoo-Tuning's start member).
        self.register_buffer("prior", torch.zeros(num_sources), persistent=False)
        self.has_prior = False  # the paper's gate adds nothing (not even a zero: bit-identical outputs)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """U then V kaiming-normal (fan_out), V's bias 0, and V = 0 with ``zero_init``. (U is drawn
        first, so with a fixed seed it does not depend on the number of sources.)"""
        for linear in (self.reduce, self.expand):
            nn.init.kaiming_normal_(linear.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.expand.bias)
        if self.zero_init:
            nn.init.zeros_(self.expand.weight)

    @torch.no_grad()
    def set_prior(self, gates: torch.Tensor) -> None:
        """Make act(prior) = ``gates`` (m,): with the output layer at zero every input then gets
        ``gates``, and weight decay on the output layer pulls towards them rather than towards act(0)."""
        if self.activation == "sigmoid":
            prior = torch.logit(gates)
        elif self.activation == "softmax":
            prior = gates.log()
        else:  # linear and tanh: the prior is added to the gate itself
            prior = gates
        self.prior.copy_(prior.to(self.prior.dtype))
        self.has_prior = True

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        """Global average over everything but the batch and channel dimensions -> (B, C), in the
        gate's parameter dtype (accumulated in that dtype, also for a bf16/fp16 ``h``)."""
        dtype = self.reduce.weight.dtype
        if h.dim() <= 2:
            return h.to(dtype)
        # sum / n equals mean bit for bit, but its backward divides the small pooled gradient and
        # expands it (a view), where mean's backward writes a full-size divided copy of the input's
        # shape in every aggregated layer (2-3 % of a ResNet-50 Zoo-Tuning step at 224²).
        flat = h.flatten(1, -2) if self.channels_last else h.flatten(2)
        dim = 1 if self.channels_last else 2
        return flat.sum(dim, dtype=dtype) / flat.shape[dim]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """a(h) in the parameters' dtype: under autocast too, because the gate weighs every kernel
        of the layer and costs a few multiply-adds per sample."""
        device_type = h.device.type
        if device_type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return self._gate(self.pool(h))
        return self._gate(self.pool(h))

    def _gate(self, pooled: torch.Tensor) -> torch.Tensor:
        logits = self.expand(torch.relu(self.reduce(pooled)))
        if self.activation == "tanh":
            return self.prior + torch.tanh(logits)
        if self.has_prior:
            logits = logits + self.prior
        if self.activation == "sigmoid":
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1) if self.activation == "softmax" else logits

