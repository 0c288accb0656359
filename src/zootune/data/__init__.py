"""Data: the offline target suite, users' image folders, tensor transforms and shared caching.

- :func:`get_target` / :data:`TARGETS` -- the built-in target tasks (:mod:`zootune.data.targets`);
- :func:`load_image_folder` -- ``root/<class>/<image>`` folders (:mod:`zootune.data.image_folder`),
  streamed from disk by :class:`ImageFolderDataset` (:mod:`zootune.data.folder_dataset`), files read
  by :func:`zootune.data.decode.read_rgb`; :func:`find_images` / :func:`load_image_files` -- unlabelled
  image files and folders, read like an evaluation split;
- :mod:`zootune.data.transforms` -- RandomResizedCrop, RandomHorizontalFlip, Normalize, Compose on
  tensors, drawing only from torch's global RNG;
- :mod:`zootune.data.scenes` / :mod:`zootune.data.sources` -- generated and bundled images, also used
  by the MiniZoo's pretraining.

Every dataset yields ``(image, label)`` with ``image`` a float32 (3, H, W) tensor normalised with
:data:`zootune.data.transforms.MEAN` / ``STD`` (32 x 32 for the built-in targets, ``image_size`` for
folders) and ``label`` an int.
"""

from zootune.data.cache import user_cache_dir
from zootune.data.datasets import DatasetSplits, ImageDataset, stratified_split
from zootune.data.folder_dataset import ImageFolderDataset
from zootune.data.image_folder import find_images, load_evaluation_folder, load_image_files, load_image_folder, load_unsplit_image_folder
from zootune.data.landmarks import load_landmark_folder
from zootune.data.targets import DEFAULT_TARGET, TARGETS, get_target
from zootune.data.transforms import (
    AUGMENT_PRESETS, MEAN, STD, Compose, Normalize, RandomHorizontalFlip, RandomResizedCrop, RandomResizedCropFlip,
    ResizeCenterCrop, default_train_transform,
)

__all__ = [
    "load_landmark_folder", "AUGMENT_PRESETS", "ImageFolderDataset", "RandomResizedCropFlip", "ResizeCenterCrop",
    "DEFAULT_TARGET", "DatasetSplits", "ImageDataset", "MEAN", "STD", "TARGETS", "Compose", "Normalize",
    "RandomHorizontalFlip", "RandomResizedCrop", "default_train_transform", "get_target",
    "find_images", "load_evaluation_folder", "load_image_files", "load_image_folder", "load_unsplit_image_folder", "stratified_split", "user_cache_dir",
]
