"""Speed of the image-folder pipeline (a script, not a test): what the default number of DataLoader
workers should be, and whether small folders got slower than the old in-memory loader.

``pipeline``: images/s of iterating a training split (decode, random-resized crop, flip, normalise,
collate) with 0, 1 and 2 workers, alone and with a training step of a model after every batch, for
a 32-px folder (2,000 PNGs of 32x32, resnet_small width 8, batch 64, ``--batches`` batches: one
epoch by default; streamed and RAM-cached) and a 224-px folder (JPEGs of 256-320 px, ResNet-50, batch
8, ``--batches-224`` batches; streamed). A new DataLoader per measurement, as the engine makes one
per epoch, so worker start-up is included. Settings are interleaved and repeated; the median is
printed.

``fit32``: wall time of ``zootune fit`` (finetune of one random resnet_small member, 3 epochs, batch
64, --image-size 32) on a 2,000-image 32-px folder, once with this tree's ``src`` and once with
another tree's (``--compare-src``, e.g. the main checkout before the streaming loader), alternated,
each in a fresh process with OMP_NUM_THREADS=1; the medians of ``--repeats`` (wall, training seconds
printed by fit, CPU seconds: the least sensitive to other load) and the ratios are printed.

``--malloc-mmap-threshold BYTES`` runs both trees with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed: the
old loader happened to free a large temporary, which raises glibc's dynamic mmap threshold, so the
model's activations were then served from the heap; the streaming loader frees none, and every
activation above 128 KiB is mmapped and page-faulted in at every step (dev note).

Usage: python benchmarks/folder_speed.py pipeline [--repeats 3] [--batches 25] [--batches-224 5] [--threads 1]
       python benchmarks/folder_speed.py fit32 --compare-src /path/to/other/src [--repeats 3]
                                         [--malloc-mmap-threshold 33554432]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from folder_memory import jpeg_pool, make_folder  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"


def write_small_folder(root: Path, classes: int = 10, per_class: int = 200, seed: int = 0) -> Path:
    """MiniZoo-style 32x32 PNGs: a smooth random colour field per image, a class-dependent tint."""
    if (root / ".complete").is_file():
        return root
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        tint = rng.integers(0, 256, 3)
        for i in range(per_class):
            coarse = rng.integers(0, 256, (4, 4, 3)).astype(np.float64) * 0.6 + tint * 0.4
            image = Image.fromarray(coarse.astype(np.uint8)).resize((32, 32), Image.BICUBIC)
            image.save(root / f"class{c}" / f"{i}.png")
    (root / ".complete").write_text("")
    return root


def pipeline(args) -> None:
    import torch
    from torch.utils.data import DataLoader

    from zootune.data import load_image_folder
    from zootune.engine.sampler import GlobalBatchSampler
    from zootune.models import resnet50, resnet_small

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    small = write_small_folder(workdir / "small32")
    pool = jpeg_pool(workdir, 200 + 20)
    large = make_folder(workdir, pool, 200)
    cases = {
        "32 px cached": (small, 32, None, 64, lambda: resnet_small(num_classes=10, depth=10, width=8)),
        "32 px streamed": (small, 32, 0, 64, lambda: resnet_small(num_classes=10, depth=10, width=8)),
        "224 px streamed": (large, 224, 0, 8, lambda: resnet50(num_classes=10)),
    }
    print(f"torch threads {torch.get_num_threads()}, usable CPUs {len(os.sched_getaffinity(0))}, "
          f"load average {os.getloadavg()[0]:.1f}")
    results: dict = {}
    for name, (folder, size, budget, batch, build) in cases.items():
        train = load_image_folder(folder, image_size=size, cache_budget=budget).train
        model = build()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        batches = args.batches if size <= 32 else args.batches_224

        def run(workers: int, with_model: bool) -> float:
            sampler = GlobalBatchSampler(len(train), batch, seed=0, max_batches=batches, sample_seeds=True)
            loader = DataLoader(train, batch_sampler=sampler, num_workers=workers)
            started = time.perf_counter()
            seen = 0
            for x, y in loader:
                if with_model:
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                seen += len(y)
            return seen / (time.perf_counter() - started)

        for _ in range(args.repeats):
            for with_model in (False, True):
                for workers in (0, 1, 2):
                    results.setdefault((name, with_model, workers), []).append(run(workers, with_model))
        print(f"  {name} done", flush=True)
    print("\n| folder | measured | 0 workers | 1 worker | 2 workers | images/s (median) |")
    print("|---|---|---:|---:|---:|---|")
    for name in cases:
        for with_model in (False, True):
            cells = [statistics.median(results[(name, with_model, w)]) for w in (0, 1, 2)]
            what = "data + training step" if with_model else "data pipeline alone"
            print(f"| {name} | {what} | " + " | ".join(f"{c:.0f}" for c in cells) + " | |")


def _fit_once(src: Path, folder: Path, zoo: Path, out: Path, extra_env: dict) -> tuple[float, float, float]:
    """(wall seconds, training seconds printed by fit, CPU seconds of the process and its children)."""
    command = [sys.executable, "-m", "zootune", "fit", "--arch", "resnet10_small",
               "--arch-option", "width=8", "--zoo", str(zoo), "--data", str(folder), "--method", "finetune",
               "--epochs", "3", "--batch-size", "64", "--image-size", "32", "--no-progress", "--out", str(out)]
    # one intra-op thread: on a shared 2-core machine a second one mostly waits (see tests/conftest.py)
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", **extra_env)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"fit failed with {src}:\n{done.stderr}")
    train_seconds = float(re.search(r"\(([\d.]+) s\)", done.stdout).group(1))
    return wall, train_seconds, cpu


def fit32(args) -> None:
    import torch

    from zootune.models import resnet_small

    workdir = Path(args.workdir)
    folder = write_small_folder(workdir / "small32")
    zoo = workdir / "resnet_small_random.pth"
    torch.manual_seed(0)
    torch.save(resnet_small(depth=10, width=8).state_dict(), zoo)
    trees = {"this tree": SRC, "compared": Path(args.compare_src).resolve()}
    # glibc raises its mmap threshold (up to 32 MiB) after freeing a large block; a process that never
    # frees one gets every activation above 128 KiB from mmap and page-faults it in at every step.
    extra_env = {"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)} if args.malloc_mmap_threshold else {}
    print(f"extra environment: {extra_env or 'none'}")
    times: dict = {name: [] for name in trees}
    for repeat in range(args.repeats):
        for name, src in trees.items():
            out = workdir / "fit_out"
            shutil.rmtree(out, ignore_errors=True)
            times[name].append(_fit_once(src, folder, zoo, out, extra_env))
            wall, train, cpu = times[name][-1]
            print(f"  {name} run {repeat + 1}: {wall:.1f} s wall, {train:.1f} s training, {cpu:.1f} s CPU", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f}")
    print("| tree | wall s (median) | training s (median) | CPU s (median) |")
    print("|---|---:|---:|---:|")
    medians = {}
    for name, src in trees.items():
        medians[name] = [statistics.median(t[k] for t in times[name]) for k in range(3)]
        print(f"| {name} ({src}) | " + " | ".join(f"{m:.1f}" for m in medians[name]) + " |")
    ratios = [a / b for a, b in zip(medians["this tree"], medians["compared"])]
    print(f"\nthis tree / compared: wall {ratios[0]:.2f}, training {ratios[1]:.2f}, CPU {ratios[2]:.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("pipeline", "fit32"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=25, help="batches per measurement at 32 px (25: one epoch of 1,600)")
    parser.add_argument("--batches-224", type=int, default=5, help="batches per measurement at 224 px")
    parser.add_argument("--threads", type=int, default=1,
                        help="pipeline: torch intra-op threads of the main process (1: a second one mostly waits on a "
                             "shared 2-core machine)")
    parser.add_argument("--compare-src", help="fit32: the other tree's src folder")
    parser.add_argument("--malloc-mmap-threshold", type=int,
                        help="fit32: set MALLOC_MMAP_THRESHOLD_ (bytes) for both trees' processes")
    parser.add_argument("--workdir", help="where images are written (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    temporary = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="zootune-folder-speed-")
    try:
        if args.mode == "pipeline":
            pipeline(args)
        else:
            if not args.compare_src:
                parser.error("fit32 needs --compare-src")
            fit32(args)
    finally:
        if temporary:
            shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
