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


def plain_tau_b(x, y):
    """Kendall's tau-b by counting pairs one by one."""
    concordant = discordant = tied_x_only = tied_y_only = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue  # tied in both: counted nowhere
            if dx == 0:
                tied_x_only += 1
            elif dy == 0:
                tied_y_only += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    return (concordant - discordant) / math.sqrt(
        (concordant + discordant + tied_x_only) * (concordant + discordant + tied_y_only)
    )


def test_kendall_tau_equals_plain_pairwise_count():
    # 5 members: one tie in x (0.2, 0.2), one in y (70, 70), one pair tied in both (members 3, 4).
    x = [0.9, 0.2, 0.2, 0.5, 0.5]
    y = [80.0, 70.0, 60.0, 70.0, 70.0]
    # By hand: concordant 01 02 03 04 23 24 (P = 6), discordant none, tied in x only 12, in y only
    # 13 14, in both 34 -> tau_b = 6 / sqrt((6 + 1) * (6 + 2)).
    assert plain_tau_b(x, y) == pytest.approx(6 / math.sqrt(56))
    assert kendall_tau(x, y) == pytest.approx(plain_tau_b(x, y))
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(3, 9))
        a, b = rng.integers(0, 3, n).astype(float), rng.integers(0, 3, n).astype(float)
        if len(set(a)) > 1 and len(set(b)) > 1:
            assert kendall_tau(a, b) == pytest.approx(plain_tau_b(a, b))


def test_logme_vs_members_orients_tau_by_the_metric():
    from zootune.analyses import logme_vs_members

    scores = {"a": 0.9, "b": 0.5, "c": 0.1, "unranked": 0.0}
    accuracy = {"a": 70.0, "b": 80.0, "c": 60.0}  # "unranked" has no fine-tune: left out
    cell = logme_vs_members(scores, accuracy, higher_is_better=True)
    assert set(cell["scores"]) == {"a", "b", "c"}
    assert cell["top_match"] is False  # LogME's best (a) is not the best fine-tuned (b)
    assert cell["kendall_tau"] == pytest.approx(plain_tau_b([0.9, 0.5, 0.1], [70.0, 80.0, 60.0]))
    # An error metric (lower is better): LogME agreeing with the order of quality gives tau = +1.
    error = {"a": 1.0, "b": 2.0, "c": 3.0}
    assert logme_vs_members(scores, error, higher_is_better=False)["kendall_tau"] == pytest.approx(1.0)
    assert logme_vs_members(scores, error, higher_is_better=False)["top_match"] is True
    # Undefined cases are None (JSON null), not NaN.
    assert logme_vs_members(scores, {"a": 50.0, "b": 50.0}, True)["kendall_tau"] is None
    assert logme_vs_members(scores, {"a": 50.0}, True)["kendall_tau"] is None
