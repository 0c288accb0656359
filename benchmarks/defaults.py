"""`zootune fit` with no tuning flags on image folders of different kinds, against explicit settings.

Writes the folders once (``--folders``; train/val/test class folders of PNG or JPEG files):

- ``letters``, ``textures``, ``digits8x8``, ``polygons``: the suite's 32-px targets as folders;
- ``photos112``: 112-px JPEG crops of ten scikit-image pictures (which picture a crop is from).

Then runs the real command line, one process per training, and prints per folder and method the test
accuracy (mean over seeds), the seconds, what the defaults chose, and how often the divergence
guard fired. ``finetune`` is run on every member and reported as "best member on val" (the member
with the best validation accuracy, its test accuracy). ``--grid`` also runs fine-tuning of the
member the defaults picked on validation (fine-tuning) or the methods named in ``--grid`` at every
rate of ``GRID_LRS`` x augmentation of ``GRID_AUGMENTS`` with the epochs the defaults chose (choices
compared, not lengths; ``--grid-lrs``/``--grid-augments`` narrow it); the best cell is the oracle
the defaults are held against (best on test, as the issue states it; the best on validation is
printed too). ``--curve`` fine-tunes that member at the chosen rate and augmentation for fractions
of the chosen budget (accuracy against steps: is the budget rule enough?). ``--stability`` runs the
methods at explicit ``--lr 0.1`` and ``0.3`` next to fine-tuning their start member (the member
their ranking put first) at the same rate (``--stability-lrs`` narrows the rates), and counts the
runs more than 3 points below it and the divergence guard's firings. ``--reuse`` keeps a run whose
folder already holds its metrics.

    python benchmarks/defaults.py --folders letters textures photos112 --seeds 0
    python benchmarks/defaults.py --folders letters --seeds 0 --grid finetune --curve --stability --reuse
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FOLDERS = ("letters", "textures", "digits8x8", "polygons", "photos112")
PHOTO_SIZE = 112
GRID_LRS = ("0.003", "0.01", "0.03", "0.1")
GRID_AUGMENTS = ("none", "light", "paper")
STABILITY_LRS = ("0.1", "0.3")
CURVE_FRACTIONS = (0.25, 0.5, 1.0, 2.0)
BATCH_SIZE = 48  # zootune fit's default, for the steps of the curve


def _write_split(root: Path, images: np.ndarray, labels: np.ndarray, names, suffix: str) -> None:
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}{suffix}", quality=90)


def write_folder(name: str, root: Path) -> Path:
    """The folder ``name`` under ``root`` (written once)."""
    out = root / name
    if (out / "test").is_dir():
        return out
    if name == "photos112":
        from zootune.suite import bundled

        names = bundled.TEXTURE_TARGET_IMAGES
        regions = {"train": (0.0, 0.6), "val": (0.6, 1.0), "test": (0.6, 1.0)}
        counts = {"train": 40, "val": 15, "test": 30}
        for k, split in enumerate(("train", "val", "test")):
            rng = np.random.default_rng(100 + k)
            images = [bundled.random_crops(bundled.skimage_image(n), counts[split], rng, side_range=(64, 150),
                                           size=PHOTO_SIZE, column_range=regions[split]) for n in names]
            labels = np.repeat(np.arange(len(names)), counts[split])
            _write_split(out / split, np.concatenate(images), labels, names, ".jpg")
        return out
    from zootune.suite.targets import SPLITS, TARGETS, EXTRA_TARGETS, _cached_arrays

    spec = TARGETS.get(name) or EXTRA_TARGETS[name]
    arrays = _cached_arrays(spec, 0, None)
    for split in SPLITS:
        images, labels = arrays[split]
        if images.ndim == 3:
            images = np.repeat(images[..., None], 3, axis=-1)
        _write_split(out / split, images, labels, spec.class_names, ".png")
    return out


REUSE = False  # --reuse: a run whose folder holds its metrics (and this script's record) is not run again


def fit(folder: Path, zoo: list[str], out: Path, method: str, seed: int, *extra: str) -> dict:
    """One `zootune fit` in its own process: test accuracy, seconds, choices, guard firings."""
    argv = [sys.executable, "-m", "zootune", "fit", "--arch", "minizoo_resnet10_w8", "--zoo", *zoo,
            "--data", str(folder), "--method", method, "--seed", str(seed), "--no-progress",
            "--out", str(out), "--overwrite", *extra]
    record = out.parent / f"{out.name}.bench.json"
    if REUSE and record.is_file() and (out / "model" / "metrics.json").is_file():
        return json.loads(record.read_text())
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or ["?"]}
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    options = json.loads((out / "model" / "config.json").read_text()).get("options") or {}
    result = {"test": metrics["test"]["acc"], "val": metrics["val"]["acc"], "wall": time.perf_counter() - started,
              "chosen": metrics.get("chosen", {}), "guard": done.stderr.count("divergence guard:"),
              "start": start_member(options)}
    record.write_text(json.dumps(result))
    return result


def start_member(options: dict) -> int | None:
    """The member a ranked method started from: its recorded start, else the best-ranked member."""
    if options.get("start_member") is not None:
        return int(options["start_member"])
    scores = options.get("member_scores")
    return int(np.argmax(scores)) if scores else None


def best_member(runs: list[dict]) -> dict:
    ok = [r for r in runs if "test" in r]
    for m, run in enumerate(runs):
        run.setdefault("member", m)
    best = max(ok, key=lambda r: r["val"])
    return {**best, "wall": sum(r["wall"] for r in ok), "one_wall": sum(r["wall"] for r in ok) / len(ok),
            "guard": sum(r["guard"] for r in ok)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folders", nargs="+", default=list(FOLDERS), choices=FOLDERS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--methods", nargs="+", default=["finetune", "zoo-tuning", "lite"])
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags given to every fit")
    p.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "zootune-defaults-bench"))
    p.add_argument("--json", help="write every run's numbers here")
    p.add_argument("--grid", nargs="*", default=[], help="methods to run on the lr x augmentation grid")
    p.add_argument("--grid-lrs", nargs="+", default=list(GRID_LRS))
    p.add_argument("--grid-augments", nargs="+", default=list(GRID_AUGMENTS))
    p.add_argument("--curve", action="store_true", help="fine-tuning's accuracy against the number of steps")
    p.add_argument("--stability", action="store_true", help="explicit --lr 0.1 and 0.3 against the start member")
    p.add_argument("--stability-lrs", nargs="+", default=list(STABILITY_LRS), help="narrow --stability's rates")
    p.add_argument("--reuse", action="store_true", help="keep runs already in --work")
    args = p.parse_args(argv)
    global REUSE
    REUSE = args.reuse
    from zootune.minizoo import minizoo_dir
    from zootune.minizoo.members import MEMBERS

    zoo = [str(minizoo_dir() / f"{m.name}.safetensors") for m in MEMBERS]
    work = Path(args.work)
    results: dict = {}
    for name in args.folders:
        folder = write_folder(name, work / "folders")
        for seed in args.seeds:
            for method in args.methods:
                key = f"{name}/{method}/{seed}"
                if method == "finetune":
                    runs = [fit(folder, zoo, work / "runs" / f"{key}-{m}", method, seed, "--member", str(m),
                                *args.extra) for m in range(len(zoo))]
                    for m, run in enumerate(runs):
                        run["member"] = m
                    results[key] = best_member(runs)
                else:
                    results[key] = fit(folder, zoo, work / "runs" / key, method, seed, *args.extra)
                print(key, json.dumps(results[key]), flush=True)
            extras = _extra_runs(args, folder, zoo, work / "runs" / name / str(seed), results, f"{name}/%s/{seed}")
            results.update(extras)
    _print_table(results, args.folders, args.methods, args.seeds)
    _print_extras(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _print_table(results: dict, folders, methods, seeds) -> None:
    others = [m for m in methods if m != "finetune"]
    print("\n| folder | " + " | ".join(methods) + " | chosen (seed %d) | " % seeds[0]
          + " | ".join(f"wall {m} / one fine-tune" for m in others) + " |")
    print("|---|" + "---:|" * len(methods) + "---|" + "---:|" * len(others))
    for name in folders:
        cells = []
        for method in methods:
            runs = [results.get(f"{name}/{method}/{s}", {}) for s in seeds]
            tests = [r["test"] for r in runs if "test" in r]
            cells.append(f"{np.mean(tests):.2f}" if tests else "error")
        first = results.get(f"{name}/finetune/{seeds[0]}", {})
        chosen = first.get("chosen", {})
        shown = ", ".join(f"{k} {v}" for k, v in chosen.items() if k != "lr_probe")
        ratios = [results.get(f"{name}/{m}/{seeds[0]}", {}).get("wall", float("nan")) / first.get("one_wall", float("nan"))
                  if first else float("nan") for m in others]
        print(f"| {name} | " + " | ".join(cells) + f" | {shown} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")


def _extra_runs(args, folder: Path, zoo: list[str], runs: Path, results: dict, key: str) -> dict:
    """The grid, the curve and the stability runs of one folder and seed (keys ``<folder>/<what>/<seed>``)."""
    out, seed = {}, int(key.rsplit("/", 1)[1])
    default_ft = results.get(key % "finetune", {})
    member = ["--member", str(default_ft["member"])] if "member" in default_ft else []
    epochs = str(default_ft.get("chosen", {}).get("epochs", ""))
    for method in args.grid:
        for lr in args.grid_lrs:
            for augment in args.grid_augments:
                extra = ["--lr", lr, "--augment", augment, "--epochs", epochs] + (member if method == "finetune" else [])
                out[key % f"grid-{method}-lr{lr}-{augment}"] = fit(folder, zoo, runs / f"grid-{method}-{lr}-{augment}",
                                                                   method, seed, *extra)
    if args.curve and epochs:
        chosen = default_ft["chosen"]
        for fraction in CURVE_FRACTIONS:
            budget = str(max(1, round(fraction * int(epochs))))
            out[key % f"curve-{fraction}"] = fit(folder, zoo, runs / f"curve-{fraction}", "finetune", seed, *member,
                                                 "--lr", str(chosen["lr"]), "--augment", chosen["augment"],
                                                 "--epochs", budget)
    if args.stability:
        for lr in args.stability_lrs:
            for method in [m for m in args.methods if m != "finetune"]:
                run = out[key % f"stab-{method}-{lr}"] = fit(folder, zoo, runs / f"stab-{method}-{lr}", method, seed,
                                                            "--lr", lr)
                if run.get("start") is not None and key % f"stab-finetune{run['start']}-{lr}" not in out:
                    out[key % f"stab-finetune{run['start']}-{lr}"] = fit(
                        folder, zoo, runs / f"stab-finetune{run['start']}-{lr}", "finetune", seed,
                        "--member", str(run["start"]), "--lr", lr)
    for name, run in out.items():
        print(name, json.dumps(run), flush=True)
    return out


def _print_extras(results: dict, args) -> None:
    """The grid's best cell against the defaults, the curve, and the stability counts."""
    for name in args.folders:
        for seed in args.seeds:
            key = f"{name}/%s/{seed}"
            for method in args.grid:
                cells = {k: r for k, r in results.items() if k.startswith(f"{name}/grid-{method}-") and
                         k.endswith(f"/{seed}") and "test" in r}
                if not cells:
                    continue
                oracle = max(cells, key=lambda k: cells[k]["test"])
                on_val = max(cells, key=lambda k: cells[k]["val"])
                default = results.get(key % method, {}).get("test", float("nan"))
                print(f"grid {name} seed {seed} {method}: defaults {default:.2f}; best cell on test "
                      f"{oracle.split('/')[1]} {cells[oracle]['test']:.2f} (defaults - best = "
                      f"{default - cells[oracle]['test']:+.2f}); best on val {on_val.split('/')[1]} "
                      f"{cells[on_val]['test']:.2f}")
            curve = [(f, results[key % f"curve-{f}"]) for f in CURVE_FRACTIONS if "test" in results.get(key % f"curve-{f}", {})]
            if curve:
                print(f"curve {name} seed {seed} (fine-tuning, fraction of the default budget: test acc): "
                      + ", ".join(f"{f:g}x {r['test']:.2f}" for f, r in curve))
            _print_stability(results, name, seed, args)


def _print_stability(results: dict, name: str, seed: int, args) -> None:
    for lr in args.stability_lrs if args.stability else ():
        for method in [m for m in args.methods if m != "finetune"]:
            run = results.get(f"{name}/stab-{method}-{lr}/{seed}", {})
            start = results.get(f"{name}/stab-finetune{run.get('start')}-{lr}/{seed}", {})
            if "test" not in run or "test" not in start:
                continue
            below = start["test"] - run["test"] > 3
            print(f"stability {name} seed {seed} lr {lr} {method}: {run['test']:.2f} vs fine-tuning its start "
                  f"member {run['start']} {start['test']:.2f}{' (more than 3 points below)' if below else ''}; "
                  f"guard fired {run['guard']} / {start['guard']} times")


if __name__ == "__main__":
    main()
