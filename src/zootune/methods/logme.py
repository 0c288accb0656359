"""LogME: ranking pretrained models for a target task without fine-tuning them.

You, Liu, Wang, Long, "LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
ICML 2021. With frozen features F (N x D) of the target data and one target column y (N,) -- for
classification the one-hot indicator of each class in turn -- model y = F w + noise as Bayesian linear
regression with prior w ~ N(0, alpha^-1 I) and noise N(0, beta^-1). The log evidence is::

    log p(y | F, alpha, beta) = N/2 log beta + D/2 log alpha - N/2 log 2 pi
                                - beta/2 ||F m - y||^2 - alpha/2 m^T m - 1/2 log det A
    A = alpha I + beta F^T F,   m = beta A^-1 F^T y

maximised over (alpha, beta) by MacKay's fixed point (the paper's Algorithm 1)::

    gamma = sum_i beta s_i / (alpha + beta s_i)     (s_i eigenvalues of F^T F)
    alpha <- gamma / (m^T m),     beta <- (N - gamma) / ||F m - y||^2

Everything is computed from one SVD F = U diag(sqrt(s)) V^T: with x = U^T y, m = V (beta sqrt(s) x /
(alpha + beta s)) and ||F m - y||^2 = sum (alpha x / (alpha + beta s))^2 + (||y||^2 - ||x||^2), so each
iteration costs O(min(N, D)). The score is the maximised evidence divided by N, averaged over the
target columns; higher means the features suit the task better.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from zootune.errors import DataError, ZootuneError
from zootune.models.features import FeatureFn, feature_extractor


def _evidence_for_column(
    y: np.ndarray, x: np.ndarray, s: np.ndarray, n: int, d: int, max_iter: int, tol: float
) -> float:
    """Maximised log evidence / N for one target column (see the module docstring)."""
    y_norm2 = float(y @ y)
    x2 = x * x
    # Residual outside the span of F's columns: F m cannot reach it for any m.
    outside = max(y_norm2 - float(x2.sum()), 0.0)
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        denom = alpha + beta * s
        gamma = float((beta * s / denom).sum())
        m_norm2 = float((beta**2 * s * x2 / denom**2).sum())
        residual2 = float((alpha**2 * x2 / denom**2).sum()) + outside
        new_alpha = gamma / max(m_norm2, 1e-300)
        new_beta = (n - gamma) / max(residual2, 1e-300)
        if not (math.isfinite(new_alpha) and math.isfinite(new_beta) and new_alpha > 0 and new_beta > 0):
            # alpha -> inf (w = 0 explains y best) or a perfect fit: the evidence has already levelled off.
            break
        converged = abs(new_alpha - alpha) <= tol * alpha and abs(new_beta - beta) <= tol * beta
        alpha, beta = new_alpha, new_beta
        if converged:
            break
    denom = alpha + beta * s
    m_norm2 = float((beta**2 * s * x2 / denom**2).sum())
    residual2 = float((alpha**2 * x2 / denom**2).sum()) + outside
    # log det A: eigenvalues alpha + beta s_i on F's row space, alpha on the remaining D - r directions.
    log_det_a = float(np.log(denom).sum()) + (d - len(s)) * math.log(alpha)
    evidence = (
        n / 2 * math.log(beta)
        + d / 2 * math.log(alpha)
        - n / 2 * math.log(2 * math.pi)
        - beta / 2 * residual2
        - alpha / 2 * m_norm2
        - 0.5 * log_det_a
    )
    return evidence / n


def logme_score(
    features, labels, *, max_iter: int = 1000, tol: float = 1e-8
) -> float:
    """LogME of ``features`` (N, D) for ``labels``: mean over target columns of max log evidence / N.

    ``labels``: integer class labels (N,) -- one column per class present, the one-hot indicator --
    or real-valued targets (N,) / (N, K) for regression, one column each.
    """
    f = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    t = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if f.ndim != 2 or f.shape[0] == 0:
        raise DataError(f"LogME needs features of shape (N, D) with N > 0, got {f.shape}")
    if t.shape[0] != f.shape[0]:
        raise DataError(f"LogME: {f.shape[0]} feature rows but {t.shape[0]} labels")
    if not np.isfinite(f).all():
        raise DataError("LogME: features contain NaN or infinite values")
    n, d = f.shape
    if t.ndim == 1 and np.issubdtype(t.dtype, np.integer):
        classes = np.unique(t)
        targets = (t[:, None] == classes[None, :]).astype(np.float64)
    else:
        targets = t.astype(np.float64).reshape(n, -1)
    u, sv, _ = np.linalg.svd(f, full_matrices=False)
    s = sv**2
    projected = u.T @ targets  # (r, K): x = U^T y for every column at once
    scores = [
        _evidence_for_column(targets[:, k], projected[:, k], s, n, d, max_iter, tol)
        for k in range(targets.shape[1])
    ]
    return float(np.mean(scores))


def rank_zoo(
    zoo: Sequence[nn.Module],
    dataset,
    batch_size: int = 64,
    feature_fn: str | FeatureFn | None = None,
    names: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> list[tuple[str, float]]:
    """LogME of every member's frozen pooled features on ``dataset``, best first.

    One pass over the data: each batch goes through every member (eval mode, no gradient). Features
    are those of :func:`zootune.models.features.feature_extractor`: ``forward_features`` when the
    model has it, else the input of its head (the forward stops there); ``feature_fn`` -- a method
    name or a callable ``fn(model, x)`` -- overrides it. Returns ``[(name, score), ...]``.
    """
    if len(zoo) == 0:
        raise ZootuneError("the zoo is empty: nothing to rank")
    if names is None:
        names = getattr(zoo, "names", None) or [f"member{i}" for i in range(len(zoo))]
    if len(names) != len(zoo):
        raise ZootuneError(f"{len(names)} names for {len(zoo)} models")
    members = list(zoo)
    extractors = [feature_extractor(m, method=feature_fn) for m in members]
    was_training = [m.training for m in members]
    feats: list[list[torch.Tensor]] = [[] for _ in members]
    labels: list[torch.Tensor] = []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    try:
        for m in members:
            m.eval()
        with torch.no_grad():
            for x, y in loader:
                x = x.to(device)
                for i, extract in enumerate(extractors):
                    feats[i].append(extract(members[i], x).float().cpu())
                labels.append(torch.as_tensor(y))
    finally:
        for m, mode in zip(members, was_training):
            m.train(mode)
    if not labels:
        raise DataError("cannot rank the zoo on an empty dataset")
    y_all = torch.cat(labels).numpy()
    scores = [(name, logme_score(torch.cat(f).numpy(), y_all)) for name, f in zip(names, feats)]
    return sorted(scores, key=lambda item: item[1], reverse=True)


def best_member(zoo: Sequence[nn.Module], dataset) -> int:
    """The index of the member :func:`rank_zoo` ranks first on ``dataset`` (its images as evaluated:
    a dataset with ``with_transform`` is read without its training augmentation); 0 for one member."""
    if len(zoo) == 1:
        return 0
    data = dataset.with_transform(None) if hasattr(dataset, "with_transform") else dataset
    names = [f"m{i}" for i in range(len(zoo))]
    return names.index(rank_zoo(list(zoo), data, names=names)[0][0])


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b between two score lists (ties handled as scipy.stats.kendalltau)::

        tau_b = (P - Q) / sqrt((P + Q + T_x) (P + Q + T_y))

    P / Q: concordant / discordant pairs, T_x / T_y: pairs tied only in x / only in y (pairs tied in
    both count nowhere). NaN when either list is constant.
    """
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ZootuneError(f"kendall_tau needs two 1-D lists of equal length, got {a.shape} and {b.shape}")
    i, j = np.triu_indices(len(a), k=1)
    da = np.sign(a[i] - a[j])
    db = np.sign(b[i] - b[j])
    concordant_minus_discordant = float((da * db).sum())
    untied_x = float((da != 0).sum())  # P + Q + T_y
    untied_y = float((db != 0).sum())  # P + Q + T_x
    if untied_x == 0 or untied_y == 0:
        return float("nan")
    return concordant_minus_discordant / math.sqrt(untied_x * untied_y)
