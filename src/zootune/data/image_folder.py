"""Users' own images: ``root/<class>/<image>`` folders, read with Pillow.

Two layouts are accepted:

- one folder of class folders, ``root/<class>/<image>``, split into train/val(/test) by a seeded
  stratified split (:func:`zootune.data.datasets.stratified_split`);
- separate splits, ``root/train/<class>/...`` and ``root/val/<class>/...`` (and optionally
  ``root/test/<class>/...``), whose class sets must be equal.

Images are converted to RGB, resized to ``image_size`` x ``image_size`` (bilinear) and normalised with
the fixed statistics of :mod:`zootune.data.transforms`. Every problem with the folder is a
:class:`zootune.errors.DataError` saying what to fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from zootune.data.datasets import DatasetSplits, ImageDataset, stratified_split
from zootune.data.transforms import default_train_transform, normalize_batch, to_float_chw
from zootune.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
LAYOUT_HINT = "expected <root>/<class>/<image> or <root>/train/<class>/<image> + <root>/val/<class>/<image>"


def _visible_entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _class_folders(root: Path) -> dict[str, list[Path]]:
    """class name -> sorted image paths, for a folder of class folders."""
    entries = _visible_entries(root)
    if not entries:
        raise DataError(f"empty dataset: {root} contains nothing; {LAYOUT_HINT}")
    class_dirs = [p for p in entries if p.is_dir()]
    if not class_dirs:
        raise DataError(f"{root} is not a folder of class folders (found only files); {LAYOUT_HINT}")
    classes: dict[str, list[Path]] = {}
    for d in class_dirs:
        images = [p for p in _visible_entries(d) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if not images:
            raise DataError(
                f"class folder {d} contains no images (extensions {', '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        classes[d.name] = images
    return classes


def _read_image(path: Path, image_size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path} ({err}); remove or replace the file") from None


def _load(paths: list[Path], image_size: int) -> torch.Tensor:
    arrays = np.stack([_read_image(p, image_size) for p in paths])
    return normalize_batch(to_float_chw(arrays))


def _flatten(classes: dict[str, list[Path]], class_names: list[str]) -> tuple[list[Path], np.ndarray]:
    index = {c: i for i, c in enumerate(class_names)}
    paths = [p for c in class_names if c in classes for p in classes[c]]
    labels = np.array([index[c] for c in class_names if c in classes for _ in classes[c]], dtype=np.int64)
    return paths, labels


def load_image_folder(
    root: str | os.PathLike,
    image_size: int = 32,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    train_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> DatasetSplits:
    """Load ``root`` (either layout, see the module docstring) as :class:`DatasetSplits`.

    ``val_fraction`` / ``test_fraction`` apply to the single-folder layout only. ``train_transform``
    defaults to :func:`zootune.data.transforms.default_train_transform`.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is a file, not a folder; {LAYOUT_HINT}")
    if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) "
            "with val_fraction > 0 and a positive remainder for training"
        )
    if train_transform is None:
        train_transform = default_train_transform(image_size)

    if (root / "train").is_dir() and (root / "val").is_dir():
        split_classes = {"train": _class_folders(root / "train"), "val": _class_folders(root / "val")}
        if (root / "test").is_dir():
            split_classes["test"] = _class_folders(root / "test")
        class_names = sorted(split_classes["train"])
        for split, classes in split_classes.items():
            if split != "train" and set(classes) != set(class_names):
                only_train = sorted(set(class_names) - set(classes))
                only_other = sorted(set(classes) - set(class_names))
                raise DataError(
                    f"train and {split} class folders differ: only in train {only_train}, "
                    f"only in {split} {only_other}; give both splits the same class folders"
                )
        data = {}
        for split, classes in split_classes.items():
            paths, labels = _flatten(classes, class_names)
            data[split] = (_load(paths, image_size), labels)
        train_images, train_labels = data["train"]
        val_images, val_labels = data["val"]
        test = ImageDataset(*data["test"]) if "test" in data else None
    else:
        classes = _class_folders(root)
        class_names = sorted(classes)
        paths, labels = _flatten(classes, class_names)
        images = _load(paths, image_size)
        fractions = [1.0 - val_fraction - test_fraction, val_fraction] + ([test_fraction] if test_fraction else [])
        parts = stratified_split(labels, fractions, seed=seed)
        for name, part in zip(("train", "val", "test"), parts):
            if len(part) == 0:
                raise DataError(
                    f"empty dataset: the {name} split of {root} got no images ({len(labels)} images in all); "
                    "add images or change val_fraction/test_fraction"
                )
        train_images, train_labels = images[parts[0]], labels[parts[0]]
        val_images, val_labels = images[parts[1]], labels[parts[1]]
        test = ImageDataset(images[parts[2]], labels[parts[2]]) if len(parts) > 2 else None

    if len(class_names) < 2:
        raise DataError(f"{root} has {len(class_names)} class folder(s); classification needs at least 2")
    return DatasetSplits(
        train=ImageDataset(train_images, train_labels, train_transform),
        val=ImageDataset(val_images, val_labels),
        test=test,
        num_classes=len(class_names),
        name=root.name,
        description=f"image folder {root}",
        class_names=class_names,
    )


def load_unsplit_image_folder(root: str | os.PathLike, image_size: int = 32) -> tuple[list[str], ImageDataset]:
    """A whole ``root/<class>/<image>`` folder as one un-augmented dataset: (class names, dataset).

    For evaluating a trained model on a folder; the same reading and checks as :func:`load_image_folder`.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist" if not root.exists()
                        else f"dataset path {root} is a file, not a folder; {LAYOUT_HINT}")
    classes = _class_folders(root)
    class_names = sorted(classes)
    paths, labels = _flatten(classes, class_names)
    return class_names, ImageDataset(_load(paths, image_size), labels)
