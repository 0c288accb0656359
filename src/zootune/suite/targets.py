"""The target suite: small classification tasks whose images no MiniZoo member was trained on.

Each target has small train / val / test splits (hundreds of images, 3x32x32) so that training from
scratch is clearly worse than transferring, and each is closest to a *different* MiniZoo member, so
that adaptive aggregation over the zoo (Zoo-Tuning) has something to choose:

| target | images | classes | closest member |
|---|---|---|---|
| ``digits8x8`` | scikit-learn's 8x8 digits, upsampled | 10 digits | ``mnist-supervised`` |
| ``textures`` | crops of 10 grey skimage pictures (disjoint regions per split) | 10 pictures | ``photo-simclr`` |
| ``count`` | 1-6 outlined ellipses on striped clutter | 6 counts | ``scene-counting`` / ``scene-segmentation`` |
| ``polygons`` | one outlined convex polygon | 3-6 sides | ``scene-segmentation`` / ``shape-keypoints`` |

Beyond classification, ``landmarks`` (8 landmarks of generated cartoon faces, scored by NME; see
:mod:`zootune.suite.faces`) is in :data:`EXTRA_TARGETS`: run when named, never part of ``all``;
so is ``letters`` (:mod:`zootune.suite.letters`), the robustness benchmark's uneven target.

``get_target(name, seed)`` is deterministic for a seed; different seeds give different draws (images
of generated targets, the split of ``digits8x8``). Generated arrays are cached as ``.npz`` under
``<cache>/targets`` (see :func:`zootune.data.cache.user_cache_dir`).
"""

from __future__ import annotations

import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from zootune.data.landmarks import LandmarkDataset
from zootune.suite import bundled, faces, letters, scenes
from zootune.data.cache import atomic_save_npz, user_cache_dir
from zootune.data.datasets import DatasetSplits, ImageDataset, stratified_split
from zootune.data.transforms import Compose, RandomHorizontalFlip, RandomResizedCrop, normalize_batch, to_float_chw
from zootune.errors import DataError
from zootune.tasks.landmarks import LandmarkTask

SPLITS = ("train", "val", "test")
# bump when a generator changes so stale cached arrays are not reused
GENERATOR_VERSION = 2

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (uint8 images (N, 32, 32[, 3]), int64 labels)


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    class_names: tuple[str, ...]
    make_arrays: Callable[[int], Arrays]
    make_train_transform: Callable[[], Callable]
    cached: bool = True
    # Targets that are not classification: the dataset built from (normalised images, annotations,
    # train transform) and the task; ``class_names`` then names the outputs (e.g. the landmarks).
    make_dataset: Callable | None = None
    make_task: Callable[[], object] | None = None
    version: int = 0  # this generator's own version, bumped when it changes (cache file name)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _split_seed(name: str, seed: int, split: str) -> int:
    """Independent generator seed per (target, seed, split): splits never share a random stream."""
    return zlib.crc32(f"{name}/{seed}/{split}".encode()) & 0x7FFFFFFF


# ---------------------------------------------------------------------------- digits8x8

def _digits_arrays(seed: int) -> Arrays:
    images, labels = bundled.sklearn_digits()
    parts = stratified_split(labels, (0.3, 0.2, 0.5), seed=seed)
    return {split: (images[idx], labels[idx]) for split, idx in zip(SPLITS, parts)}


# ---------------------------------------------------------------------------- textures

TEXTURE_PER_CLASS = {"train": 50, "val": 30, "test": 60}
# each picture is cut into column bands, one per split, so no test crop overlaps a training crop
TEXTURE_REGIONS = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}


def _texture_arrays(seed: int) -> Arrays:
    out: Arrays = {}
    for split in SPLITS:
        rng = np.random.default_rng(_split_seed("textures", seed, split))
        images, labels = [], []
        for label, name in enumerate(bundled.TEXTURE_TARGET_IMAGES):
            picture = bundled.skimage_image(name)
            images.append(bundled.random_crops(
                picture, TEXTURE_PER_CLASS[split], rng, side_range=(20, 64), column_range=TEXTURE_REGIONS[split]
            ))
            labels.append(np.full(TEXTURE_PER_CLASS[split], label, np.int64))
        out[split] = (np.concatenate(images), np.concatenate(labels))
    return out


# ---------------------------------------------------------------------------- generated scenes

def _generated(name: str, generator, sizes: dict[str, int]) -> Callable[[int], Arrays]:
    def make(seed: int) -> Arrays:
        return {split: generator(sizes[split], _split_seed(name, seed, split)) for split in SPLITS}
    return make


def _flip_only():
    # cropping could cut objects away and change a count / a polygon's corners, so only mirror
    return Compose([RandomHorizontalFlip(0.5)])


TARGETS: "OrderedDict[str, TargetSpec]" = OrderedDict()


# Targets run only when named (``--targets landmarks``), never part of ``all``: tasks other than
# classification, whose metric cannot be averaged with accuracy into one "mean" column.
EXTRA_TARGETS: "OrderedDict[str, TargetSpec]" = OrderedDict()


def register_target(spec: TargetSpec, extra: bool = False) -> None:
    (EXTRA_TARGETS if extra else TARGETS)[spec.name] = spec


register_target(TargetSpec(
    name="digits8x8",
    description="scikit-learn's 8x8 handwritten digits upsampled to 32x32 (~540 train / 360 val / 900 test)",
    class_names=tuple(str(d) for d in range(10)),
    make_arrays=_digits_arrays,
    make_train_transform=lambda: RandomResizedCrop(32, scale=(0.7, 1.0), ratio=(0.9, 1.1)),
    cached=False,  # loading and resizing takes well under a second
))
register_target(TargetSpec(
    name="textures",
    description="which of 10 grey scikit-image pictures a 32x32 crop comes from (500 / 300 / 600)",
    class_names=bundled.TEXTURE_TARGET_IMAGES,
    make_arrays=_texture_arrays,
    make_train_transform=lambda: Compose([RandomResizedCrop(32, scale=(0.35, 1.0)), RandomHorizontalFlip()]),
))
register_target(TargetSpec(
    name="count",
    description="how many outlined ellipses (1-6) are in a cluttered scene (720 / 300 / 600)",
    class_names=tuple(str(c) for c in range(1, 7)),
    make_arrays=_generated("count", scenes.count_target_scenes, {"train": 720, "val": 300, "test": 600}),
    make_train_transform=_flip_only,
))
register_target(TargetSpec(
    name="polygons",
    description="number of sides (3-6) of an outlined irregular convex polygon (600 / 300 / 600)",
    class_names=tuple(f"{s}-gon" for s in scenes.POLYGON_SIDES),
    make_arrays=_generated("polygons", scenes.polygon_target_shapes, {"train": 600, "val": 300, "test": 600}),
    make_train_transform=_flip_only,
))

register_target(TargetSpec(
    name="landmarks",
    description=f"{faces.NUM_LANDMARKS} landmarks of generated cartoon faces under pose, lighting, "
                "background and occlusion; NME (800 / 300 / 600)",
    class_names=faces.LANDMARK_NAMES,
    make_arrays=_generated("landmarks", faces.face_scenes, {"train": 800, "val": 300, "test": 600}),
    make_train_transform=lambda: None,  # a flip or crop would have to move the points (suite/faces.py)
    make_dataset=LandmarkDataset,
    version=faces.GENERATOR_VERSION,
    make_task=lambda: LandmarkTask(faces.NUM_LANDMARKS, "inter-ocular", faces.EYE_INDICES,
                                   landmark_names=faces.LANDMARK_NAMES),
), extra=True)

# An uneven target for the robustness benchmark (benchmarks/robustness.py): one member far above the
# others, most no better than training from scratch. Extra, so the suite's numbers do not change.
register_target(TargetSpec(
    name="letters",
    description="which of 10 capital letters, typeset in 21 font faces bundled with matplotlib, in colour "
                "on a smooth colour field (600 / 300 / 600)",
    class_names=letters.LETTERS,
    make_arrays=_generated("letters", letters.letter_scenes, {"train": 600, "val": 300, "test": 600}),
    make_train_transform=lambda: None,  # letters are not mirror-symmetric, and a crop can cut a stroke away
    version=letters.GENERATOR_VERSION,
), extra=True)

DEFAULT_TARGET = "textures"


def _cached_arrays(spec: TargetSpec, seed: int, cache_dir) -> Arrays:
    if not spec.cached:
        return spec.make_arrays(seed)
    version = f"{GENERATOR_VERSION}.{spec.version}" if spec.version else f"{GENERATOR_VERSION}"
    path = user_cache_dir(cache_dir) / "targets" / f"{spec.name}-seed{seed}-v{version}.npz"
    if path.exists():
        try:
            with np.load(path) as f:
                return {s: (f[f"{s}_images"], f[f"{s}_labels"]) for s in SPLITS}
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is regenerated below
    arrays = spec.make_arrays(seed)
    try:
        atomic_save_npz(path, **{f"{s}_{k}": v for s in SPLITS for k, v in zip(("images", "labels"), arrays[s])})
    except OSError:
        pass  # a read-only cache only costs regeneration time
    return arrays


def get_target(name: str, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> DatasetSplits:
    """The target task ``name`` as train (augmented) / val / test :class:`DatasetSplits`."""
    spec = TARGETS.get(name) or EXTRA_TARGETS.get(name)
    if spec is None:
        raise DataError(f"unknown target {name!r}; available: {', '.join([*TARGETS, *EXTRA_TARGETS])}")
    arrays = _cached_arrays(spec, int(seed), cache_dir)
    make_dataset = spec.make_dataset or ImageDataset
    datasets = {}
    for split in SPLITS:
        images, labels = arrays[split]
        tensor = normalize_batch(to_float_chw(images))
        datasets[split] = make_dataset(tensor, labels, spec.make_train_transform() if split == "train" else None)
    return DatasetSplits(
        train=datasets["train"], val=datasets["val"], test=datasets["test"],
        num_classes=spec.num_classes, name=name, description=spec.description,
        class_names=list(spec.class_names), task=spec.make_task() if spec.make_task is not None else None,
    )
