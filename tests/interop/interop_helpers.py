"""Shared pieces of the interop lane: the model families, tiny zoos of them, a training step."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

HAVE_TORCHVISION = importlib.util.find_spec("torchvision") is not None
HAVE_TIMM = importlib.util.find_spec("timm") is not None
REASON = "{} is not installed here; the interop lane runs in .venv-interop (README: Bring your own zoo)"
needs_torchvision = pytest.mark.skipif(not HAVE_TORCHVISION, reason=REASON.format("torchvision"))
needs_timm = pytest.mark.skipif(not HAVE_TIMM, reason=REASON.format("timm"))
needs_both = pytest.mark.skipif(not (HAVE_TIMM and HAVE_TORCHVISION), reason=REASON.format("torchvision or timm"))

SIZE = 32  # every model runs on 32 x 32 images (ViTs are built for it)
CLASSES = 3


@dataclass(frozen=True)
class Family:
    """A library architecture as the lane uses it: ``arch`` for ``build_model`` (timm:... /
    torchvision:...), builder arguments, and Zoo-Tuning options."""

    arch: str
    kwargs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    members: int = 2

    @property
    def library(self) -> str:
        return self.arch.partition(":")[0]

    def mark(self):
        return needs_timm if self.library == "timm" else needs_torchvision


# Transformers aggregate their Linear layers too (by default only the patch embedding would be).
LINEAR = {"target_types": ("conv", "linear")}
FAMILIES = {
    "tv_resnet18": Family("torchvision:resnet18"),
    "tv_resnet50": Family("torchvision:resnet50"),
    "tv_mobilenet_v3_small": Family("torchvision:mobilenet_v3_small"),
    "tv_efficientnet_b0": Family("torchvision:efficientnet_b0"),
    "tv_convnext_tiny": Family("torchvision:convnext_tiny", options=LINEAR),
    "tv_vit_b_16": Family("torchvision:vit_b_16", {"image_size": SIZE}, LINEAR),
    "timm_resnet50": Family("timm:resnet50"),
    "timm_convnext_atto": Family("timm:convnext_atto", options=LINEAR),
    "timm_efficientnet_b0": Family("timm:efficientnet_b0"),
    "timm_tf_efficientnet_b0": Family("timm:tf_efficientnet_b0"),
    "timm_mobilenetv3_small_100": Family("timm:mobilenetv3_small_100"),
    "timm_vit_tiny_patch16_224": Family("timm:vit_tiny_patch16_224", {"img_size": SIZE}, LINEAR),
    "timm_resnetv2_50x1_bit": Family("timm:resnetv2_50x1_bit"),
}


def family_params(names=None):
    return [pytest.param(name, marks=FAMILIES[name].mark(), id=name) for name in (names or FAMILIES)]


def build(family: Family, seed: int, **kwargs):
    from zootune.models import build_model

    torch.manual_seed(seed)
    return build_model(family.arch, **{**family.kwargs, **kwargs}).eval()


def make_members(family: Family, m: int | None = None):
    """m models of the family, each from its own seed (different weights, same architecture)."""
    return [build(family, seed) for seed in range(m or family.members)]


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=generator)


def labels(n: int = 4) -> torch.Tensor:
    return torch.arange(n) % CLASSES


def train_step(model, x, y, *, lr: float = 0.01, autocast: bool = False) -> float:
    """One SGD step on cross-entropy (+ the method's auxiliary loss), optionally under bf16 autocast."""
    model.train()
    groups = model.param_groups(lr) if hasattr(model, "param_groups") else [{"params": model.parameters()}]
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
        loss = F.cross_entropy(out.float(), y)
        if hasattr(model, "auxiliary_loss"):
            loss = loss + model.auxiliary_loss(out, y)
    optimizer.zero_grad()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads), "non-finite or missing gradients"
    optimizer.step()
    return float(loss.detach())
