"""The defaults that fit a user's folder: input size and augmentation chosen from the images.

``zootune fit`` without ``--image-size`` / ``--augment`` (both ``"auto"``) resolves them here, from
the image headers the loader reads anyway (no decoding), and says what it chose and why:

- **input size**: the zoo's own input size when its pretrained config has one (a timm/torchvision/hub
  model trained at 224 px is given 224-px inputs); otherwise the median shorter side of the folder's
  images, rounded down to a multiple of 8 and kept within [32, 224] (:func:`auto_image_size`): a folder of
  32-px images trains at 32, one of 64-px photos at 64, one of large photos at 224 -- never upscaled
  past the pixels the images have, never below what a small CNN needs.
- **augmentation** (:func:`auto_augment`), from the input size: below 96 px ``"light"`` (crops keep
  >= 35% of the image, + flip: the paper's random-resized crop, made for 224-px photos, keeps as
  little as 8%, of a 32-px image a few pixels), 96 px and more the paper's protocol (``"paper"``).
  No augmentation at all overfits at the step budget's many passes over a small folder.
  Measurements: docs/dev-notes/cli-and-run.md.
"""

from __future__ import annotations

import numpy as np

AUTO = "auto"
MIN_AUTO_SIZE = 32
MAX_AUTO_SIZE = 224
PAPER_FROM = 96  # px: the paper's augmentation from this input size on ("light" below)


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
    if image_size < PAPER_FROM:
        return "light", (f"input {image_size} px < {PAPER_FROM}: crops keeping >= 35% + flip (the paper's "
                         "crop would keep a few pixels; none overfits at the step budget)")
    return "paper", f"input {image_size} px >= {PAPER_FROM}: the paper's random-resized crop + flip"


__all__ = ["AUTO", "auto_augment", "auto_image_size"]
