"""`zootune fit` with no tuning flags on image folders of different kinds, against explicit settings.

Writes the folders once (``--folders``; train/val/test class folders of PNG or JPEG files):

- ``letters``, ``textures``, ``digits8x8``, ``polygons``: the suite's 32-px targets as folders;
- ``photos112``: 112-px JPEG crops of ten scikit-image pictures (which picture a crop is from).

Then runs the real command line, one process per training, and prints per folder and method the test
accuracy (mean over seeds), the seconds, what the defaults chose, and how often the divergence
guard fired. ``finetune`` is run on every member and reported as "best member on val" (the member
with the best validation accuracy, its test accuracy). ``--grid`` also runs fine-tuning of the
members and the methods at explicit rates and augmentations with the epochs the defaults chose
(choices compared, not lengths); ``--stability`` runs Zoo-Tuning and Lite at explicit --lr 0.1 and
0.3 next to fine-tuning their start member at the same rate.

    python benchmarks/defaults.py --folders letters textures photos112 --seeds 0
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


def fit(folder: Path, zoo: list[str], out: Path, method: str, seed: int, *extra: str) -> dict:
    """One `zootune fit` in its own process: test accuracy, seconds, choices, guard firings."""
    argv = [sys.executable, "-m", "zootune", "fit", "--arch", "minizoo_resnet10_w8", "--zoo", *zoo,
            "--data", str(folder), "--method", method, "--seed", str(seed), "--no-progress",
            "--out", str(out), "--overwrite", *extra]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or ["?"]}
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    return {"test": metrics["test"]["acc"], "val": metrics["val"]["acc"], "wall": time.perf_counter() - started,
            "chosen": metrics.get("chosen", {}), "guard": done.stderr.count("divergence guard:")}


def best_member(runs: list[dict]) -> dict:
    ok = [r for r in runs if "test" in r]
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
    args = p.parse_args(argv)
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
                    results[key] = best_member(runs)
                else:
                    results[key] = fit(folder, zoo, work / "runs" / key, method, seed, *args.extra)
                print(key, json.dumps(results[key]), flush=True)
    _print_table(results, args.folders, args.methods, args.seeds)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _print_table(results: dict, folders, methods, seeds) -> None:
    print("\n| folder | " + " | ".join(methods) + " | chosen (seed %d) | wall ZT / one fine-tune |" % seeds[0])
    print("|---|" + "---:|" * len(methods) + "---|---:|")
    for name in folders:
        cells = []
        for method in methods:
            runs = [results.get(f"{name}/{method}/{s}", {}) for s in seeds]
            tests = [r["test"] for r in runs if "test" in r]
            cells.append(f"{np.mean(tests):.2f}" if tests else "error")
        first = results.get(f"{name}/finetune/{seeds[0]}", {})
        zt = results.get(f"{name}/zoo-tuning/{seeds[0]}", {})
        chosen = first.get("chosen", {})
        shown = ", ".join(f"{k} {v}" for k, v in chosen.items() if k != "lr_probe")
        ratio = zt.get("wall", float("nan")) / first.get("one_wall", float("nan")) if first else float("nan")
        print(f"| {name} | " + " | ".join(cells) + f" | {shown} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
