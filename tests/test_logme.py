"""LogME scores, zoo ranking and Kendall's tau."""

import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from zootune.errors import DataError
from zootune.methods.logme import kendall_tau, logme_score, rank_zoo


def direct_log_evidence(f, y, iterations=300):
    """Bayesian linear regression evidence at MacKay's fixed point, with explicit matrices."""
    n, d = f.shape
    ftf = f.T @ f
    eig = np.linalg.eigvalsh(ftf)
    alpha, beta = 1.0, 1.0
    for _ in range(iterations):
        a = alpha * np.eye(d) + beta * ftf
        m = beta * np.linalg.solve(a, f.T @ y)
        gamma = np.sum(beta * eig / (alpha + beta * eig))
        new_alpha = gamma / (m @ m)
        new_beta = (n - gamma) / np.sum((y - f @ m) ** 2)
        done = abs(new_alpha - alpha) < 1e-10 * alpha and abs(new_beta - beta) < 1e-10 * beta
        alpha, beta = new_alpha, new_beta
        if done:
            break
    a = alpha * np.eye(d) + beta * ftf
    m = beta * np.linalg.solve(a, f.T @ y)
    _, logdet = np.linalg.slogdet(a)
    return (
        -n / 2 * np.log(2 * np.pi)
        + n / 2 * np.log(beta)
        + d / 2 * np.log(alpha)
        - beta / 2 * np.sum((y - f @ m) ** 2)
        - alpha / 2 * (m @ m)
        - 0.5 * logdet
    )


@pytest.mark.parametrize("n,d", [(60, 8), (12, 20)])  # more samples than features, and fewer
def test_logme_matches_direct_evidence(n, d):
    rng = np.random.default_rng(n)
    labels = rng.integers(0, 3, size=n)
    f = rng.normal(size=(n, d)) + 0.8 * np.eye(3, d)[labels]
    expected = np.mean([direct_log_evidence(f, (labels == c).astype(float)) / n for c in range(3)])
    assert logme_score(f, labels) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    if n < d:
        return  # real targets are interpolated exactly when N < D: beta -> inf, no finite fixed point
    # Regression targets (linear in the features plus noise): each column its own evidence.
    targets = f @ rng.normal(size=(d, 2)) * 0.3 + rng.normal(size=(n, 2))
    expected_reg = np.mean([direct_log_evidence(f, targets[:, k]) / n for k in range(2)])
    assert logme_score(torch.tensor(f), torch.tensor(targets)) == pytest.approx(expected_reg, rel=1e-5, abs=1e-6)


def test_logme_errors():
    with pytest.raises(DataError):
        logme_score(np.zeros((5, 3)), np.zeros(4, dtype=int))
    with pytest.raises(DataError):
        logme_score(np.full((5, 3), np.nan), np.zeros(5, dtype=int))


class ToyDataset(torch.utils.data.Dataset):
    """Labels depend on channel 0 only."""

    def __init__(self, n=120):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 4, 4, generator=g)
        self.y = (self.x[:, 0].mean(dim=(1, 2)) > 0).long() + 2 * (self.x[:, 0, 0, 0] > 0).long()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class WithFeatures(nn.Module):
    """forward_features sees only the chosen channels."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.fc = nn.Linear(16 * len(channels), 5)

    def forward_features(self, x):
        return x[:, self.channels].flatten(1)

    def forward(self, x):
        return self.fc(self.forward_features(x))


class WithoutFeatures(nn.Module):
    """No forward_features: the head's input must be captured by a hook."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.fc = nn.Linear(16 * len(channels), 5)

    def forward(self, x):
        return self.fc(x[:, self.channels].flatten(1))


@pytest.mark.parametrize("kind", [WithFeatures, WithoutFeatures])
def test_rank_zoo_puts_informative_features_first(kind):
    data = ToyDataset()
    zoo = [kind([1, 2]), kind([0]), kind([2])]
    ranking = rank_zoo(zoo, data, batch_size=32, names=["noise12", "informative", "noise2"])
    assert ranking[0][0] == "informative"
    assert [s for _, s in ranking] == sorted((s for _, s in ranking), reverse=True)
    # The score is LogME of the pooled features computed plainly here.
    x, y = data.x, data.y
    direct = logme_score(x[:, [0]].flatten(1).numpy(), y.numpy())
    assert dict(ranking)["informative"] == pytest.approx(direct, rel=1e-6)


def test_kendall_tau_equals_scipy():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(2, 15))
        if trial % 2:  # with ties
            x, y = rng.integers(0, 4, n).astype(float), rng.integers(0, 4, n).astype(float)
        else:
            x, y = rng.normal(size=n), rng.normal(size=n)
        expected = scipy.stats.kendalltau(x, y).statistic
        got = kendall_tau(x, y)
        if math.isnan(expected):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(expected, abs=1e-12)
