"""Image transforms (torchvision is not a dependency).

Two families:

- on tensors (the built-in 32-px targets): :class:`RandomResizedCrop`, :class:`RandomHorizontalFlip`,
  :class:`Normalize`, :class:`Compose`. They draw from torch's *global* RNG (``torch.rand`` /
  ``torch.randint``), never from ``random`` or numpy: the training engine checkpoints torch's RNG
  state, so a resumed run draws the same crops and flips as an uninterrupted one. They take and
  return one image tensor of shape (C, H, W), float.
- on decoded images (users' folders, :mod:`zootune.data.folder_dataset`): :class:`RandomResizedCropFlip`
  and :class:`ResizeCenterCrop` on a PIL RGB image, drawing from a ``random.Random`` passed per
  sample, so that augmentation does not depend on DataLoader workers (see the section below).

The random-resized-crop follows torchvision's ``RandomResizedCrop`` (Szegedy et al., "Going Deeper
with Convolutions", CVPR 2015 -- "Inception-style" cropping):

    area_frac ~ U(scale),  log(aspect) ~ U(log ratio[0], log ratio[1])
    w = round(sqrt(area_frac * H * W * aspect)),  h = round(sqrt(area_frac * H * W / aspect))

accepted if it fits (up to 10 tries, else a central crop with the aspect clamped to ``ratio``); the
crop is resized to ``size`` bilinearly.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

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


# Where random numbers come from: torch's global RNG (None), a torch.Generator, or a random.Random
# instance owned by one sample (image folders: creating and seeding a random.Random and drawing from
# it costs less than a torch.Generator, whose every draw is a tensor op -- part of why a 32-px folder
# item now costs no more than the old in-memory one; dev note).
Rng = Union[None, torch.Generator, random.Random]


def uniform(rng: Rng = None) -> float:
    """One float in [0, 1) from ``rng``."""
    if isinstance(rng, random.Random):
        return rng.random()
    return torch.rand((), generator=rng).item()


def randint(rng: Rng, low: int, high: int) -> int:
    """One integer in [low, high) from ``rng``."""
    if isinstance(rng, random.Random):
        return rng.randrange(low, high)
    return int(torch.randint(low, high, (), generator=rng).item())


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    rng: Rng = None,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random-resized crop of a ``height`` x ``width`` image (the formula in the
    module docstring), drawn from ``rng`` (see :func:`uniform`; torch's global RNG when None)."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * uniform(rng))
        aspect = math.exp(log_lo + (log_hi - log_lo) * uniform(rng))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = randint(rng, 0, height - h + 1)
            left = randint(rng, 0, width - w + 1)
            return top, left, h, w
    # fallback: the largest central crop whose aspect lies within ``ratio``
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


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

    def crop_box(self, height: int, width: int, rng: Rng = None) -> tuple[int, int, int, int]:
        """(top, left, h, w) of the crop, drawn from ``rng`` (torch's global RNG when None)."""
        return random_resized_crop_box(height, width, self.scale, self.ratio, rng)

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


# ---------------------------------------------------------------------------------------------------
# Image-folder transforms: on the decoded original, one random.Random per sample.
#
# Folders follow the ImageNet protocol the Zoo-Tuning paper trains with: a random-resized crop of the
# ORIGINAL image resized to ``size`` x ``size`` plus a horizontal flip for training; for evaluation the
# shorter side resized to round(size / crop_fraction) (crop_fraction 0.875: 256 for 224) and the
# central size x size crop. Evaluation resizes with Pillow's bilinear filter (antialiased when
# shrinking, as torchvision on PIL images) and gives uint8 (size, size, 3) pixels; training crops are
# normalised and resized with torch's antialiased bilinear :func:`resize` (the targets' filter), which
# was faster than Pillow's in a quick timing of a crop at 32 px and at 224 px (dev note).

EVAL_CROP_FRACTION = 0.875


def shorter_side_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) after resizing so the shorter side is ``shorter`` (torchvision's rounding:
    the longer side is ``int(shorter * long / short)``)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


class ResizeCenterCrop:
    """Evaluation transform: shorter side to ``round(size / crop_fraction)``, then the central
    ``size`` x ``size`` crop (top/left offsets ``round((H - size) / 2)``, ``round((W - size) / 2)``)."""

    def __init__(self, size: int, crop_fraction: float = EVAL_CROP_FRACTION):
        if not 0 < crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        self.size = int(size)
        self.crop_fraction = crop_fraction
        self.resize_to = int(round(self.size / crop_fraction))

    def resized(self, image: Image.Image) -> Image.Image:
        """The image with its shorter side at ``resize_to`` (the image itself when already there)."""
        target = shorter_side_size(image.width, image.height, self.resize_to)
        if target == image.size:
            return image
        return image.resize(target, Image.BILINEAR)

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = self.resized(image)
        top = int(round((image.height - self.size) / 2.0))
        left = int(round((image.width - self.size) / 2.0))
        return np.asarray(image.crop((left, top, left + self.size, top + self.size)))

    def __repr__(self) -> str:
        return f"ResizeCenterCrop(size={self.size}, crop_fraction={self.crop_fraction})"


class RandomResizedCropFlip:
    """Training transform: a random-resized crop of the original (:func:`random_resized_crop_box`)
    resized to ``size`` x ``size``, then mirrored left-right with probability ``flip_p``. Every draw
    comes from the ``rng`` passed in (one per sample, seeded by :func:`zootune.engine.sampler.sample_seed`)."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        flip_p: float = 0.5,
    ):
        if not (0 < scale[0] <= scale[1] <= 1.0):
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
        if not 0 <= flip_p <= 1:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        self.size = int(size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.flip_p = flip_p

    def __call__(self, pixels: np.ndarray, rng: Rng = None, table: np.ndarray | None = None) -> torch.Tensor:
        """``pixels``: the decoded original, uint8 (H, W, 3); returns the normalised crop, float32
        (3, size, size). ``table``: a :func:`normalization_table` (ImageNet statistics when None)."""
        height, width = pixels.shape[:2]
        top, left, h, w = random_resized_crop_box(height, width, self.scale, self.ratio, rng)
        crop = pixels[top:top + h, left:left + w]
        if self.flip_p > 0 and uniform(rng) < self.flip_p:
            crop = crop[:, ::-1]
        # normalising commutes with a resize (a weighted mean), so it is done on the crop, in uint8 lookups
        return resize(to_normalized_chw(crop, table=table), (self.size, self.size))

    def __repr__(self) -> str:
        return f"RandomResizedCropFlip(size={self.size}, scale={self.scale}, ratio={self.ratio}, flip_p={self.flip_p})"


# name -> (crop scale, flip probability); None: no random augmentation (the evaluation transform).
AUGMENT_PRESETS: dict[str, tuple[tuple[float, float], float] | None] = {
    "paper": ((0.08, 1.0), 0.5),  # the ImageNet/Zoo-Tuning protocol
    "light": ((0.35, 1.0), 0.5),  # crops keep >= 35% of the area: small images, objects filling the frame
    "no-flip": ((0.08, 1.0), 0.0),  # for classes that a mirror changes (text, arrows, left/right)
    "none": None,
}


def folder_train_transform(augment: str | RandomResizedCropFlip | None, size: int) -> RandomResizedCropFlip | None:
    """The training transform of a preset name (:data:`AUGMENT_PRESETS`), an explicit
    :class:`RandomResizedCropFlip`, or None (= ``"none"``: train on the evaluation transform)."""
    if augment is None or isinstance(augment, RandomResizedCropFlip):
        return augment
    if augment not in AUGMENT_PRESETS:
        raise ValueError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENT_PRESETS)}")
    preset = AUGMENT_PRESETS[augment]
    if preset is None:
        return None
    scale, flip_p = preset
    return RandomResizedCropFlip(size, scale=scale, flip_p=flip_p)


def normalization_table(mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> np.ndarray:
    """float32 (3, 256): ``table[c, v] = (v / 255 - mean[c]) / std[c]``, each step one correctly
    rounded float32 operation, as in :func:`normalize_batch` (so the values are bit for bit the same)."""
    values = np.arange(256, dtype=np.float32)[:, None]
    table = (values / np.float32(255.0) - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(table.T)


def to_normalized_chw(
    pixels_hwc_uint8: np.ndarray, mean: Sequence[float] = MEAN, std: Sequence[float] = STD, table: np.ndarray | None = None
) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W): ``(x / 255 - mean[c]) / std[c]``, looked up in
    :func:`normalization_table` (pass ``table`` to reuse one): a lookup per pixel was faster than
    the arithmetic in a quick timing at 224 px, and gives the same bits."""
    table = normalization_table(mean, std) if table is None else table
    height, width = pixels_hwc_uint8.shape[:2]
    out = np.empty((3, height, width), dtype=np.float32)
    for c in range(3):
        np.take(table[c], pixels_hwc_uint8[..., c], out=out[c])
    return torch.from_numpy(out)
