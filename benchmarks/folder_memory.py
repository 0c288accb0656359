"""Peak memory of ``zootune fit`` on image folders of 1k, 4k and 8k JPEGs (a script, not a test).

Issue 13's memory benchmark: memory must not grow with the number of images. It generates (seeded)
JPEGs of random sizes 256-320 px in 10 classes -- one pool of the largest count, each folder a set of
hard links to the first N of them, in ``train/``, plus a fixed ``val/`` of 20 images -- and a zoo of
3 randomly initialised ResNet-50s saved as checkpoint files (``torch.save`` of the state_dict), then
runs ``zootune fit`` once per folder size, each in a fresh process: ``--image-size 224``, batch 8,
``--max-steps-per-epoch`` steps of one epoch (the point is memory, not accuracy), ``--method
finetune`` by default.

While each process runs, the tree it heads (the fit process and its DataLoader workers) is sampled
every 50 ms from /proc: the sum of RSS (resident pages; pages shared between the process and its
forked workers counted once per process) and the sum of PSS (each shared page divided among the
processes sharing it: what the tree really occupies). The peaks are printed per size with the ratios
to the smallest size. Acceptance (issue 13): peak at 8k within 15 % of the peak at 1k.

``--cache-budget`` is passed to ``zootune fit`` for every size (MiB; omit it for fit's default, under
which a folder whose decoded images fit the budget is cached in RAM -- a bounded, one-off amount).

``--src`` runs another source tree's ``zootune`` (e.g. the checkout before streaming, whose loader
held every image as float32: compare with small ``--sizes`` only, it needs ~0.6 GB per 1,000 images).

Usage: python benchmarks/folder_memory.py [--sizes 1000,4000,8000] [--steps 2] [--workdir DIR]
          [--method finetune] [--cache-budget MIB] [--workers N] [--repeats 1] [--src DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 10
VAL_PER_CLASS = 2


def write_jpeg(path: Path, rng: np.random.Generator) -> None:
    """A photo-like JPEG of random size 256-320 px: a smooth random colour field (low-resolution
    noise upsampled) with fine noise on top, so it compresses and decodes like a photograph."""
    width, height = (int(v) for v in rng.integers(256, 321, size=2))
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    noisy = field + rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def jpeg_pool(workdir: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` generated JPEGs under ``workdir/pool`` (reused when already complete)."""
    pool = workdir / "pool"
    done = pool / f".complete-{count}-{seed}"
    paths = [pool / f"{i:05d}.jpg" for i in range(count)]
    if done.is_file():
        return paths
    pool.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for path in paths:
        write_jpeg(path, rng)
    done.write_text("")
    return paths


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copyfile(source, target)


def make_folder(workdir: Path, pool: list[Path], n_train: int) -> Path:
    """``workdir/folder_<n>``: train/ holds the first ``n_train`` pool images, val/ the last 20."""
    root = workdir / f"folder_{n_train}"
    if root.is_dir():
        return root
    val = pool[-CLASSES * VAL_PER_CLASS:]
    for i, source in enumerate(pool[:n_train]):
        _link(source, root / "train" / f"class{i % CLASSES}" / source.name)
    for i, source in enumerate(val):
        _link(source, root / "val" / f"class{i % CLASSES}" / source.name)
    return root


def make_zoo(workdir: Path, members: int = 3) -> list[Path]:
    """``members`` randomly initialised ResNet-50 state_dicts saved with ``torch.save``."""
    import torch

    from zootune.models import resnet50

    paths = [workdir / f"resnet50_random_{i}.pth" for i in range(members)]
    for i, path in enumerate(paths):
        if not path.is_file():
            torch.manual_seed(i)
            torch.save(resnet50().state_dict(), path)
    return paths


def _children(pid: int) -> list[int]:
    found = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def _tree(pid: int) -> list[int]:
    pids, queue = [], [pid]
    while queue:
        p = queue.pop()
        pids.append(p)
        queue += _children(p)
    return pids


def _rss_pss_kib(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


class TreeMemoryPeak:
    """Samples a process tree's summed RSS and PSS every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = 0
        self.max_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = _tree(self.pid)
            sums = [_rss_pss_kib(p) for p in pids]
            self.peak_rss = max(self.peak_rss, sum(r for r, _ in sums))
            self.peak_pss = max(self.peak_pss, sum(p for _, p in sums))
            self.max_processes = max(self.max_processes, len(pids))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_fit(folder: Path, zoo: list[Path], out: Path, args) -> dict:
    command = [
        sys.executable, "-m", "zootune", "fit", "--arch", "resnet50", "--zoo", *map(str, zoo),
        "--data", str(folder), "--method", args.method, "--image-size", "224", "--batch-size", "8",
        "--epochs", "1", "--max-steps-per-epoch", str(args.steps), "--no-progress", "--out", str(out),
    ]
    if args.cache_budget is not None:
        command += ["--cache-budget", str(args.cache_budget)]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    env = dict(os.environ, PYTHONPATH=str(Path(args.src).resolve())) if args.src else None
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    monitor = TreeMemoryPeak(process.pid)
    output, _ = process.communicate()
    monitor.stop()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"zootune fit failed ({process.returncode}) on {folder}:\n{output}")
    return {
        "peak_rss_mib": monitor.peak_rss / 1024,
        "peak_pss_mib": monitor.peak_pss / 1024,
        "processes": monitor.max_processes,
        "seconds": seconds,
        "command": " ".join(command),
        "output": output.strip().splitlines()[-1] if output.strip() else "",
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,4000,8000", help="training images per folder")
    parser.add_argument("--steps", type=int, default=2, help="optimisation steps (--max-steps-per-epoch)")
    parser.add_argument("--method", default="finetune",
                        help="method trained (default finetune: the zoo is loaded whole, the step is one ResNet-50's; "
                             "zoo-tuning takes ~4x longer here, mostly its formulation autotuner)")
    parser.add_argument("--cache-budget", type=float, help="MiB, passed to zootune fit (default: fit's default)")
    parser.add_argument("--workers", help="passed to zootune fit (default: fit's default, 'auto')")
    parser.add_argument("--workdir", help="where the images and the zoo are written (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep a temporary workdir")
    parser.add_argument("--repeats", type=int, default=1, help="runs per size; the median peak is reported")
    parser.add_argument("--src", help="run zootune from this source tree (PYTHONPATH), e.g. an older checkout's src")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="zootune-folder-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        pool = jpeg_pool(workdir, max(sizes) + CLASSES * VAL_PER_CLASS)
        folders = {n: make_folder(workdir, pool, n) for n in sizes}
        zoo = make_zoo(workdir)
        print(f"{len(pool)} JPEGs and a zoo of {len(zoo)} ResNet-50 checkpoints in {workdir} "
              f"({time.perf_counter() - t0:.0f} s)")
        runs: dict = {n: [] for n in sizes}
        for _ in range(args.repeats):  # sizes interleaved, so a change in the machine's load hits all
            for n in sizes:
                out = workdir / f"out_{n}"
                shutil.rmtree(out, ignore_errors=True)
                run = run_fit(folders[n], zoo, out, args)
                runs[n].append(run)
                print(f"  {n} images: peak RSS {run['peak_rss_mib']:.0f} MiB, PSS {run['peak_pss_mib']:.0f} MiB, "
                      f"{run['processes']} process(es), {run['seconds']:.0f} s", flush=True)
        rows = {}
        for n in sizes:
            rows[n] = dict(runs[n][0])
            for key in ("peak_rss_mib", "peak_pss_mib", "seconds"):
                rows[n][key] = statistics.median(r[key] for r in runs[n])
        print(f"\ncommand (last): {rows[sizes[-1]]['command']}")
        first = sizes[0]
        print(f"\n| train images | peak RSS (MiB, summed over the process tree) | peak PSS (MiB) | processes | "
              f"seconds | PSS / PSS at {first} |")
        print("|---:|---:|---:|---:|---:|---:|")
        for n in sizes:
            r = rows[n]
            print(f"| {n} | {r['peak_rss_mib']:.0f} | {r['peak_pss_mib']:.0f} | {r['processes']} | {r['seconds']:.0f} | "
                  f"{r['peak_pss_mib'] / rows[first]['peak_pss_mib']:.3f} |")
        last = sizes[-1]
        ratio_pss = rows[last]["peak_pss_mib"] / rows[first]["peak_pss_mib"]
        ratio_rss = rows[last]["peak_rss_mib"] / rows[first]["peak_rss_mib"]
        verdict = "within" if abs(ratio_pss - 1) <= 0.15 else "NOT within"
        print(f"\n{last}/{first} peak ratio: PSS {ratio_pss:.3f}, RSS {ratio_rss:.3f} ({verdict} 15 % by PSS)")
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
