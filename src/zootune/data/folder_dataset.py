"""A dataset of image files decoded on demand, with per-sample seeded augmentation and an optional
uint8 RAM cache.

Memory hardly grows with the number of images: the dataset holds paths and labels (about a hundred
bytes per image, in numpy buffers: a list of Python objects would be copied page by page into every
forked worker as reference counts change -- PyTorch's known "leak" with lists in datasets); each item
is read from its file (:func:`zootune.data.decode.read_rgb`) when asked for -- in ``DataLoader`` workers
when ``num_workers > 0`` -- and transformed (:mod:`zootune.data.transforms`).

Keys. ``dataset[(index, sample_seed)]`` draws the item's augmentation from its own
``random.Random(sample_seed)`` (not the global ``random`` state); the engine's batch sampler yields such keys with
``sample_seed = f(run seed, epoch, index)`` (:func:`zootune.engine.sampler.sample_seed`), so the crops
and flips of a run depend on nothing else: not on the number of workers, their scheduling, the number
of processes, or an interruption and ``--resume``. A plain ``dataset[index]`` (any other sampler)
draws that seed from torch's global RNG instead, which is reproducible under ``torch.manual_seed``
with ``num_workers=0``. Without augmentation the key's seed is ignored.

Cache (:class:`PixelCache`). When a split fits a memory budget its pixels are decoded once, in
threads, into one uint8 tensor (shared with fork-started workers, and passed to spawn-started ones
through shared memory): training splits keep the decoded originals, evaluation splits the final
evaluation crops. Either is exactly what decoding the file gives, so the cache changes speed, never a
number.
"""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from zootune.data.decode import DEFAULT_MAX_PIXELS, default_scan_threads, read_rgb, scan_images, size_warnings_ignored
from zootune.data.transforms import (
    EVAL_CROP_FRACTION, MEAN, STD, RandomResizedCropFlip, ResizeCenterCrop, folder_train_transform,
    normalization_table, to_normalized_chw,
)
from zootune.errors import DataError

DECODED = "decoded"  # cache of whole decoded images (serves training and evaluation)
EVAL_CROPS = "eval"  # cache of final evaluation crops (serves evaluation only)


class PackedPaths:
    """File paths as one buffer of encoded bytes plus offsets (numpy), indexable like a list."""

    def __init__(self, paths: Sequence[str | os.PathLike]):
        encoded = [os.fsencode(p) for p in paths]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> Path:
        start, end = self.offsets[index], self.offsets[index + 1]
        return Path(os.fsdecode(self.blob[start:end].tobytes()))


class PixelCache:
    """uint8 images of various shapes packed in one flat tensor: item ``i`` is
    ``flat[offsets[i]:offsets[i] + h*w*3]`` viewed as (h, w, 3) with ``(h, w) = shapes[i]``.

    ``flat`` is a tensor so that spawn-started DataLoader workers receive it through shared memory
    (torch's pickling) rather than as a copy; fork-started ones share its pages anyway."""

    def __init__(self, kind: str, flat: torch.Tensor, offsets: np.ndarray, shapes: np.ndarray):
        self.kind = kind
        self.flat = flat
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.shapes = np.asarray(shapes, dtype=np.int64)

    @property
    def nbytes(self) -> int:
        return self.flat.numel()

    def pixels(self, index: int) -> np.ndarray:
        h, w = self.shapes[index].tolist()
        start = int(self.offsets[index])
        return self.flat.numpy()[start:start + h * w * 3].reshape(h, w, 3)


def cache_bytes(kind: str, sizes: np.ndarray, image_size: int) -> int:
    """Bytes a :class:`PixelCache` of ``kind`` needs for images of (width, height) ``sizes``."""
    if kind == EVAL_CROPS:
        return len(sizes) * image_size * image_size * 3
    return int((sizes[:, 0] * sizes[:, 1]).sum()) * 3


class ImageFolderDataset(Dataset):
    """``(image, label)`` items from image files: ``image`` float32 (3, ``image_size``, ``image_size``)
    normalised with ``mean``/``std``, ``label`` an int.

    ``augment``: a preset name of :data:`zootune.data.transforms.AUGMENT_PRESETS` (``"paper"``,
    ``"light"``, ``"no-flip"``, ``"none"``), a :class:`~zootune.data.transforms.RandomResizedCropFlip`,
    or None for the evaluation transform (:class:`~zootune.data.transforms.ResizeCenterCrop` with
    ``crop_fraction``). ``mean``/``std`` default to the statistics every zootune dataset uses
    (ImageNet's); pass a pretrained model's own to match its preprocessing.
    """

    # The engine's batch sampler yields (index, sample_seed) keys to datasets that declare this.
    accepts_sample_seeds = True

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        labels: Sequence[int] | torch.Tensor,
        image_size: int,
        augment: str | RandomResizedCropFlip | None = None,
        *,
        crop_fraction: float = EVAL_CROP_FRACTION,
        mean: Sequence[float] = MEAN,
        std: Sequence[float] = STD,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        cache: PixelCache | None = None,
    ):
        self._paths = paths if isinstance(paths, PackedPaths) else PackedPaths(paths)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        if len(self._paths) != len(self.labels):
            raise ValueError(f"{len(self._paths)} paths but {len(self.labels)} labels")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.image_size = int(image_size)
        self.transform = folder_train_transform(augment, self.image_size)
        self.eval_transform = ResizeCenterCrop(self.image_size, crop_fraction)
        self.crop_fraction = crop_fraction
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._table = normalization_table(self.mean, self.std)
        self._label_array = self.labels.numpy()  # indexing numpy costs far less than indexing a tensor
        self.max_pixels = max_pixels
        self.cache = cache

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def paths(self) -> list[Path]:
        """The image files, in item order."""
        return [self._paths[i] for i in range(len(self._paths))]

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        if isinstance(key, (tuple, list)):
            index, seed = int(key[0]), key[1]
        else:
            index, seed = int(key), None
        label = int(self._label_array[index])
        if self.transform is None:
            return to_normalized_chw(self._eval_pixels(index), table=self._table), label
        if seed is None:  # not from the engine's sampler: a seed from torch's global RNG
            seed = int(torch.randint(0, 2**62, ()).item())
        return self.transform(self._original(index), random.Random(int(seed)), self._table), label

    def _original(self, index: int) -> np.ndarray:
        """The decoded image, uint8 (H, W, 3)."""
        if self.cache is not None and self.cache.kind == DECODED:
            return self.cache.pixels(index)
        return np.asarray(read_rgb(self._paths[index], self.max_pixels))

    def _eval_pixels(self, index: int) -> np.ndarray:
        if self.cache is not None and self.cache.kind == EVAL_CROPS:
            return self.cache.pixels(index)
        if self.cache is not None and self.cache.kind == DECODED:
            return self.eval_transform(Image.fromarray(self.cache.pixels(index), mode="RGB"))
        return self.eval_transform(read_rgb(self._paths[index], self.max_pixels))

    # ----------------------------------------------------------------------------- variants
    def with_transform(self, augment: str | RandomResizedCropFlip | None) -> "ImageFolderDataset":
        """The same files (and cache, where it still applies) with another augmentation; None gives
        the evaluation transform (e.g. to score un-augmented training images)."""
        other = ImageFolderDataset(
            self._paths, self.labels, self.image_size, augment, crop_fraction=self.crop_fraction,
            mean=self.mean, std=self.std, max_pixels=self.max_pixels,
        )
        if self.cache is not None and (self.cache.kind == DECODED or other.transform is None):
            other.cache = self.cache
        return other

    # ----------------------------------------------------------------------------- cache
    def fill_cache(
        self, kind: str | None = None, threads: int | None = None, sizes: np.ndarray | None = None
    ) -> "ImageFolderDataset":
        """Decode every image once into a :class:`PixelCache` (``kind`` defaults to :data:`DECODED` for
        an augmented dataset, :data:`EVAL_CROPS` otherwise), reading files in ``threads`` threads
        (Pillow releases the GIL while decoding). ``sizes``: the (width, height) of every file from
        :func:`zootune.data.decode.scan_images` (scanned here when not given). Returns ``self``."""
        kind = kind or (DECODED if self.transform is not None else EVAL_CROPS)
        if kind not in (DECODED, EVAL_CROPS):
            raise ValueError(f"cache kind must be {DECODED!r} or {EVAL_CROPS!r}, got {kind!r}")
        if kind == EVAL_CROPS and self.transform is not None:
            raise ValueError("an augmented dataset needs the decoded images, not evaluation crops")
        if sizes is None:
            sizes = scan_images(self.paths, self.max_pixels)
        # Each item's byte count is known from the header (an EXIF rotation swaps height and width,
        # not their product), so the buffer is allocated once and filled in place.
        sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        if kind == EVAL_CROPS:
            counts = np.full(len(self), self.image_size * self.image_size * 3, dtype=np.int64)
        else:
            counts = sizes[:, 0] * sizes[:, 1] * 3
        offsets = np.zeros(len(self), dtype=np.int64)
        np.cumsum(counts[:-1], out=offsets[1:])
        flat = torch.empty(int(counts.sum()), dtype=torch.uint8)
        flat_view = flat.numpy()
        shapes = np.zeros((len(self), 2), dtype=np.int64)

        def decode(index: int) -> None:
            image = read_rgb(self._paths[index], self.max_pixels, guard_warnings=False)
            pixels = self.eval_transform(image) if kind == EVAL_CROPS else np.asarray(image)
            if pixels.size != counts[index]:
                raise DataError(f"{self._paths[index]} changed while it was read (size differs from its header)")
            start = offsets[index]
            flat_view[start:start + pixels.size] = pixels.reshape(-1)
            shapes[index] = pixels.shape[:2]

        threads = threads or default_scan_threads()
        with size_warnings_ignored():
            if threads > 1 and len(self) > 16:
                with ThreadPoolExecutor(threads) as pool:
                    for _ in pool.map(decode, range(len(self)), chunksize=16):
                        pass
            else:
                for index in range(len(self)):
                    decode(index)
        self.cache = PixelCache(kind, flat, offsets, shapes)
        return self

    def __repr__(self) -> str:
        cache = f", cache={self.cache.kind} {self.cache.nbytes / 2**20:.1f} MiB" if self.cache is not None else ""
        return (f"ImageFolderDataset({len(self)} images, image_size={self.image_size}, "
                f"transform={self.transform or self.eval_transform!r}{cache})")
