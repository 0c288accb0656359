"""The defaults that fit a user's folder: input size and augmentation chosen from the images.

``zootune fit`` without ``--image-size`` / ``--augment`` (both ``"auto"``) resolves them here, from
the image headers the loader reads anyway (no decoding), and says what it chose and why:

- **input size**: the zoo's own input size when its pretrained config has one (a timm/torchvision/hub
  model trained at 224 px is given 224-px inputs); otherwise the median shorter side of the folder's
  images, rounded down to a multiple of 8 and kept within [32, 224] (:func:`auto_image_size`): a folder of
  32-px images trains at 32, one of 64-px photos at 64, one of large photos at 224 -- never upscaled
  past the pixels the images have, never below what a small CNN needs.
- **augmentation** (:func:`auto_augment`), from the input size: below 64 px ``"none"`` (the paper's
  random-resized crop, made for 224-px photos, keeps as little as 8% of an image: of a 32-px image a
  few pixels), 64-95 px ``"light"`` (crops keep >= 35%), 96 px and more the paper's protocol
  (``"paper"``). Measurements: docs/dev-notes/cli-and-run.md.
"""

from __future__ import annotations

import numpy as np

AUTO = "auto"
MIN_AUTO_SIZE = 32
MAX_AUTO_SIZE = 224
LIGHT_FROM = 64  # px: "light" augmentation from this input size on ("none" below)
PAPER_FROM = 96  # px: the paper's augmentation from this input size on


def auto_image_size(sizes: np.ndarray, zoo_input_size: int | None = None) -> tuple[int, str]:
    """(input size, why) from the training images' (width, height) rows and the zoo's input size."""
    if zoo_input_size:
        return int(zoo_input_size), f"the zoo's pretrained input size {zoo_input_size}"
    shorter = int(np.median(np.minimum(sizes[:, 0], sizes[:, 1])))
    size = int(min(MAX_AUTO_SIZE, max(MIN_AUTO_SIZE, 8 * (shorter // 8))))
    return size, (f"the images' median shorter side {shorter} px, rounded down to a multiple of 8 "
                  f"within [{MIN_AUTO_SIZE}, {MAX_AUTO_SIZE}]")


def auto_augment(image_size: int) -> tuple[str, str]:
    """(augmentation preset, why) for training at ``image_size``."""
    if image_size < LIGHT_FROM:
        return "none", f"input {image_size} px < {LIGHT_FROM}: a random crop would keep a few pixels"
    if image_size < PAPER_FROM:
        return "light", f"input {image_size} px in [{LIGHT_FROM}, {PAPER_FROM}): crops keeping >= 35% + flip"
    return "paper", f"input {image_size} px >= {PAPER_FROM}: the paper's random-resized crop + flip"


__all__ = ["AUTO", "auto_augment", "auto_image_size"]
