"""A small MLP-Mixer for 32x32 inputs (a heterogeneous member of the MiniZoo hub).

Tolstikhin et al., "MLP-Mixer: An all-MLP Architecture for Vision", NeurIPS 2021. With tokens
X in R^{N x C}, each block mixes across tokens, then across channels::

    U = X + (W_2 GELU(W_1 LN(X)^T))^T        # token mixing, shared over channels
    Y = U + GELU(LN(U) W_3) W_4              # channel mixing, shared over tokens
    f(x) = mean_tokens(LN(Y_L))              # ``forward_features``, shape (B, dim)

The head is ``head`` (an ``nn.Linear``).
"""

from __future__ import annotations

import torch
from torch import nn


class MixerBlock(nn.Module):
    def __init__(self, num_tokens: int, dim: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(
            nn.Linear(num_tokens, token_hidden), nn.GELU(), nn.Linear(token_hidden, num_tokens)
        )
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(
            nn.Linear(dim, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MLPMixer(nn.Module):
    """MLP-Mixer with global average pooling over tokens.

    Args:
        num_classes: outputs of ``head``.
        img_size: input height = width.
        patch_size: side of the square patches (``img_size`` must be a multiple).
        dim: channel width; also ``num_features``.
        depth: number of mixer blocks.
        token_hidden: hidden width of the token-mixing MLP.
        channel_hidden: hidden width of the channel-mixing MLP.
        in_chans: input channels.
    """

    def __init__(
        self,
        num_classes: int = 10,
        img_size: int = 32,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 4,
        token_hidden: int = 32,
        channel_hidden: int = 128,
        in_chans: int = 3,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        num_tokens = (img_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.blocks = nn.Sequential(
            *(MixerBlock(num_tokens, dim, token_hidden, channel_hidden) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.num_features = dim
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features before the head, shape (B, num_features)."""
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        return self.norm(self.blocks(tokens)).mean(dim=1)

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Output tokens on the patch grid, shape (B, dim, H / patch, W / patch), for dense heads."""
        b = x.shape[0]
        grid = self.patch_embed(x)
        tokens = grid.flatten(2).transpose(1, 2)
        tokens = self.norm(self.blocks(tokens))
        return tokens.transpose(1, 2).reshape(b, -1, *grid.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def mixer_tiny32(num_classes: int = 10, **kw) -> MLPMixer:
    """Mixer for 32x32 images: 4x4 patches (64 tokens), width 64, 4 blocks."""
    return MLPMixer(num_classes=num_classes, **kw)
