"""In-memory image datasets, the train/val/test bundle and seeded stratified splitting."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from zootune.errors import DataError


class ImageDataset(Dataset):
    """Images held in memory as one float tensor (N, 3, H, W) (already normalised) + int64 labels.

    ``transform`` (e.g. a random crop and flip) is applied per item in ``__getitem__``, drawing from
    torch's global RNG, so augmentation is reproducible under ``torch.manual_seed`` and across resumes.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | Sequence[int],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if images.dim() != 4:
            raise DataError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images = images.float()
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def with_transform(self, transform: Callable[[torch.Tensor], torch.Tensor] | None) -> "ImageDataset":
        """The same images (shared, not copied) with another per-item transform."""
        return ImageDataset(self.images, self.labels, transform)


@dataclass
class DatasetSplits:
    """A target task's data: ``train`` (augmented), ``val`` (model selection), ``test`` (reported).

    ``test`` may be ``None`` for a user's folder without a test part.
    """

    train: Dataset
    val: Dataset
    test: Dataset | None
    num_classes: int
    name: str
    description: str = ""
    class_names: list[str] = field(default_factory=list)
    # the task (head, loss, metric) when it is not classification with ``num_classes`` classes,
    # e.g. a zootune.tasks.LandmarkTask; None means ClassificationTask(num_classes)
    task: Any = None
    # what the data was read from, for a resumed training to check that it continues on the same
    # data (zootune.data.image_folder.folder_fingerprint); None where there is no folder to read
    fingerprint: str | None = None
    # an image folder's input size, and what "auto" options resolved to: {option: {"value", "why"}}
    image_size: int | None = None
    chosen: dict = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test) if self.test is not None else 0,
        }


def stratified_split(
    labels: Sequence[int] | np.ndarray, fractions: Sequence[float], seed: int = 0
) -> list[np.ndarray]:
    """Split indices into ``len(fractions)`` disjoint parts, class by class, from a seeded permutation.

    Each class's indices are shuffled with ``numpy.random.default_rng(seed)`` and cut at the
    cumulative fractions (rounded), so every part gets each class in about the same proportion and a
    given seed always gives the same split. The last part takes whatever rounding leaves.
    """
    labels = np.asarray(labels)
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    bounds = np.cumsum(fractions)[:-1]
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        cuts = np.round(bounds * len(idx)).astype(int)
        for part, chunk in zip(parts, np.split(idx, cuts)):
            part.append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]
