"""Data: the user's pipeline -- image folders, decoding, transforms, datasets and shared caching.

- :func:`load_image_folder` -- ``root/<class>/<image>`` folders (:mod:`zootune.data.image_folder`),
  streamed from disk by :class:`ImageFolderDataset` (:mod:`zootune.data.folder_dataset`), files read
  by :func:`zootune.data.decode.read_rgb`; :func:`find_images` / :func:`load_image_files` -- unlabelled
  image files and folders, read like an evaluation split; :mod:`zootune.data.auto` -- the input size
  and augmentation chosen from a folder;
- :func:`load_landmark_folder` -- images with 300W-style point files (:mod:`zootune.data.landmarks`);
- :mod:`zootune.data.transforms` -- RandomResizedCrop, RandomHorizontalFlip, Normalize, Compose on
  tensors, drawing only from torch's global RNG.

The generated target suite (the ``zootune run`` targets, the MiniZoo's pretext images) is
:mod:`zootune.suite`. The old paths of its modules (``zootune.data.targets``, ``.letters``,
``.scenes``, ``.sources``, ``.render``) still import: each is the suite's module itself, under a
second name, so that scripts written against them keep working.

Every dataset yields ``(image, label)`` with ``image`` a float32 (3, H, W) tensor normalised with
:data:`zootune.data.transforms.MEAN` / ``STD`` (``image_size`` for folders) and ``label`` an int.
"""

from zootune.data.cache import user_cache_dir
from zootune.data.datasets import DatasetSplits, ImageDataset, stratified_split
from zootune.data.folder_dataset import ImageFolderDataset
from zootune.data.image_folder import find_images, load_evaluation_folder, load_image_files, load_image_folder, load_unsplit_image_folder
from zootune.data.landmarks import load_landmark_folder
from zootune.data.transforms import (
    AUGMENT_PRESETS, MEAN, STD, Compose, Normalize, RandomHorizontalFlip, RandomResizedCrop, RandomResizedCropFlip,
    ResizeCenterCrop, default_train_transform,
)

__all__ = [
    "load_landmark_folder", "AUGMENT_PRESETS", "ImageFolderDataset", "RandomResizedCropFlip", "ResizeCenterCrop",
    "DatasetSplits", "ImageDataset", "MEAN", "STD", "Compose", "Normalize",
    "RandomHorizontalFlip", "RandomResizedCrop", "default_train_transform",
    "find_images", "load_evaluation_folder", "load_image_files", "load_image_folder", "load_unsplit_image_folder", "stratified_split", "user_cache_dir",
]
