"""Why robust Zoo-Tuning's first epoch can blow up where fine-tuning its own start member trains.

Trains, side by side with the same seed, data order and optimiser (the engine's SGD: Nesterov 0.9,
weight decay 5e-4, constant lr for the first steps), fine-tuning member s and robust Zoo-Tuning
started on member s (and variants of it), and prints every ``--every`` steps: the training loss,
the validation loss in eval mode, and per aggregated layer the norm of the effective kernel
K = sum_i a_i T_i W_i (batch-mean gates) relative to fine-tuning's kernel of that layer at the same
step, and ||T_s - I|| of the start member's alignment.

    python benchmarks/zoo_tuning_first_steps.py --target textures --member 2 --lr 0.1 --steps 100
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from torch.utils.data import DataLoader

from zootune.suite.targets import get_target
from zootune.methods.finetune import fine_tune
from zootune.methods.zoo_tuning import ZooTuning, ZooTuningOptions
from zootune.minizoo import load_minizoo
from zootune.tasks import ClassificationTask


def val_loss(model, task, val) -> float:
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in DataLoader(val, batch_size=256):
            total += float(task.loss(model(x), y)) * len(y)
            n += len(y)
    model.train()
    return total / n


def variants(member):
    base = dict(start_member=member)
    yield "finetune", None
    yield "robust (default)", base
    yield "… T, gates frozen", {**base, "_freeze": "align+gate"}
    yield "… unpreconditioned", {**base, "gate_lr_scale": 0.2, "align_lr_scale": 1.0}
    yield "… gates unprecond.", {**base, "gate_lr_scale": 0.2}
    yield "… T unprecond.", {**base, "align_lr_scale": 1.0}


def build(zoo, task, member, options, lite, seed):
    torch.manual_seed(seed)
    if options is None:
        return fine_tune(zoo[member], task)
    options = dict(options)
    freeze = options.pop("_freeze", "")
    model = ZooTuning(zoo, num_outputs=task.num_classes, lite=lite, options=ZooTuningOptions(**options))
    for layer in model.aggregated_layers().values():
        if "align" in freeze and layer.align is not None:
            for p in layer.align.parameters():
                p.requires_grad_(False)
        if "gate" in freeze:
            for p in layer.gate.parameters():
                p.requires_grad_(False)
    return model


def groups(model, lr):
    out = []
    for g in model.param_groups(lr):
        params = [p for p in g["params"] if p.requires_grad]
        if params:
            out.append({**g, "params": params})
    return out


def train(model, task, splits, lr, steps, every, seed, tracked):
    opt = torch.optim.SGD(groups(model, lr), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loader = DataLoader(splits.train, batch_size=64, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    rows, step = [], 0
    model.train()
    while step < steps:
        for x, y in loader:
            loss = task.loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % every == 0 or step == 1:
                rows.append({"step": step, "train_loss": float(loss.detach()), "val_loss": val_loss(model, task, splits.val),
                             "kernel_norms": tracked(model)})
            if step >= steps:
                break
    return rows


def kernel_norms(model):
    if hasattr(model, "aggregated_layers"):
        norms = {}
        for name, layer in model.aggregated_layers().items():
            with torch.no_grad():  # K at the gates every input starts with (the gates move slowly)
                norms[name] = float(layer.fold(layer.gate_ema)[0].norm())
        return norms
    return {name: float(m.weight.norm()) for name, m in model.model.named_modules()
            if isinstance(m, torch.nn.Conv2d)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="textures")
    p.add_argument("--member", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lite", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    zoo = load_minizoo()
    splits = get_target(args.target, seed=0)
    task = ClassificationTask(splits.num_classes)
    results = {}
    for name, options in variants(args.member):
        model = build(zoo, task, args.member, options, args.lite, args.seed)
        results[name] = train(model, task, splits, args.lr, args.steps, args.every, args.seed, kernel_norms)
    ft = results["finetune"]
    print(f"{args.target}, start member {args.member}, lr {args.lr}, seed {args.seed}: "
          "train loss / eval-mode val loss / median over layers of ||K||/||W_finetune||")
    for name, rows in results.items():
        cells = []
        for row, ref in zip(rows, ft):
            ratios = [row["kernel_norms"][k] / ref["kernel_norms"][k] for k in row["kernel_norms"]
                      if k in ref["kernel_norms"]]
            ratio = sorted(ratios)[len(ratios) // 2] if ratios else math.nan
            cells.append(f"{row['step']}:{row['train_loss']:.2f}/{row['val_loss']:.2f}/{ratio:.2f}")
        print(f"{name:24s} " + "  ".join(cells))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
