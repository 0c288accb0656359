"""Channel alignment of a Zoo-Tuning layer (Shu et al., ICML 2021, Sec. 3.2).

Sources pretrained separately need not order their output channels alike. Each source i gets a
learnable C_out x C_out matrix T_i that mixes its kernel's output channels,

    W~_i[o] = sum_o' T_i[o, o'] W_i[o'],        b~_i = T_i b_i,

initialised to the identity. It is applied to the weight bank (a matmul of m * C_out^2 * |W_i|/C_out
multiply-adds, independent of the batch) before any convolution, never as m per-source convolutions.
The bias is aligned with its kernel so that an aligned source is "source i followed by T_i".
"""

from __future__ import annotations

import torch
from torch import nn


def align_bank(align_weight: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """T_i @ bank_i for every source i: bank (m, C_out, ...) -> same shape (also bias banks (m, C_out))."""
    m, out_channels = bank.shape[:2]
    return torch.bmm(align_weight, bank.reshape(m, out_channels, -1)).view(bank.shape)


class ChannelAlign(nn.Module):
    """T in R^(m x C_out x C_out), identity at init; ``forward(bank)`` returns the aligned bank."""

    def __init__(self, num_sources: int, out_channels: int, dtype=None, device=None):
        super().__init__()
        eye = torch.eye(out_channels, dtype=dtype, device=device)
        self.weight = nn.Parameter(eye.expand(num_sources, -1, -1).clone())

    def forward(self, bank: torch.Tensor) -> torch.Tensor:
        """bank (m, C_out, ...) -> T_i @ bank_i, same shape."""
        return align_bank(self.weight, bank)
