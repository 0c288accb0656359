"""Users' own images: ``root/<class>/<image>`` folders, read with Pillow, streamed from disk.

Two layouts are accepted:

- one folder of class folders, ``root/<class>/<image>``, split into train/val(/test) by a seeded
  stratified split (:func:`zootune.data.datasets.stratified_split`);
- separate splits, ``root/train/<class>/...`` and ``root/val/<class>/...`` (and optionally
  ``root/test/<class>/...``), whose class sets must be equal.

Only the files directly in a class folder are read; images in its sub-folders are not (a warning
counts them and names one).

Each split is an :class:`~zootune.data.folder_dataset.ImageFolderDataset`: files are decoded when an
item is asked for (:func:`zootune.data.decode.read_rgb`: EXIF orientation, 16-bit, palette/CMYK/alpha),
so memory does not grow with the number of images. Training items are random-resized crops of the
original image plus a flip (preset ``augment``, default ``"paper"``); validation and test items are
the central crop after resizing the shorter side to ``round(image_size / 0.875)``. Before anything is
decoded every file's header is opened once (:func:`zootune.data.decode.scan_images`) and every bad
file is reported in one :class:`zootune.errors.DataError`. Splits whose pixels fit ``cache_budget``
are decoded once into RAM (exactly the same pixels, faster for small folders). Every problem with the
folder is a ``DataError`` saying what to fix.

Unlabelled images (to apply a trained model to): :func:`find_images` lists the image files among
files and folders (searched recursively), :func:`load_image_files` reads them with the evaluation
transform, exactly as an evaluation split is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from zootune.data.datasets import DatasetSplits, stratified_split
from zootune.data.decode import DEFAULT_MAX_PIXELS, scan_images
from zootune.data.folder_dataset import DECODED, EVAL_CROPS, ImageFolderDataset, cache_bytes
from zootune.data.auto import AUTO, auto_augment, auto_image_size
from zootune.data.transforms import AUGMENT_PRESETS, EVAL_CROP_FRACTION, MEAN, STD, RandomResizedCropFlip
from zootune.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Below this side length an image keeps too little to learn from: allowed, but warned about.
SMALL_IMAGE_SIZE = 8
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
    nested: list[Path] = []  # images in sub-folders of class folders: not read
    for d in class_dirs:
        entries = _visible_entries(d)
        images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        below = [image for sub in entries if sub.is_dir() for image in _images_below(sub)]
        if not images:
            unread = f"; the {len(below)} in its sub-folders are not read (only its own files are)" if below else ""
            raise DataError(
                f"class folder {d} contains no images (extensions {', '.join(IMAGE_EXTENSIONS)}){unread}; "
                "add images or remove the folder"
            )
        classes[d.name] = images
        nested += below
    if nested:
        # Only a class folder's own files are read: a sub-folder may be another class's data, a
        # copy or an excluded part, and a guess would mislabel images. Silently dropping them would
        # leave a user training on less data than they think, so they are counted.
        warnings.warn(f"{len(nested)} image(s) in sub-folders of class folders of {root} are not read "
                      f"(e.g. {nested[0]}): only the files directly in a class folder are", stacklevel=3)
    return classes


def _images_below(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder`` (itself included, hidden entries skipped), sorted."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        found += [Path(parent) / name for name in sorted(files)
                  if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    return found


def _flatten(classes: dict[str, list[Path]], class_names: list[str]) -> tuple[list[Path], np.ndarray]:
    index = {c: i for i, c in enumerate(class_names)}
    paths = [p for c in class_names if c in classes for p in classes[c]]
    labels = np.array([index[c] for c in class_names if c in classes for _ in classes[c]], dtype=np.int64)
    return paths, labels


# Decoded pixels kept in RAM per load_image_folder call unless told otherwise (see _plan_cache).
DEFAULT_CACHE_BUDGET = 512 * 2**20


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is a file, not a folder; {LAYOUT_HINT}")


def _check_options(image_size: int | str, augment, crop_fraction: float, cache_budget: int | None,
                   max_pixels: int) -> None:
    if image_size == AUTO:
        pass
    elif not (isinstance(image_size, int) and not isinstance(image_size, bool) and image_size >= 1):
        raise DataError(f"image_size must be a positive integer or 'auto', got {image_size!r}")
    elif image_size < SMALL_IMAGE_SIZE:
        warnings.warn(f"image size {image_size}: every image will be reduced to {image_size}x{image_size} pixels, "
                      "too few to tell most classes apart (zootune's default is 32)", stacklevel=3)
    if not (augment is None or augment == AUTO or isinstance(augment, RandomResizedCropFlip)
            or augment in AUGMENT_PRESETS):
        raise DataError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENT_PRESETS)} or auto")
    if not 0 < crop_fraction <= 1:
        raise DataError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    if cache_budget is not None and cache_budget < 0:
        raise DataError(f"cache_budget must be >= 0 bytes, got {cache_budget}")
    if max_pixels < 1:
        raise DataError(f"max_pixels must be >= 1, got {max_pixels}")


def split_folders(root: Path) -> dict[str, Path] | None:
    """``{"train": .., "val": .., ["test": ..]}`` for the separate-splits layout, None for a folder of
    class folders. A ``train`` folder without ``val`` is an error (not a class named "train")."""
    has = {name: (root / name).is_dir() for name in ("train", "val", "test")}
    if not has["train"]:
        if has["val"]:
            raise DataError(f"{root} has val/ but no train/; add {root / 'train'} (same class folders as val/)")
        return None
    if not has["val"]:
        raise DataError(
            f"{root} has train/ but no val/: add {root / 'val'} with the same class folders as train/ "
            f"(test/ is optional), or put the class folders directly in {root} to have them split"
        )
    return {name: root / name for name, present in has.items() if present}


def _plan_cache(datasets: dict[str, ImageFolderDataset], sizes: dict[str, np.ndarray], budget: int) -> None:
    """Fill the caches of the splits that fit ``budget`` bytes together: evaluation splits first
    (their final crops are small), then the training split (decoded originals)."""
    left = budget
    for split in sorted(datasets, key=lambda name: name == "train"):
        dataset = datasets[split]
        kind = DECODED if dataset.transform is not None else EVAL_CROPS
        need = cache_bytes(kind, sizes[split], dataset.image_size)
        if need <= left:
            dataset.fill_cache(kind, sizes=sizes[split])
            left -= need


def folder_fingerprint(root: Path, paths: Sequence[Path], class_names: Sequence[str]) -> str:
    """sha256 of what a training reads from an image folder: the class names and, sorted, every
    file's path relative to ``root`` with its size in bytes. Cheap (a stat per file, nothing decoded),
    and the same wherever the folder is moved; a resumed training compares it with its checkpoint's."""
    files = sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in paths)
    return hashlib.sha256(json.dumps([sorted(class_names), files]).encode()).hexdigest()


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) "
            "with val_fraction > 0 and a positive remainder for training"
        )


class _FoundSplits(NamedTuple):
    """A folder's images assigned to splits, before anything is decoded."""

    class_names: list[str]  # sorted; a label is an index into them
    files: dict[str, tuple[list[Path], np.ndarray]]  # split -> (image paths, labels)
    sizes: dict[str, np.ndarray]  # split -> (width, height) of each of its images
    all_sizes: np.ndarray  # (width, height) of every image of every split


def _given_splits(split_classes: dict[str, dict[str, list[Path]]], max_pixels: int) -> _FoundSplits:
    """The ``train/ val/ [test/]`` layout, from each split's class folders: they must name the same classes."""
    class_names = sorted(split_classes["train"])
    for split, classes in split_classes.items():
        if split != "train" and set(classes) != set(class_names):
            only_train = sorted(set(class_names) - set(classes))
            only_other = sorted(set(classes) - set(class_names))
            raise DataError(
                f"train and {split} class folders differ: only in train {only_train}, "
                f"only in {split} {only_other}; give both splits the same class folders"
            )
    files = {split: _flatten(classes, class_names) for split, classes in split_classes.items()}
    # one scan of all files, so every bad file of every split is reported at once
    all_sizes = scan_images([p for paths, _ in files.values() for p in paths], max_pixels)
    sizes, start = {}, 0
    for split, (paths, _) in files.items():
        sizes[split] = all_sizes[start:start + len(paths)]
        start += len(paths)
    return _FoundSplits(class_names, files, sizes, all_sizes)


def _seeded_splits(root: Path, classes: dict[str, list[Path]], val_fraction: float, test_fraction: float,
                   seed: int, max_pixels: int) -> _FoundSplits:
    """One folder of class folders, split into train/val[/test] by a seeded stratified split."""
    class_names = sorted(classes)
    paths, labels = _flatten(classes, class_names)
    all_sizes = scan_images(paths, max_pixels)
    fractions = [1.0 - val_fraction - test_fraction, val_fraction] + ([test_fraction] if test_fraction else [])
    indices = stratified_split(labels, fractions, seed=seed)
    for name, part in zip(("train", "val", "test"), indices):
        if len(part) == 0:
            raise DataError(
                f"empty dataset: the {name} split of {root} got no images ({len(labels)} images in all); "
                "add images or change val_fraction/test_fraction"
            )
    files, sizes = {}, {}
    for name, part in zip(("train", "val", "test"), indices):
        files[name] = ([paths[i] for i in part], labels[part])
        sizes[name] = all_sizes[part]
    return _FoundSplits(class_names, files, sizes, all_sizes)


def _dataset_splits(root: Path, found: _FoundSplits, image_size: int, augment, chosen: dict,
                    cache_budget: int | None, **options) -> DatasetSplits:
    """``found`` as datasets (``augment`` for the training split only), cached where they fit the budget;
    ``options``: :class:`ImageFolderDataset`'s keyword arguments."""
    fingerprint = folder_fingerprint(root, [p for paths, _ in found.files.values() for p in paths], found.class_names)
    datasets = {
        split: ImageFolderDataset(paths, labels, image_size, augment if split == "train" else None, **options)
        for split, (paths, labels) in found.files.items()
    }
    _plan_cache(datasets, found.sizes, DEFAULT_CACHE_BUDGET if cache_budget is None else cache_budget)
    return DatasetSplits(
        train=datasets["train"],
        val=datasets["val"],
        test=datasets.get("test"),
        num_classes=len(found.class_names),
        name=root.name,
        description=f"image folder {root}",
        class_names=found.class_names,
        fingerprint=fingerprint,
        image_size=image_size,
        chosen=chosen,
    )


def load_image_folder(
    root: str | os.PathLike,
    image_size: int | str = 32,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    *,
    augment: str | RandomResizedCropFlip | None = "paper",
    crop_fraction: float = EVAL_CROP_FRACTION,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
    cache_budget: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    zoo_input_size: int | None = None,
) -> DatasetSplits:
    """Load ``root`` (either layout, see the module docstring) as :class:`DatasetSplits` of
    :class:`~zootune.data.folder_dataset.ImageFolderDataset`.

    ``val_fraction`` / ``test_fraction`` apply to the single-folder layout only. ``augment``: the
    training split's augmentation, a name of :data:`zootune.data.transforms.AUGMENT_PRESETS`
    (``"paper"``: crop scale (0.08, 1) + flip; ``"light"``: scale (0.35, 1) + flip; ``"no-flip"``;
    ``"none"``) or a :class:`~zootune.data.transforms.RandomResizedCropFlip`. ``crop_fraction``: the
    evaluation crop's share of the resized shorter side. ``mean`` / ``std``: normalisation.
    ``cache_budget``: bytes of decoded pixels that may be kept in RAM (default
    :data:`DEFAULT_CACHE_BUDGET`; 0 streams every split). ``max_pixels``: larger images are refused.
    ``image_size="auto"`` / ``augment="auto"``: chosen from the images (and ``zoo_input_size``) by
    :mod:`zootune.data.auto`; what was chosen and why is in the result's ``chosen``.
    """
    root = Path(root).expanduser()
    _check_root(root)
    _check_fractions(val_fraction, test_fraction)
    _check_options(image_size, augment, crop_fraction, cache_budget, max_pixels)
    # Class folders are listed here, not in the layout helpers: _class_folders warns with a stacklevel
    # counted from this function.
    folders = split_folders(root)
    if folders is not None:
        split_classes = {split: _class_folders(folder) for split, folder in folders.items()}
        found = _given_splits(split_classes, max_pixels)
    else:
        classes = _class_folders(root)
        found = _seeded_splits(root, classes, val_fraction, test_fraction, seed, max_pixels)
    if len(found.class_names) < 2:
        raise DataError(f"{root} has {len(found.class_names)} class folder(s); classification needs at least 2")
    chosen = {}
    if image_size == AUTO:
        image_size, why = auto_image_size(found.all_sizes, zoo_input_size)
        chosen["image_size"] = {"value": image_size, "why": why}
        _check_options(image_size, None, crop_fraction, cache_budget, max_pixels)
    if augment == AUTO:
        augment, why = auto_augment(image_size)
        chosen["augment"] = {"value": augment, "why": why}
    return _dataset_splits(root, found, image_size, augment, chosen, cache_budget,
                           crop_fraction=crop_fraction, mean=mean, std=std, max_pixels=max_pixels)


def load_unsplit_image_folder(
    root: str | os.PathLike,
    image_size: int = 32,
    *,
    class_names: Sequence[str] | None = None,
    crop_fraction: float = EVAL_CROP_FRACTION,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
    cache_budget: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[list[str], ImageFolderDataset]:
    """A whole ``root/<class>/<image>`` folder as one un-augmented dataset: (the folder's class
    names, sorted; dataset).

    For evaluating a trained model on a folder; the same reading, checks and evaluation transform as
    the validation split of :func:`load_image_folder`. ``class_names``: the trained model's classes,
    in the order of its outputs: each class folder is labelled with its name's index in that list
    (matched by name, so the folder may hold any subset of the classes, in any order); a class folder
    that is not among them is refused, naming it. Default: the folder's own classes, sorted.
    """
    root = Path(root).expanduser()
    _check_root(root)
    classes = _class_folders(root)
    if class_names is not None:
        unknown = sorted(set(classes) - set(class_names))
        if unknown:
            raise DataError(
                f"class folder(s) {', '.join(unknown)} of {root} are not among the model's classes "
                f"({', '.join(class_names)}): it cannot predict them; evaluate on folders of its classes")
    paths, labels = _flatten(classes, list(class_names) if class_names is not None else sorted(classes))
    dataset = load_image_files(paths, image_size, labels=labels, crop_fraction=crop_fraction, mean=mean, std=std,
                               cache_budget=cache_budget, max_pixels=max_pixels)
    return sorted(classes), dataset


def load_image_files(
    paths: Sequence[str | os.PathLike],
    image_size: int = 32,
    *,
    labels: Sequence[int] | np.ndarray | None = None,
    crop_fraction: float = EVAL_CROP_FRACTION,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
    cache_budget: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageFolderDataset:
    """Image files (e.g. from :func:`find_images`) as one un-augmented dataset, in the order given:
    every file's header checked first (every bad one named at once), then the evaluation transform;
    cached in RAM when the crops fit ``cache_budget``. ``labels``: one per file (None: all 0)."""
    if len(paths) == 0:
        raise DataError("no image files given")
    _check_options(image_size, None, crop_fraction, cache_budget, max_pixels)
    sizes = scan_images(paths, max_pixels)
    labels = np.zeros(len(paths), dtype=np.int64) if labels is None else labels
    dataset = ImageFolderDataset(
        paths, labels, image_size, None, crop_fraction=crop_fraction, mean=mean, std=std, max_pixels=max_pixels
    )
    _plan_cache({"all": dataset}, {"all": sizes}, DEFAULT_CACHE_BUDGET if cache_budget is None else cache_budget)
    return dataset


def find_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files among ``inputs``: files as given, folders searched recursively (hidden files
    and folders skipped, symlinked folders not followed) for :data:`IMAGE_EXTENSIONS`; sorted, each
    file once. A missing input, a given file that is not an image, or no image at all is a
    :class:`DataError` (naming where it looked)."""
    if not inputs:
        raise DataError("no image files or folders given")
    found: dict[str, Path] = {}  # real path -> the path as found (a file reached twice is listed once)
    for given in inputs:
        path = Path(given).expanduser()
        if not path.exists():
            raise DataError(f"{path} does not exist (give image files or folders of images)")
        if path.is_dir():
            images = _images_under(path)
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            images = [path]
        else:
            raise DataError(f"{path} is not an image file (extensions {', '.join(IMAGE_EXTENSIONS)})")
        for image in images:
            found.setdefault(os.path.realpath(image), image)
    if not found:
        where = ", ".join(str(Path(p).expanduser()) for p in inputs)
        raise DataError(f"no images found in {where} (searched recursively for {', '.join(IMAGE_EXTENSIONS)})")
    return sorted(found.values())


def _images_under(folder: Path) -> list[Path]:
    images = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        images += [Path(parent, f) for f in files
                   if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return images


def load_evaluation_folder(
    root: str | os.PathLike,
    image_size: int = 32,
    *,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    **options,
) -> tuple[list[str], ImageFolderDataset, str]:
    """What a trained model is evaluated on in ``root``: (the folder's class names, dataset, which
    images), the test split of a train/val[/test] folder (else its val split), or every image of a
    single folder of class folders; only that part is read. ``class_names``: the model's classes
    (:func:`load_unsplit_image_folder`). Without them, ``num_classes``: the model's output count; the
    sorted class folders then stand for its outputs by position, so their number must be equal.
    ``options``: as for :func:`load_unsplit_image_folder`.
    """
    root = Path(root).expanduser()
    folders = split_folders(root) if root.is_dir() else None
    folder, what = root, "all images"
    if folders is not None:
        split = "test" if "test" in folders else "val"
        folder, what = folders[split], f"{split} split"
    folder_classes, dataset = load_unsplit_image_folder(folder, image_size, class_names=class_names, **options)
    if class_names is None and num_classes is not None and len(folder_classes) != num_classes:
        raise DataError(
            f"the model predicts {num_classes} classes but {folder} has {len(folder_classes)} class folders "
            f"({', '.join(folder_classes)}); it records no class names, so its outputs can only be matched to "
            "the class folders by position, which needs as many folders as classes")
    return folder_classes, dataset, what
