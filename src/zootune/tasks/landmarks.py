"""Facial landmark regression: K (x, y) points per image, scored by the normalised mean error (NME).

The Zoo-Tuning paper (Shu et al., ICML 2021, Table 2) transfers its zoo to facial landmark detection
on 300W, WFLW and COFW and reports the NME (lower is better). For one image with ground-truth points
g_1..g_K and predictions p_1..p_K::

    NME = 100 * (1/K) * sum_k ||p_k - g_k||_2 / d

    d = ||g_left_eye - g_right_eye||_2          normalisation="inter-ocular" (as 300W / WFLW)
    d = sqrt(w * h), w, h = extent of g_1..g_K   normalisation="bbox" (landmark bounding box)

and a split's NME is the mean of the per-image values (``metric_sums`` gives their exact sum).

Head: direct regression. A Linear layer on the pooled features outputs the 2K numbers
``(x_1, y_1, ..., x_K, y_K)`` in image coordinates scaled to [0, 1] (x / width, y / height). Why not
heatmaps: at 32x32 input the backbones' last feature map is 4x4, too coarse for per-pixel heatmaps
without an upsampling decoder, and a Linear head is what every zoo method here already swaps in
(``task.make_head``), so fine-tuning, the ensemble (plain mean of coordinates), the soup and
Zoo-Tuning all work unchanged. The head's bias starts at the image centre (0.5, 0.5) so the first
steps do not spend their gradient moving every point in from the corner.

Loss: smooth-L1 (Huber) on the coordinates, summed over the points and x, y of an image, averaged
over images::

    L = (1/B) sum_b sum_k sum_{c in x, y} huber_beta(p_bkc - g_bkc),
    huber_beta(e) = 0.5 e^2 / beta  if |e| < beta,  |e| - 0.5 beta  otherwise

with beta = 1/64 (half a pixel at 32x32). L1-like for large errors, so a few badly placed points do
not dominate (Girshick, Fast R-CNN 2015; Feng et al., "Wing loss", CVPR 2018 argue the same for
landmarks), quadratic within half a pixel so the optimum is not jittery. The loss is in the same
units for every image, unlike NME; normalising the loss by d would up-weight small faces, which at
32x32 are the ones the pixels say least about. Summing (not averaging) over the 2K coordinates gives
each output the gradient scale a classification logit gets from cross-entropy (about 1/B), so the
same learning rates apply; with a per-coordinate mean the head learned 2K times slower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zootune.errors import DataError
from zootune.models.heads import new_linear_head
from zootune.tasks.base import Task

NORMALISATIONS = ("inter-ocular", "bbox")


class LandmarkTask(Task):
    """Regress ``num_landmarks`` (x, y) points in [0, 1] image coordinates; NME in percent.

    Targets are float tensors of shape (N, K, 2). ``eye_indices`` names the two eye landmarks for
    ``normalisation="inter-ocular"``; ``beta`` is the smooth-L1 threshold in [0, 1] units.
    """

    metric_name = "nme"
    higher_is_better = False

    def __init__(
        self,
        num_landmarks: int,
        normalisation: str = "inter-ocular",
        eye_indices: tuple[int, int] = (0, 1),
        beta: float = 1.0 / 64,
        landmark_names: tuple[str, ...] | None = None,
    ):
        if num_landmarks < 2:
            raise DataError(f"landmark regression needs at least 2 landmarks, got {num_landmarks}")
        if normalisation not in NORMALISATIONS:
            raise DataError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
        left, right = (int(i) for i in eye_indices)
        if normalisation == "inter-ocular" and not (0 <= left < num_landmarks and 0 <= right < num_landmarks
                                                    and left != right):
            raise DataError(
                f"eye_indices {tuple(eye_indices)} must be two different landmarks of 0..{num_landmarks - 1}"
            )
        if beta <= 0:
            raise DataError(f"beta must be > 0, got {beta}")
        if landmark_names is not None and len(landmark_names) != num_landmarks:
            raise DataError(f"{len(landmark_names)} landmark names for {num_landmarks} landmarks")
        self.num_landmarks = int(num_landmarks)
        self.normalisation = normalisation
        self.eye_indices = (left, right)
        self.beta = float(beta)
        self.landmark_names = tuple(landmark_names) if landmark_names is not None else None

    @property
    def num_outputs(self) -> int:
        return 2 * self.num_landmarks

    def __repr__(self) -> str:
        return f"LandmarkTask(num_landmarks={self.num_landmarks}, normalisation={self.normalisation!r})"

    def to_config(self) -> dict:
        return {"type": "landmarks", "num_landmarks": self.num_landmarks, "normalisation": self.normalisation,
                "eye_indices": list(self.eye_indices), "beta": self.beta,
                "landmark_names": list(self.landmark_names) if self.landmark_names is not None else None}

    # ------------------------------------------------------------------ head and loss
    def make_head(self, in_features: int) -> nn.Module:
        head = new_linear_head(in_features, self.num_outputs)
        with torch.no_grad():
            head.bias.fill_(0.5)  # every point starts at the image centre
        return head

    def points(self, outputs: torch.Tensor) -> torch.Tensor:
        """The head's (B, 2K) outputs as (B, K, 2) points."""
        if outputs.dim() != 2 or outputs.shape[1] != self.num_outputs:
            raise DataError(
                f"a landmark model must output (batch, {self.num_outputs}) = 2 x {self.num_landmarks} numbers, "
                f"got {tuple(outputs.shape)}"
            )
        return outputs.reshape(outputs.shape[0], self.num_landmarks, 2)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        points = self.points(outputs)
        per_coordinate = F.smooth_l1_loss(points, targets.to(points.dtype), beta=self.beta, reduction="none")
        return per_coordinate.sum(dim=(1, 2)).mean()

    # ------------------------------------------------------------------ metric
    def normaliser(self, targets: torch.Tensor) -> torch.Tensor:
        """d per image, shape (N,): inter-ocular distance or sqrt(w * h) of the landmarks' box."""
        if self.normalisation == "inter-ocular":
            left, right = self.eye_indices
            return torch.linalg.vector_norm(targets[:, left] - targets[:, right], dim=1)
        extent = targets.amax(dim=1) - targets.amin(dim=1)  # (N, 2): w, h
        return torch.sqrt(extent[:, 0] * extent[:, 1])

    def per_sample_nme(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """NME of each image in percent, shape (N,) (float64 so split sums are exact to rounding)."""
        points = self.points(outputs).double()
        targets = targets.double()
        errors = torch.linalg.vector_norm(points - targets, dim=2)  # (N, K)
        return 100.0 * errors.mean(dim=1) / self.normaliser(targets)

    def metric_sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
        return float(self.per_sample_nme(outputs, targets).sum()), int(targets.shape[0])

    def check_targets(self, targets: torch.Tensor) -> None:
        expected = (self.num_landmarks, 2)
        if targets.dim() != 3 or tuple(targets.shape[1:]) != expected:
            raise DataError(
                f"landmark targets must have shape (batch, {expected[0]}, {expected[1]}), got {tuple(targets.shape)}"
                + (" (class labels? this is a landmark task)" if targets.dim() == 1 else "")
            )
        if not targets.is_floating_point():
            raise DataError(f"landmark targets must be floating point coordinates, got {targets.dtype}")
        if targets.numel() == 0:
            return
        if not torch.isfinite(targets).all():
            bad = int((~torch.isfinite(targets)).any(dim=2).any(dim=1).sum())
            raise DataError(f"{bad} image(s) in the batch have non-finite (NaN/inf) landmark coordinates")
        d = self.normaliser(targets)
        if not (d > 0).all():
            what = "the two eye landmarks coincide" if self.normalisation == "inter-ocular" else \
                "the landmarks' bounding box has zero width or height"
            raise DataError(f"{int((d <= 0).sum())} image(s) cannot be scored: {what} (NME divides by it)")
