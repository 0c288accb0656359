"""Robustness of the zoo methods to uneven zoos: never below fine-tuning the best member?

Three settings, every training with ``zootune run``'s settings (SGD lr 0.1, Nesterov, weight decay
5e-4, cosine, 8 epochs, batch 64; model selection on validation, test evaluated once) through the
shared engine (:func:`zootune.experiment.fit_method`), formulations chosen by MACs (deterministic):

- ``a``: the four suite targets (digits8x8, textures, count, polygons) with the MiniZoo;
- ``b``: the same targets with the MiniZoo plus two junk members (``zootune.minizoo.junk``: a random
  initialisation and a model pretrained on MNIST with shuffled labels);
- ``c``: the ``letters`` target (:mod:`zootune.suite.letters`), where one member dominates and most
  transfer no better than training from scratch (the ``random-init`` member fine-tuned IS training
  from scratch: its row is reported too).

Rows: every member fine-tuned alone; ``finetune (best on val)`` (per target and seed, the member with
the best validation accuracy: the baseline a user would run); Zoo-Tuning and Lite, robust (the
default) and paper variants; with ``--hub`` (setting ``a`` only), Hub-Pathway robust and paper on the
MiniZoo hub and the hub's own best-on-val member. The robust variants start from the member ranked
first by :func:`zootune.methods.zoo_tuning.start.score_members` (``--score``); both scores (the short
fine-tuning probe and LogME) are recorded, with how often each one's top member is the best-on-val
member, and their cost.

``--diagnose`` instead trains the named diagnostic variants (the causes measured in
docs/dev-notes/zoo-tuning.md) on ``--targets``.

Every finished training is appended to ``<out>/runs.jsonl``; a rerun with the same ``--out`` skips
what is there (so an interrupted run resumes). The summary goes to ``<out>/results.md`` and
``<out>/results.json``.

    python benchmarks/robustness.py                       # a, b, c: 3 seeds, with Hub-Pathway
    python benchmarks/robustness.py --settings c --seeds 0 --no-hub
    python benchmarks/robustness.py --diagnose --targets letters polygons --seeds 0
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from zootune.data.cache import atomic_write_bytes, atomic_write_json
from zootune.suite.targets import TARGETS, get_target
from zootune.engine import evaluate
from zootune.experiment import run_training
from zootune.fitting import fit_method
from zootune.methods.registry import get_method
from zootune.methods.zoo_tuning.start import combine, rank, score_members
from zootune.minizoo import load_minizoo
from zootune.minizoo.junk import load_junk_members
from zootune.tasks import ClassificationTask
from zootune.zoo import Zoo

SETTINGS = {
    "a": {"targets": list(TARGETS), "junk": False, "about": "MiniZoo, suite targets"},
    "b": {"targets": list(TARGETS), "junk": True, "about": "MiniZoo + 2 junk members, suite targets"},
    "c": {"targets": ["letters"], "junk": False, "about": "MiniZoo, the uneven letters target"},
}
BEST = "finetune (best on val)"
TWO_STARTS = "robust, better of the 2 first-ranked starts on val"
# label -> (method, options); "{scores}" is replaced by the member scores of the target and seed
ZOO_ROWS = {
    "zoo-tuning (robust)": ("zoo-tuning", {"variant": "robust"}),
    "zoo-tuning (paper)": ("zoo-tuning", {"variant": "paper"}),
    "lite (robust)": ("lite", {"variant": "robust"}),
    "lite (paper)": ("lite", {"variant": "paper"}),
}
HUB_ROWS = {
    "hub-pathway (robust)": {"variant": "robust"},
    "hub-pathway (paper)": {"variant": "paper"},
}
# --diagnose: label -> (method, options); "start" options get start_member = the ranked-best member
DIAGNOSTIC_VARIANTS = {
    "paper": ("zoo-tuning", {"variant": "paper"}),
    "paper, softmax gates": ("zoo-tuning", {"variant": "paper", "gate": "softmax"}),
    "paper, gate lr x1 (not x5)": ("zoo-tuning", {"variant": "paper", "gate_lr_scale": 1.0}),
    "paper, gate lr x20": ("zoo-tuning", {"variant": "paper", "gate_lr_scale": 20.0}),
    "paper, bank lr x1 (not auto)": ("zoo-tuning", {"variant": "paper", "bank_lr_scale": 1.0}),
    "paper, no alignment": ("zoo-tuning", {"variant": "paper", "align": "none"}),
    "paper, no weight decay on T": ("zoo-tuning", {"variant": "paper", "align_weight_decay": 0.0}),
    "paper, mean BN statistics kept": ("zoo-tuning", {"variant": "paper", "keep_bn_stats": True}),
    "paper + start member's norms (gates uniform)": ("zoo-tuning", {"variant": "paper", "start": True,
                                                                     "norm_init": "start", "off_gate": 0.5}),
    "paper + sigmoid gates on start (0.95/0.05), mean norms": ("zoo-tuning", {"variant": "paper", "start": True,
                                                                               "off_gate": 0.05, "norm_init": "mean"}),
    "paper + sigmoid gates on start (0.95/0.05) + its norms": ("zoo-tuning", {"variant": "paper", "start": True,
                                                                               "off_gate": 0.05, "norm_init": "start"}),
    "paper + sigmoid gates on start (0.99/0.01) + its norms": ("zoo-tuning", {"variant": "paper", "start": True,
                                                                               "off_gate": 0.01, "norm_init": "start"}),
    "robust": ("zoo-tuning", {"variant": "robust", "start": True}),
    "robust, gate lr x1": ("zoo-tuning", {"variant": "robust", "start": True, "gate_lr_scale": 1.0}),
    "robust, gate lr x5": ("zoo-tuning", {"variant": "robust", "start": True, "gate_lr_scale": 5.0}),
    "robust, linear gates": ("zoo-tuning", {"variant": "robust", "start": True, "gate": "linear"}),
    "robust, mean norms": ("zoo-tuning", {"variant": "robust", "start": True, "norm_init": "mean"}),
    "robust lite": ("lite", {"variant": "robust", "start": True}),
    # "start": k starts on the k-th ranked member; with both rows, the table adds the better of the
    # two on validation (what training from the two first-ranked starts and selecting would give)
    "robust, 2nd-ranked start": ("zoo-tuning", {"variant": "robust", "start": 2}),
    "hub: paper": ("hub-pathway", {"variant": "paper"}),
    "hub: robust": ("hub-pathway", {"variant": "robust", "scores": True}),
    "hub: robust, uniform exploration": ("hub-pathway", {"variant": "robust", "scores": True, "explore": "uniform"}),
    "hub: robust, no exploration": ("hub-pathway", {"variant": "robust", "scores": True, "explore_weight": 0.0}),
    "hub: robust, prior 1.5": ("hub-pathway", {"variant": "robust", "scores": True, "route_prior": 1.5}),
    "hub: robust, prior 6": ("hub-pathway", {"variant": "robust", "scores": True, "route_prior": 6.0}),
    "hub: robust, prior on the best only": ("hub-pathway", {"variant": "robust", "scores": True, "route_prior_top": 1}),
    "hub: robust, prior on the 3 best": ("hub-pathway", {"variant": "robust", "scores": True, "route_prior_top": 3}),
}


def mean_std(values):
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


class Runs:
    """runs.jsonl: one line per finished training (or score), keyed by (zoo, target, seed, label)."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[tuple, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.done[(row["zoo"], row["target"], row["seed"], row["label"])] = row

    def get(self, zoo, target, seed, label):
        return self.done.get((zoo, target, seed, label))

    def add(self, row: dict) -> dict:
        self.done[(row["zoo"], row["target"], row["seed"], row["label"])] = row
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--targets", nargs="+", default=None, help="restrict the settings' targets")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--score", default="probe+logme", choices=("probe+logme", "probe", "logme"),
                        help="the member ranking the robust variants start from")
    parser.add_argument("--no-hub", action="store_true", help="skip Hub-Pathway (setting a)")
    parser.add_argument("--rows", nargs="+", default=None, help="restrict the zoo method rows")
    parser.add_argument("--diagnose", nargs="*", default=None, metavar="VARIANT",
                        help=f"train diagnostic variants instead (default: all of {list(DIAGNOSTIC_VARIANTS)})")
    parser.add_argument("--epochs", type=int, default=run_training().epochs)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/robustness")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Runs(out / "runs.jsonl")
    started = time.perf_counter()
    command = "python benchmarks/robustness.py " + shlex.join(sys.argv[1:] if argv is None else argv)

    minizoo = load_minizoo(cache_dir=args.cache_dir)
    junk = load_junk_members(cache_dir=args.cache_dir)
    zoos = {
        "minizoo": minizoo,
        "minizoo+junk": Zoo([*minizoo, *(m for _, m in junk)], names=[*minizoo.names, *(n for n, _ in junk)]),
    }
    splits_cache: dict[str, object] = {}

    def splits_of(target):
        if target not in splits_cache:
            splits_cache[target] = get_target(target, seed=0, cache_dir=args.cache_dir)
        return splits_cache[target]

    def train(zoo_key, zoo, target, seed, label, method, *, member=None, options=None):
        row = runs.get(zoo_key, target, seed, label)
        if row is not None:
            return row
        splits = splits_of(target)
        task = ClassificationTask(splits.num_classes)
        config = run_training(epochs=args.epochs, seed=seed)
        result = fit_method(get_method(method), zoo, task, splits, config, member=member, options=options or {})
        test = evaluate(result.model, task, splits.test, batch_size=256)[task.metric_name]
        row = {"zoo": zoo_key, "target": target, "seed": seed, "label": label, "val": result.val_metric,
               "test": float(test), "seconds": round(result.seconds, 2)}
        if hasattr(result.built, "config") and hasattr(result.built.config, "kept_members"):
            row["kept_members"] = result.built.config.kept_members
            row["start_member"] = result.built.config.start_member
            # mean gate per member over the aggregated layers and the validation images (after training)
            with result.built.record_gates():
                evaluate(result.built, task, splits.val, batch_size=256)
            gates = torch.stack(list(result.built.gate_statistics().values()))
            row["mean_gates"] = [round(float(v), 4) for v in gates.mean(0)]
        print(f"{zoo_key} {target} seed {seed} {label}: val {row['val']:.2f} test {row['test']:.2f} "
              f"({row['seconds']:.1f} s)", flush=True)
        return runs.add(row)

    def scores(zoo_key, zoo, target, seed, how):
        if how == "probe+logme":  # derived from the two stored rankings: no extra training
            return combine(scores(zoo_key, zoo, target, seed, "probe"), scores(zoo_key, zoo, target, seed, "logme"))
        label = f"scores:{how}"
        row = runs.get(zoo_key, target, seed, label)
        if row is None:
            splits = splits_of(target)
            task = ClassificationTask(splits.num_classes)
            begin = time.perf_counter()
            values = score_members(zoo, task, splits.train, splits.val, method=how,
                                   train_config=run_training(epochs=args.epochs, seed=seed))
            row = runs.add({"zoo": zoo_key, "target": target, "seed": seed, "label": label, "scores": values,
                            "seconds": round(time.perf_counter() - begin, 2)})
        return row["scores"]

    if args.diagnose is not None:
        return diagnose(args, zoos["minizoo"], train, scores, out, started, command)
    hub = None
    if "a" in args.settings and not args.no_hub:
        from zootune.minizoo.hub import load_hub

        hub = load_hub(cache_dir=args.cache_dir)
    for setting in args.settings:
        zoo_key = "minizoo+junk" if SETTINGS[setting]["junk"] else "minizoo"
        zoo = zoos[zoo_key]
        targets = [t for t in SETTINGS[setting]["targets"] if args.targets is None or t in args.targets]
        for target in targets:
            for seed in args.seeds:
                for i, name in enumerate(zoos["minizoo+junk"].names):  # junk fine-tunes: "from scratch"
                    train("minizoo+junk", zoos["minizoo+junk"], target, seed, f"finetune [{name}]", "finetune",
                          member=i)
                member_scores = {how: scores(zoo_key, zoo, target, seed, how) for how in ("logme", "probe", "probe+logme")}
                for label, (method, options) in ZOO_ROWS.items():
                    if args.rows is not None and label not in args.rows:
                        continue
                    options = dict(options)
                    if options["variant"] == "robust":
                        options["member_scores"] = member_scores[args.score]
                    train(zoo_key, zoo, target, seed, label, method, options=options)
                if hub is not None and setting == "a":
                    for i, name in enumerate(hub.names):
                        train("hub", hub, target, seed, f"finetune [{name}]", "finetune", member=i)
                    hub_scores = {how: scores("hub", hub, target, seed, how) for how in ("logme", "probe", "probe+logme")}
                    for label, options in HUB_ROWS.items():
                        options = dict(options)
                        if options["variant"] == "robust":
                            options["member_scores"] = hub_scores[args.score]
                        train("hub", hub, target, seed, label, "hub-pathway", options=options)
    text, summary = summarise(args, runs, zoos, hub, started, command)
    print(text)
    atomic_write_bytes(out / "results.md", text.encode())
    atomic_write_json(out / "results.json", summary)
    return 0


def summarise(args, runs, zoos, hub, started, command):
    lines, summary = [], {"command": command, "settings": {}}
    for setting in args.settings:
        zoo_key = "minizoo+junk" if SETTINGS[setting]["junk"] else "minizoo"
        names = list(zoos[zoo_key].names)
        targets = [t for t in SETTINGS[setting]["targets"] if args.targets is None or t in args.targets]
        table: dict[str, dict[str, list[float]]] = {}
        picks = {"probe": [0, 0], "logme": [0, 0], "probe+logme": [0, 0]}
        hub_picks = {how: [0, 0] for how in picks}

        def stored(zoo_key, target, seed, how):
            if how == "probe+logme":
                return combine(stored(zoo_key, target, seed, "probe"), stored(zoo_key, target, seed, "logme"))
            return runs.get(zoo_key, target, seed, f"scores:{how}")["scores"]

        for target in targets:
            for seed in args.seeds:
                singles = [runs.get("minizoo+junk", target, seed, f"finetune [{n}]") for n in names]
                for name, row in zip(names, singles):
                    table.setdefault(f"finetune [{name}]", {}).setdefault(target, []).append(row["test"])
                if "random-init" not in names:  # the junk random-init member fine-tuned: from scratch
                    scratch = runs.get("minizoo+junk", target, seed, "finetune [random-init]")
                    table.setdefault("from scratch (= finetune [random-init])", {}).setdefault(target, []).append(
                        scratch["test"])
                best = max(range(len(names)), key=lambda i: singles[i]["val"])
                table.setdefault(BEST, {}).setdefault(target, []).append(singles[best]["test"])
                for how in picks:
                    values = stored(zoo_key, target, seed, how)
                    picks[how][0] += int(max(range(len(values)), key=lambda i: values[i]) == best)
                    picks[how][1] += 1
                for label in ZOO_ROWS:
                    row = runs.get(zoo_key, target, seed, label)
                    if row is not None:
                        table.setdefault(label, {}).setdefault(target, []).append(row["test"])
                if hub is not None and setting == "a":
                    hub_singles = [runs.get("hub", target, seed, f"finetune [{n}]") for n in hub.names]
                    hub_best = max(range(len(hub.names)), key=lambda i: hub_singles[i]["val"])
                    for how in hub_picks:
                        values = stored("hub", target, seed, how)
                        hub_picks[how][0] += int(max(range(len(values)), key=lambda i: values[i]) == hub_best)
                        hub_picks[how][1] += 1
                    table.setdefault(f"hub: {BEST}", {}).setdefault(target, []).append(hub_singles[hub_best]["test"])
                    for label in HUB_ROWS:
                        row = runs.get("hub", target, seed, label)
                        if row is not None:
                            table.setdefault(f"hub: {label}", {}).setdefault(target, []).append(row["test"])
        lines.append(f"### Setting {setting}: {SETTINGS[setting]['about']} ({len(args.seeds)} seeds, test accuracy %)\n")
        lines.append("| method | " + " | ".join(targets) + " | mean |")
        lines.append("|---|" + "---:|" * (len(targets) + 1))
        rows_out = {}
        for label, per_target in table.items():
            if not all(len(per_target.get(t, [])) == len(args.seeds) for t in targets):
                continue
            cells = [mean_std(per_target[t]) for t in targets]
            per_seed = [statistics.fmean(per_target[t][s] for t in targets) for s in range(len(args.seeds))]
            overall = mean_std(per_seed)
            rows_out[label] = {"targets": {t: per_target[t] for t in targets}, "mean": overall}
            bold = "**" if label == "zoo-tuning (robust)" else ""
            lines.append(f"| {bold}{label}{bold} | " + " | ".join(f"{m:.2f} ± {s:.2f}" for m, s in cells)
                         + f" | {overall[0]:.2f} ± {overall[1]:.2f} |")
        agreement = {how: f"{hit}/{total}" for how, (hit, total) in picks.items()}
        line = ("\nTop-ranked member = best-on-val member (targets x seeds): "
                + ", ".join(f"{how} {value}" for how, value in agreement.items()))
        if hub_picks["probe"][1]:
            line += "; on the hub: " + ", ".join(f"{how} {hit}/{total}" for how, (hit, total) in hub_picks.items())
        lines.append(line + ".\n")
        summary["settings"][setting] = {"rows": rows_out, "score_agreement": agreement}
    seconds = time.perf_counter() - started
    used = [row for row in runs.done.values() if not row["label"].startswith("diagnose:")]
    trained = sum(row["seconds"] for row in used)
    lines.append(f"command: `{command}`; {seconds:.0f} s wall for this invocation; the {len(used)} trainings "
                 f"and rankings behind the tables took {trained:.0f} s in all (sum of their own timings in "
                 f"runs.jsonl, which a resumed run does not redo)")
    summary["seconds"] = round(seconds, 1)
    summary["training_seconds"] = round(trained, 1)
    return "\n".join(lines) + "\n", summary


def diagnose(args, zoo, train, scores, out, started, command):
    variants = args.diagnose or [v for v in DIAGNOSTIC_VARIANTS if not v.startswith("hub")]
    unknown = [v for v in variants if v not in DIAGNOSTIC_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown diagnostic variants {unknown}; known: {list(DIAGNOSTIC_VARIANTS)}")
    targets = args.targets or ["letters", "polygons"]
    sources = {"minizoo": zoo}
    if any(DIAGNOSTIC_VARIANTS[v][0] == "hub-pathway" for v in variants):
        from zootune.minizoo.hub import load_hub

        sources["hub"] = load_hub(cache_dir=args.cache_dir)
    results: dict[str, dict[str, list[float]]] = {}
    for target in targets:
        for seed in args.seeds:
            for key, source in sources.items():
                prefix = "" if key == "minizoo" else "hub: "
                for i, name in enumerate(source.names):
                    # the MiniZoo members' fine-tunes are shared with the main benchmark (same trainings)
                    row = train("minizoo+junk" if key == "minizoo" else key, source, target, seed,
                                f"finetune [{name}]", "finetune", member=i)
                    results.setdefault(f"{prefix}finetune [{name}]", {}).setdefault(target, []).append(
                        (row["val"], row["test"]))
                singles = [(row_val, row_test) for row_val, row_test in
                           (results[f"{prefix}finetune [{n}]"][target][-1] for n in source.names)]
                best = max(range(len(singles)), key=lambda i: singles[i][0])  # first of equals
                results.setdefault(f"{prefix}{BEST}", {}).setdefault(target, []).append(singles[best])
            member_scores = {key: scores(key, source, target, seed, args.score) for key, source in sources.items()}
            for label in variants:
                method, options = DIAGNOSTIC_VARIANTS[label]
                key = "hub" if method == "hub-pathway" else "minizoo"
                options = dict(options)
                start_rank = options.pop("start", False)
                if start_rank:
                    options["start_member"] = rank(member_scores[key])[int(start_rank) - 1]
                if options.pop("scores", False):
                    options["member_scores"] = member_scores[key]
                row = train(key, sources[key], target, seed, f"diagnose: {label}", method, options=options)
                entry = (row["val"], row["test"])
                if "mean_gates" in row and len(row["mean_gates"]) == len(zoo):
                    # the gate of the member fine-tuning validates best, and the others' mean gate
                    best = max(range(len(zoo)), key=lambda i: results[f"finetune [{zoo.names[i]}]"][target][-1][0])
                    others = [g for i, g in enumerate(row["mean_gates"]) if i != best]
                    entry += (row["mean_gates"][best], statistics.fmean(others))
                results.setdefault(label, {}).setdefault(target, []).append(entry)
    pair = ("robust", "robust, 2nd-ranked start")
    if all(label in results for label in pair):
        results[TWO_STARTS] = {target: [max(a, b, key=lambda entry: entry[0])[:2]  # first of equals
                                        for a, b in zip(results[pair[0]][target], results[pair[1]][target])]
                               for target in targets}
    lines = ["| variant | " + " | ".join(f"{t} val / test (gates: best / others)" for t in targets) + " |",
             "|---|" + "---:|" * len(targets)]
    for label, per_target in results.items():
        cells = []
        for t in targets:
            val = statistics.fmean(e[0] for e in per_target[t])
            test = statistics.fmean(e[1] for e in per_target[t])
            cell = f"{val:.1f} / {test:.1f}"
            if all(len(e) == 4 for e in per_target[t]):
                cell += f" ({statistics.fmean(e[2] for e in per_target[t]):.2f} / "
                cell += f"{statistics.fmean(e[3] for e in per_target[t]):.2f})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    seconds = time.perf_counter() - started
    lines.append(f"\ncommand: `{command}`; seeds {args.seeds} (mean over them); {seconds:.0f} s wall")
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_bytes(out / "diagnose.md", text.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
