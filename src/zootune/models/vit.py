"""A small Vision Transformer for 32x32 inputs (a heterogeneous member of the MiniZoo hub).

Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021. Pre-norm encoder blocks::

    z_0 = [patch_embed(x)] + pos
    z'_l = z_{l-1} + MSA(LN(z_{l-1}))
    z_l  = z'_l + MLP(LN(z'_l))
    f(x) = LN(mean_tokens(z_L))                      # ``forward_features``, shape (B, dim)

We pool by the token mean instead of a class token (fewer parameters, same accuracy at this size);
the head is ``head`` (an ``nn.Linear``), so :func:`zootune.models.heads.find_head_name` finds it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention: softmax(Q K^T / sqrt(d_head)) V, heads concatenated, projected."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT with mean-token pooling.

    Args:
        num_classes: outputs of ``head``.
        img_size: input height = width.
        patch_size: side of the square patches (``img_size`` must be a multiple).
        dim: token width; also ``num_features``.
        depth: number of encoder blocks.
        num_heads: attention heads per block.
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
        in_chans: input channels.
    """

    def __init__(
        self,
        num_classes: int = 10,
        img_size: int = 32,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        in_chans: int = 3,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.patch_embed = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], dim))
        self.blocks = nn.Sequential(*(EncoderBlock(dim, num_heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.num_features = dim
        self.head = nn.Linear(dim, num_classes)

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def position_embedding(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """(1, h*w, dim) position embedding for an h x w patch grid.

        Another input size than ``img_size`` gets the learned embedding resized bicubically on the
        grid (as in the ViT paper's fine-tuning at higher resolution).
        """
        if tuple(grid_size) == self.grid_size:
            return self.pos_embed
        grid = self.pos_embed.reshape(1, *self.grid_size, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=tuple(grid_size), mode="bicubic", align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        grid = self.patch_embed(x)
        grid_size = tuple(grid.shape[2:])
        return grid.flatten(2).transpose(1, 2) + self.position_embedding(grid_size), grid_size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features before the head, shape (B, num_features)."""
        tokens, _ = self._tokens(x)
        return self.norm(self.blocks(tokens).mean(dim=1))

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Output tokens on the patch grid, shape (B, dim, H / patch, W / patch), for dense heads."""
        tokens, grid_size = self._tokens(x)
        return self.blocks(tokens).transpose(1, 2).reshape(x.shape[0], -1, *grid_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def vit_tiny32(num_classes: int = 10, **kw) -> VisionTransformer:
    """ViT for 32x32 images: 4x4 patches (64 tokens), width 64, 4 blocks, 4 heads."""
    return VisionTransformer(num_classes=num_classes, **kw)
