"""Friedman #1 regression transfer (Pardoe & Stone 2010 variant), as in the PAC-Net paper.

    y = a1·10·sin(π·b1x1·b2x2) + a2·20·(b3x3 − 0.5)² + a3·10·b4x4 + a4·5·b5x5 + ε,   ε ~ N(0, 1)

on x ~ U[0, 1]^10 (``sklearn.datasets.make_friedman1`` inputs; x6..x10 are irrelevant). The source
task has a = b = 1 (the standard function); the target draws every a_i, b_i from N(1, σ²)
(σ = ``--coef-std``, default 0.1), per seed. Train labels are noisy, test labels noiseless, so the
RMSE is the error of the learned function. MLP 10-64-64-1 (ReLU), targets standardised.

    python benchmarks/pac_net/friedman.py --seeds 3
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import make_friedman1

sys.path.insert(0, os.path.dirname(__file__))
from common import Budget, Problem, mlp, rmse, run_methods, summarize, table, train  # noqa: E402


def friedman(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a[0] * 10 * np.sin(np.pi * b[0] * x[:, 0] * b[1] * x[:, 1]) + a[1] * 20 * (b[2] * x[:, 2] - 0.5) ** 2
            + a[2] * 10 * b[3] * x[:, 3] + a[3] * 5 * b[4] * x[:, 4])


def make_problems(seed: int, n_targets, coef_std: float, n_source: int = 5000, n_test: int = 2000):
    """One source model per seed, shared by the target sizes (each target set drawn separately)."""
    rng = np.random.default_rng(seed)
    a_s, b_s = np.ones(4), np.ones(5)
    a_t, b_t = rng.normal(1, coef_std, 4), rng.normal(1, coef_std, 5)

    def draw(n, a, b, noisy, offset):
        x, _ = make_friedman1(n_samples=n, n_features=10, random_state=seed * 1000 + offset)
        y = friedman(x, a, b) + (rng.normal(0, 1, n) if noisy else 0)
        return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)

    src_train, src_test = draw(n_source, a_s, b_s, True, 1), draw(n_test, a_s, b_s, False, 2)
    tgt_test = draw(n_test, a_t, b_t, False, 4)
    mean, std = src_train[1].mean(), src_train[1].std()
    scale = lambda d: (d[0], (d[1] - mean) / std)  # noqa: E731
    src_train, src_test, tgt_test = map(scale, (src_train, src_test, tgt_test))

    torch.manual_seed(seed)
    model = mlp(10, 64, 1)
    loss = lambda out, y: F.mse_loss(out.squeeze(-1), y)  # noqa: E731
    train(model, *src_train, loss, steps=2000, lr=1e-3, batch_size=128, seed=seed)
    metric = lambda pred, y: rmse(pred, y) * std.item()  # noqa: E731  RMSE in the function's units
    return {n: Problem(model, src_train, src_test, scale(draw(n, a_t, b_t, True, 10 + n)), tgt_test, loss, metric,
                       head_name="4") for n in n_targets}


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-target", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--coef-std", type=float, default=0.1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny MLPs: threads cost more than they give on a shared CPU
    budget = Budget(target_steps=400, target_lr=1e-3, allocate_steps=800, allocate_lr=1e-3, batch_size=64)
    problems = [make_problems(s, args.n_target, args.coef_std) for s in range(args.seeds)]
    out = []
    for n in args.n_target:
        runs = [run_methods(problems[s][n], budget, s, prune_fractions=(0.5, 0.8)) for s in range(args.seeds)]
        out.append(table(f"Friedman #1, {n} target samples (RMSE, lower is better; {args.seeds} seeds)",
                         summarize(runs), "RMSE"))
        print(out[-1], flush=True)
    return "\n".join(out)


if __name__ == "__main__":
    main()
