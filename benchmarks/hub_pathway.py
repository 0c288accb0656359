"""Hub-Pathway on the MiniZoo hub vs single fine-tunes, their ensemble and Zoo-Tuning.

For every target of the MiniZoo suite and every seed, with the shared engine (same optimiser settings
for every method, model selection on the validation split, one test evaluation):

- ``finetune [member]``: each hub member fine-tuned alone; ``finetune (best on val)`` picks one per
  target and seed by validation accuracy;
- ``ensemble``: the probability average of all the hub's fine-tuned members;
- ``zoo-tuning``: Zoo-Tuning on the hub's largest same-architecture group (the ResNets);
- ``hub-pathway`` (k=2), plus variants (exploitation weighting, no exploitation, no exploration).

Costs per sample (M multiply-accumulates per sample, the tables' "MMACs", FlopCounterMode: what actually runs) from
:func:`zootune.cost.measure_cost`, and the measured ratio of Hub-Pathway's inference FLOPs to the
ensemble's. Writes ``results.json`` and ``results.md`` into ``--out``.

    python benchmarks/hub_pathway.py                       # full: 4 targets x 3 seeds
    python benchmarks/hub_pathway.py --quick               # 1 target, 1 seed, short trainings
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from zootune.cost import measure_cost
from zootune.atomic import atomic_write_bytes, atomic_write_json
from zootune.suite.targets import TARGETS, get_target
from zootune.engine import TrainConfig, evaluate
from zootune.experiment import run_training
from zootune.fitting import fit_method
from zootune.methods.registry import get_method
from zootune.minizoo.hub import HUB_ZOO_MEMBERS, load_hub
from zootune.models import ResNet
from zootune.tasks import ClassificationTask
from zootune.zoo import Zoo

VARIANTS = {  # row label -> HubPathway options
    "hub-pathway": {},
    "hub-pathway (exploit gate-weighted)": {"exploit_weighting": "gate"},
    "hub-pathway (no exploit)": {"exploit_weight": 0.0},
    "hub-pathway (no explore)": {"explore_weight": 0.0},
}


def same_architecture_group(hub) -> list[int]:
    """Indices of the largest group of hub ResNets sharing parameter shapes (Zoo-Tuning aggregates
    convolution kernels, so it is run on the CNN members only)."""
    groups: dict[tuple, list[int]] = {(): []}
    for i, model in enumerate(hub):
        if not isinstance(model, ResNet):
            continue
        key = (type(model).__name__, tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()))
        groups.setdefault(key, []).append(i)
    return max(groups.values(), key=len)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=run_training().epochs)  # zootune run's settings
    parser.add_argument("--max-steps-per-epoch", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=run_training().lr)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--zoo-members", nargs="*", default=list(HUB_ZOO_MEMBERS),
                        help="MiniZoo ResNets that join the hub (zootune.minizoo.members names)")
    parser.add_argument("--no-zoo-tuning", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1 is fastest for these tiny models on a shared machine)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/hub_pathway")
    parser.add_argument("--quick", action="store_true", help="1 target, 1 seed, 2 epochs of 8 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.targets, args.seeds, args.epochs, args.max_steps_per_epoch = args.targets[:1], [0], 2, 8
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    started = time.perf_counter()

    hub = load_hub(cache_dir=args.cache_dir, zoo_members=args.zoo_members)
    resnets = same_architecture_group(hub)
    print(f"hub: {hub}; Zoo-Tuning on {[hub.names[i] for i in resnets]}", flush=True)
    rows: dict[str, dict[str, list[float]]] = {}
    costs: dict[str, dict] = {}
    routing: dict[str, list[list[int]]] = {}

    def record(label: str, target: str, value: float) -> None:
        rows.setdefault(label, {}).setdefault(target, []).append(value)

    for target in args.targets:
        splits = get_target(target, seed=0, cache_dir=args.cache_dir)
        task = ClassificationTask(splits.num_classes)
        # 64 test images: Hub-Pathway's cost depends on where its generator routes them
        example = torch.stack([splits.test[i][0] for i in range(64)])
        for seed in args.seeds:
            config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed,
                                 max_steps_per_epoch=args.max_steps_per_epoch, progress=False,
                                 exact_choices="macs")  # exact computations chosen by MACs: same numbers every run

            def run(spec_name, source, label, **kw):
                result = fit_method(get_method(spec_name), source, task, splits, config, **kw)
                test = evaluate(result.model, task, splits.test, batch_size=256)[task.metric_name]
                record(label, target, test)
                if seed == args.seeds[0] and target == args.targets[0]:
                    costs[label] = measure_cost(result.built, result.model, example).to_dict()
                print(f"{target} seed {seed} {label}: val {result.val_metric:.2f} test {test:.2f} "
                      f"({result.seconds:.0f} s)", flush=True)
                return result, test

            singles = [run("finetune", hub, f"finetune [{name}]", member=i) for i, name in enumerate(hub.names)]
            best = max(singles, key=lambda r: r[0].val_metric)
            record("finetune (best on val)", target, best[1])
            run("ensemble", hub, "ensemble", fitted={"finetune": [r[0].model for r in singles]})
            if not args.no_zoo_tuning and len(resnets) > 1:
                zoo = Zoo.from_modules([hub[i] for i in resnets], names=[hub.names[i] for i in resnets])
                run("zoo-tuning", zoo, f"zoo-tuning ({len(resnets)} ResNets)")
            for label in args.variants:
                result, _ = run("hub-pathway", hub, label, options={"k": args.k, **VARIANTS[label]})
                counts = torch.zeros(len(hub), dtype=torch.long)
                for start in range(0, len(splits.test), 256):
                    batch = torch.stack([splits.test[i][0] for i in range(start, min(start + 256, len(splits.test)))])
                    counts += result.model.route_counts(batch)
                routing.setdefault(f"{label} / {target}", []).append(counts.tolist())

    table = [f"| method | {' | '.join(args.targets)} | mean | infer MMACs | train MMACs |",
             "|---|" + "---|" * (len(args.targets) + 3)]
    summary = {}
    for label, per_target in rows.items():
        cells = [mean_std(per_target[t]) for t in args.targets]
        per_seed = [statistics.fmean(per_target[t][s] for t in args.targets) for s in range(len(args.seeds))]
        overall = mean_std(per_seed)
        cost = costs.get(label)
        summary[label] = {"targets": {t: per_target[t] for t in args.targets}, "mean": overall, "cost": costs.get(label)}
        cost_cells = f"{cost['infer_gflops'] * 1e3:.2f} | {cost['train_gflops'] * 1e3:.2f}" if cost else "– | –"
        table.append(f"| {label} | " + " | ".join(f"{m:.2f} ± {s:.2f}" for m, s in cells)
                     + f" | {overall[0]:.2f} ± {overall[1]:.2f} | {cost_cells} |")
    ratio = costs["hub-pathway"]["infer_gflops"] / costs["ensemble"]["infer_gflops"] if "hub-pathway" in costs else None
    text = "\n".join(table)
    text += f"\n\nHub-Pathway (k={args.k} of {len(hub)}) inference MACs / ensemble's = {ratio:.3f}\n" if ratio else "\n"
    text += f"\nrouting counts on the test split (per seed, hub order {hub.names}):\n"
    text += "\n".join(f"- {key}: {value}" for key, value in routing.items()) + "\n"
    seconds = time.perf_counter() - started
    text += f"\ncommand: python benchmarks/hub_pathway.py {' '.join(sys.argv[1:] if argv is None else argv)}; {seconds:.0f} s\n"
    print(text)
    atomic_write_json(out / "results.json", {
        "args": vars(args), "hub": hub.names, "results": summary, "costs": costs,
        "infer_ratio_hub_pathway_over_ensemble": ratio, "routing": routing, "seconds": round(seconds, 1),
    })
    atomic_write_bytes(out / "results.md", text.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
