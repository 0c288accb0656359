"""Image transforms on tensors (torchvision is not a dependency).

Every random choice is drawn from torch's *global* RNG (``torch.rand`` / ``torch.randint``), never
from ``random`` or numpy: the training engine checkpoints torch's RNG state, so a resumed run draws
the same crops and flips as an uninterrupted one. Transforms take and return one image tensor of
shape (C, H, W), float.

The random-resized-crop follows torchvision's ``RandomResizedCrop`` (Szegedy et al., "Going Deeper
with Convolutions", CVPR 2015 -- "Inception-style" cropping):

    area_frac ~ U(scale),  log(aspect) ~ U(log ratio[0], log ratio[1])
    w = round(sqrt(area_frac * H * W * aspect)),  h = round(sqrt(area_frac * H * W / aspect))

accepted if it fits (up to 10 tries, else a central crop with the aspect clamped to ``ratio``); the
crop is resized to ``size`` bilinearly.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

# Fixed per-channel statistics used for every dataset zootune ships and for users' image folders
# (ImageNet's, so that a user's torchvision-pretrained checkpoint sees familiar input statistics).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[torch.Tensor], torch.Tensor]]):
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            image = t(image)
        return image

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class Normalize:
    """out[c] = (x[c] - mean[c]) / std[c]."""

    def __init__(self, mean: Sequence[float] = MEAN, std: Sequence[float] = STD):
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.mean.to(image.dtype)) / self.std.to(image.dtype)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand(()).item() < self.p:
            return image.flip(-1)
        return image

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (C, H, W) tensor to ``size`` = (height, width)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    # antialias only matters (and is only supported) when shrinking
    shrink = image.shape[-2] > size[0] or image.shape[-1] > size[1]
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=shrink)[0]


class RandomResizedCrop:
    """Crop a random area/aspect region and resize it to ``size`` (torchvision's algorithm)."""

    def __init__(
        self,
        size: int | tuple[int, int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    ):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if not (0 < scale[0] <= scale[1] <= 1.0):
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
        self.scale = scale
        self.ratio = ratio

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, h, w) of the crop, drawn from torch's global RNG."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand(()).item())
            aspect = math.exp(log_lo + (log_hi - log_lo) * torch.rand(()).item())
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, ()).item())
                left = int(torch.randint(0, width - w + 1, ()).item())
                return top, left, h, w
        # fallback: the largest central crop whose aspect lies within ``ratio``
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        top, left, h, w = self.crop_box(image.shape[-2], image.shape[-1])
        return resize(image[..., top:top + h, left:left + w], self.size)

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


def to_float_chw(images_hwc_uint8) -> torch.Tensor:
    """uint8 images (N, H, W, C) or (N, H, W) as a float tensor (N, 3, H, W) in [0, 1].

    Grayscale is repeated to three channels so every dataset feeds the same 3-channel models.
    """
    x = torch.as_tensor(images_hwc_uint8)
    if x.dim() == 3:
        x = x[..., None]
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 4:  # RGBA: drop alpha
        x = x[:, :3]
    return x.contiguous()


def normalize_batch(images: torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """Normalize a batch (N, C, H, W) with the fixed statistics (same formula as :class:`Normalize`)."""
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


def default_train_transform(size: int, flip: bool = True, scale: tuple[float, float] = (0.35, 1.0)) -> Compose:
    """Random-resized crop (milder minimum scale than ImageNet's 0.08: the images are already small)
    followed by an optional horizontal flip. Applied to already-normalised images; cropping and
    flipping commute with the per-channel normalisation."""
    steps: list = [RandomResizedCrop(size, scale=scale)]
    if flip:
        steps.append(RandomHorizontalFlip(0.5))
    return Compose(steps)
