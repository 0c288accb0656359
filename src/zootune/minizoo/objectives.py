"""Pretext objectives: a head on the backbone's features, a loss and a held-out metric.

Each objective is built for one backbone (``build_head`` looks at the feature sizes it produces),
trains the backbone + head on (x, y) batches, and reports one held-out metric in the manifest.
Formulas:

- classification: cross-entropy on pooled features, metric top-1 accuracy (%).
- contrastive (SimCLR, Chen et al., ICML 2020): two augmented views per image, z = g(f(x)) / |g(f(x))|,
  NT-Xent  l(i, j) = -log( exp(z_i.z_j / t) / sum_{k != i} exp(z_i.z_k / t) ),  averaged over the 2B
  anchors; metric: % of anchors whose most similar other view is their positive.
- segmentation: per-pixel cross-entropy of a dense head on the feature map, upsampled bilinearly to
  the label resolution (the "decoder" of DeepLab-style heads); metric: mean IoU over classes (%).
- counting: mean squared error of per-kind counts regressed from pooled features; metric: % of
  (image, kind) counts predicted exactly after rounding.
- keypoint heatmaps: mean squared error of a dense head's heatmap (upsampled to the target size),
  metric: R^2 = 1 - MSE / Var(target) (%).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zootune.data.transforms import RandomHorizontalFlip, RandomResizedCrop
from zootune.minizoo.features import feature_map, pooled_features


def _probe(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(pooled feature size, feature-map channels) of ``model`` for inputs like ``example``."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        d = pooled_features(model, example[:2]).shape[1]
        c = feature_map(model, example[:2]).shape[1]
    model.train(was_training)
    return d, c


def dense_head(in_channels: int, out_channels: int, hidden: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(hidden, out_channels, 1)
    )


class Objective:
    metric_name = "metric"

    def build_head(self, model: nn.Module, example: torch.Tensor) -> nn.Module:
        raise NotImplementedError

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def loss(self, model: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def metric(self, model: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        raise NotImplementedError


def random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` px (zero fill), offsets from torch's global RNG."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (b,))
    dx = torch.randint(0, 2 * max_shift + 1, (b,))
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


class Classification(Objective):
    metric_name = "top1_acc"

    def __init__(self, num_classes: int, max_shift: int = 2):
        self.num_classes = num_classes
        self.max_shift = max_shift

    def build_head(self, model, example):
        d, _ = _probe(model, example)
        return nn.Linear(d, self.num_classes)

    def augment(self, x):
        return random_shift(x, self.max_shift) if self.max_shift else x

    def loss(self, model, head, x, y):
        return F.cross_entropy(head(pooled_features(model, x)), y)

    @torch.no_grad()
    def metric(self, model, head, x, y):
        return 100.0 * (head(pooled_features(model, x)).argmax(1) == y).float().mean().item()


class Contrastive(Objective):
    """SimCLR with a 2-layer projection head; views = random resized crop, flip, colour jitter."""

    metric_name = "positive_retrieval_acc"

    def __init__(self, temperature: float = 0.2, projection_dim: int = 32, size: int = 32):
        self.temperature = temperature
        self.projection_dim = projection_dim
        self.crop = RandomResizedCrop(size, scale=(0.2, 1.0))
        self.flip = RandomHorizontalFlip(0.5)

    def build_head(self, model, example):
        d, _ = _probe(model, example)
        return nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, self.projection_dim))

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """One random view per image: crop + flip, then per-image brightness/contrast and per-channel
        gain (a colour jitter; the inputs are normalised, so it acts around the dataset mean)."""
        v = torch.stack([self.flip(self.crop(img)) for img in x])
        b = v.shape[0]
        contrast = 0.6 + 0.8 * torch.rand(b, 1, 1, 1)
        brightness = 0.8 * (torch.rand(b, 1, 1, 1) - 0.5)
        gain = 0.8 + 0.4 * torch.rand(b, 3, 1, 1)
        gray = (torch.rand(b, 1, 1, 1) < 0.2).float()  # random greyscale, as in SimCLR
        v = v * contrast * gain + brightness
        return gray * v.mean(dim=1, keepdim=True).expand_as(v) + (1 - gray) * v

    def _similarities(self, model, head, x):
        views = torch.cat([self.view(x), self.view(x)])
        return contrastive_logits(head(pooled_features(model, views)), self.temperature)

    def loss(self, model, head, x, y):
        logits, positives = self._similarities(model, head, x)
        return F.cross_entropy(logits, positives)

    @torch.no_grad()
    def metric(self, model, head, x, y):
        logits, positives = self._similarities(model, head, x)
        return 100.0 * (logits.argmax(1) == positives).float().mean().item()


def contrastive_logits(projections: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent as a classification: for 2B projections (views 1 of B images, then views 2), the
    logits z_i.z_k / t over candidates k != i and the index of each anchor's positive (i +- B).
    ``cross_entropy(logits, positives)`` is the SimCLR loss of the module docstring."""
    z = F.normalize(projections, dim=1)
    logits = z @ z.t() / temperature
    logits = logits.masked_fill(torch.eye(len(z), dtype=torch.bool), float("-inf"))  # never itself
    n = len(z) // 2
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return logits, positives


class DenseObjective(Objective):
    """A dense head on the feature map whose output is upsampled bilinearly to the target's size."""

    out_channels = 1

    def build_head(self, model, example):
        _, c = _probe(model, example)
        return dense_head(c, self.out_channels)

    def dense_output(self, model, head, x, size):
        return F.interpolate(head(feature_map(model, x)), size=size, mode="bilinear", align_corners=False)


class Segmentation(DenseObjective):
    metric_name = "mean_iou"

    def __init__(self, num_labels: int):
        self.num_labels = self.out_channels = num_labels

    def loss(self, model, head, x, y):
        # no geometric augmentation: the per-pixel labels would have to move with the image
        return F.cross_entropy(self.dense_output(model, head, x, y.shape[-2:]), y)

    @torch.no_grad()
    def metric(self, model, head, x, y):
        pred = self.dense_output(model, head, x, y.shape[-2:]).argmax(1)
        ious = []
        for c in range(self.num_labels):
            union = ((pred == c) | (y == c)).sum().item()
            if union:
                ious.append(((pred == c) & (y == c)).sum().item() / union)
        return 100.0 * sum(ious) / len(ious)


class Counting(Objective):
    metric_name = "exact_count_acc"

    def __init__(self, num_kinds: int):
        self.num_kinds = num_kinds

    def build_head(self, model, example):
        d, _ = _probe(model, example)
        return nn.Linear(d, self.num_kinds)

    def augment(self, x):
        flip = torch.rand(x.shape[0]) < 0.5  # mirroring keeps every count
        return torch.where(flip[:, None, None, None], x.flip(-1), x)

    def loss(self, model, head, x, y):
        return F.mse_loss(head(pooled_features(model, x)), y)

    @torch.no_grad()
    def metric(self, model, head, x, y):
        return 100.0 * (head(pooled_features(model, x)).round() == y).float().mean().item()


class Heatmap(DenseObjective):
    metric_name = "heatmap_r2"

    def loss(self, model, head, x, y):
        return F.mse_loss(self.dense_output(model, head, x, y.shape[-2:])[:, 0], y)

    @torch.no_grad()
    def metric(self, model, head, x, y):
        mse = F.mse_loss(self.dense_output(model, head, x, y.shape[-2:])[:, 0], y).item()
        return 100.0 * (1.0 - mse / y.var().item())
