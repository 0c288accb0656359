"""Users' landmark data: images with 300W-style ``.pts`` point files next to them
(:func:`load_landmark_folder`), each face cropped around its points and resized; and the dataset of
images with landmarks (:class:`LandmarkDataset`) that the generated ``landmarks`` target
(:mod:`zootune.suite.faces`) uses too.

Augmentation: none. A horizontal flip would have to swap every left/right index pair and mirror x;
a crop would have to move the points (see ``docs/landmarks.md``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from zootune.data.transforms import normalize_batch, to_float_chw
from zootune.errors import DataError

class LandmarkDataset(Dataset):
    """Images (N, 3, H, W), already normalised, with landmarks (N, K, 2) in [0, 1] image coordinates.

    Yields ``(image, landmarks)``; ``landmarks`` is a float32 (K, 2) tensor of (x, y). No transform:
    see the module docstring for why the landmark target is not augmented geometrically.
    """

    def __init__(self, images: torch.Tensor, landmarks: torch.Tensor | np.ndarray, transform=None):
        if transform is not None:  # the argument exists so the target suite can build it like ImageDataset
            raise DataError("LandmarkDataset takes no image transform: it would not move the landmarks")
        landmarks = torch.as_tensor(np.asarray(landmarks), dtype=torch.float32)
        if images.dim() != 4:
            raise DataError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if landmarks.dim() != 3 or landmarks.shape[2] != 2:
            raise DataError(f"landmarks must have shape (N, K, 2), got {tuple(landmarks.shape)}")
        if images.shape[0] != landmarks.shape[0]:
            raise DataError(f"{images.shape[0]} images but {landmarks.shape[0]} landmark sets")
        self.images = images.float()
        self.landmarks = landmarks

    def __len__(self) -> int:
        return self.landmarks.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.landmarks[index]

    @classmethod
    def from_uint8(cls, images: np.ndarray, landmarks: np.ndarray) -> LandmarkDataset:
        """From uint8 (N, H, W, 3) pictures, normalised like every zootune dataset."""
        return cls(normalize_batch(to_float_chw(images)), landmarks)


def read_pts(path: str | os.PathLike) -> np.ndarray:
    """Points of a 300W-style ``.pts`` file as a float64 (K, 2) array of (x, y) pixels.

    The format (ibug 300W, also used by Menpo)::

        version: 1
        n_points:  68
        {
        x1 y1
        ...
        }

    300W's coordinates are 1-based (MATLAB); they are returned as written.
    """
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    count = None
    for line in lines:
        if line.lower().startswith("n_points"):
            try:
                count = int(line.split(":", 1)[1])
            except (IndexError, ValueError):
                raise DataError(f"{path}: bad n_points line {line!r}") from None
    if "{" not in lines or "}" not in lines or count is None:
        raise DataError(f"{path} is not a .pts file (expected 'n_points: K' and a '{{ ... }}' block of 'x y' lines)")
    body = lines[lines.index("{") + 1: lines.index("}")]
    try:
        points = np.array([[float(v) for v in line.split()] for line in body if line], dtype=np.float64)
    except ValueError:
        raise DataError(f"{path}: a point line is not two numbers") from None
    if points.shape != (count, 2):
        raise DataError(f"{path}: n_points says {count} but the block has {len(body)} lines of shape {points.shape[1:]}")
    if not np.isfinite(points).all():
        raise DataError(f"{path}: non-finite coordinates")
    return points


def crop_face(image: np.ndarray, points: np.ndarray, size: int = 32, margin: float = 0.25):
    """Crop a square around ``points`` (their box enlarged by ``margin`` on every side), resize it to
    size x size; returns (uint8 (size, size, 3) image, points in [0, 1] of the crop)."""
    from PIL import Image

    lo, hi = points.min(axis=0), points.max(axis=0)
    centre, side = (lo + hi) / 2, (hi - lo).max() * (1 + 2 * margin)
    if side <= 0:
        raise DataError("all points of a face coincide: cannot crop around them")
    left, top = centre - side / 2
    picture = Image.fromarray(image).convert("RGB")
    # the crop box may leave the picture: PIL pads with black, and the points stay consistent
    crop = picture.transform(
        (size, size), Image.Transform.EXTENT, (left, top, left + side, top + side), resample=Image.Resampling.BILINEAR
    )
    return np.asarray(crop, dtype=np.uint8), ((points - [left, top]) / side).astype(np.float32)


def load_landmark_folder(
    root: str | os.PathLike, size: int = 32, margin: float = 0.25, one_based: bool = True,
    extensions: Sequence[str] = (".jpg", ".jpeg", ".png", ".bmp"),
) -> LandmarkDataset:
    """Every image under ``root`` that has a ``.pts`` file of the same name, as a :class:`LandmarkDataset`.

    Each face is cropped around its points (:func:`crop_face`) and resized to ``size``; coordinates
    are made 0-based (300W's are 1-based) when ``one_based``. All files must have the same number of
    points.
    """
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"no folder at {root}")
    pictures = sorted(p for p in root.rglob("*") if p.suffix.lower() in extensions and p.with_suffix(".pts").is_file())
    if not pictures:
        raise DataError(f"no image with a .pts file next to it under {root}")
    images, landmarks = [], []
    for picture in pictures:
        points = read_pts(picture.with_suffix(".pts")) - (1.0 if one_based else 0.0)
        if landmarks and len(points) != landmarks[0].shape[0]:
            raise DataError(f"{picture.with_suffix('.pts')} has {len(points)} points, the first file had "
                            f"{landmarks[0].shape[0]}")
        try:
            with Image.open(picture) as opened:
                array = np.asarray(opened.convert("RGB"))
        except OSError as err:
            raise DataError(f"cannot read image {picture}: {err}") from None
        crop, normalised = crop_face(array, points, size, margin)
        images.append(crop)
        landmarks.append(normalised)
    return LandmarkDataset.from_uint8(np.stack(images), np.stack(landmarks))
