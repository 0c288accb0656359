"""Why Zoo-Tuning trained worse than fine-tuning one member on the MiniZoo: the checks behind
docs/dev-notes/zoo-tuning.md, each one training through the shared engine (``fit_method``).

On one target and seed it trains, with ``zootune run``'s settings (or ``--lr`` / ``--epochs``):

- ``finetune [k]``: the member alone (the reference);
- ``zoo-tuning over [k] gate_init=reference|zero``: Zoo-Tuning over that ONE member, which should
  start as the member; the reference's random gate init does not (each sample gets its own scale
  before BatchNorm);
- ``zoo-tuning (all) bank_lr_scale=1|auto``: the whole zoo with and without the per-layer learning
  rate correction for similar sources.

Prints one line per training (validation and test accuracy). Example (the dev note's polygons check):

    python benchmarks/zoo_tuning_diagnostics.py --target polygons --member 2 --epochs 6
"""

from __future__ import annotations

import argparse

import torch

from zootune.suite.targets import TARGETS, get_target
from zootune.engine import evaluate
from zootune.experiment import run_training
from zootune.fitting import fit_method
from zootune.methods.registry import get_method
from zootune.minizoo import load_minizoo
from zootune.tasks import ClassificationTask


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="polygons", choices=list(TARGETS))
    parser.add_argument("--member", type=int, default=2, help="zoo member index (2 = scene-segmentation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=run_training().epochs)
    parser.add_argument("--lr", type=float, default=run_training().lr)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    zoo = load_minizoo()
    splits = get_target(args.target, seed=0)
    task = ClassificationTask(splits.num_classes)
    config = run_training(epochs=args.epochs, lr=args.lr, seed=args.seed)
    one = [zoo[args.member]]
    runs = [
        (f"finetune [{zoo.names[args.member]}]", "finetune", zoo, args.member, {}),
        ("zoo-tuning over it, gate_init=reference", "zoo-tuning", one, None, {"gate_init": "reference"}),
        ("zoo-tuning over it, gate_init=zero", "zoo-tuning", one, None, {"gate_init": "zero"}),
        ("zoo-tuning (all), bank_lr_scale=1", "zoo-tuning", zoo, None, {"bank_lr_scale": 1.0}),
        ("zoo-tuning (all), bank_lr_scale=auto", "zoo-tuning", zoo, None, {"bank_lr_scale": "auto"}),
    ]
    print(f"{args.target}, seed {args.seed}, {args.epochs} epochs, lr {args.lr}")
    for label, method, source, member, options in runs:
        result = fit_method(get_method(method), source, task, splits, config, member=member, options=options)
        test = evaluate(result.model, task, splits.test)["acc"]
        print(f"{label:42s} val {result.val_metric:6.2f}  test {test:6.2f}", flush=True)


if __name__ == "__main__":
    main()
