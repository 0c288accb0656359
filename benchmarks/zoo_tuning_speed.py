"""Speed of Zoo-Tuning / Lite Zoo-Tuning relative to one plain model (a script, not a test).

For each setting (ResNet-50 at 112² and 224², batch 16; resnet_small at 32², batch 64; m = 5 sources
with random weights: speed does not depend on the values) it measures, interleaved and repeated
(median reported):

- training step (forward, cross-entropy, backward, SGD step) of full Zoo-Tuning and of Lite,
  divided by the plain model's training step;
- inference (no_grad forward in eval) of full Zoo-Tuning, of Lite before folding and of the folded
  Lite model, divided by the plain model's;
- forward FLOPs ratios (zootune.cost.count_flops, fewest-FLOPs formulation: training-time model in
  train mode; inference model);
- peak memory of a training step: the growth of ru_maxrss (peak resident set) over one training step,
  measured in a fresh subprocess per model so peaks do not mix (tracemalloc does not see torch's
  allocations); ``--no-memory`` skips it;
- a per-formulation table from ``zootune.tune`` (run once per model before timing): each layer's
  choice and every timed alternative (training: forward + backward).

Usage: python benchmarks/zoo_tuning_speed.py [--sizes 112,224,32] [--repeats 5] [--quick]
          [--threads 2] [--align kernel>1|all|none]
"""

from __future__ import annotations

import argparse
import copy
import json
import gc
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

from zootune.layers import AggregatedLayer
from zootune.layers.autotune import tune
from zootune.methods.zoo_tuning import ZooTuning
from zootune.models import resnet50, resnet_small
from zootune.models.heads import new_linear_head, replace_head

NUM_SOURCES = 5
NUM_CLASSES = 10


def setting(size: int) -> tuple[callable, int]:
    """(architecture builder, batch size) for an input size (32 -> resnet_small)."""
    if size <= 32:
        return (lambda: resnet_small(num_classes=NUM_CLASSES, depth=18, width=16)), 64
    return (lambda: resnet50(num_classes=NUM_CLASSES)), 16


def build_models(size: int, align: str, which=("plain", "full", "lite", "folded")) -> dict:
    builder, _ = setting(size)
    torch.manual_seed(0)
    zoo = [builder() for _ in range(NUM_SOURCES)]
    models = {}
    if "plain" in which:
        plain = copy.deepcopy(zoo[0])
        replace_head(plain, new_linear_head(plain.fc.in_features, NUM_CLASSES))
        models["plain"] = plain
    if "full" in which:
        models["full"] = ZooTuning(zoo, num_outputs=NUM_CLASSES, align=align)
    if "lite" in which or "folded" in which:
        lite = ZooTuning(zoo, num_outputs=NUM_CLASSES, align=align, lite=True)
        if "lite" in which:
            models["lite"] = lite
        if "folded" in which:
            models["folded"] = lite.merge_and_unload()
    return models


def make_step(model, batch):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, y = batch

    def step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def make_infer(model, x):
    def infer():
        model.eval()
        with torch.no_grad():
            model(x)

    return infer


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def flops(model, x, train: bool) -> int | None:
    """Forward FLOPs, with every aggregation layer on its fewest-FLOPs formulation (per-sample
    kernels; Lite: the shared kernel), as the paper counts them; the autotuner may pick a
    formulation with more FLOPs where it runs faster."""
    try:
        from zootune.cost import count_flops
    except ImportError:
        return None
    layers = [m for m in model.modules() if isinstance(m, AggregatedLayer)]
    saved = [layer.formulation for layer in layers]
    for layer in layers:
        layer.formulation = "grouped"  # runs as bmm where that applies; Lite: the shared kernel
    try:
        return count_flops(model, x, backward=False, train_mode=train)
    finally:
        for layer, name in zip(layers, saved):
            layer.formulation = name


def memory_probe(size: int, name: str, align: str) -> None:
    """Subprocess entry: print the ru_maxrss growth (MiB) over one training step of one model."""
    models = build_models(size, align, which=(name if name != "folded" else "folded",))
    model = models[name]
    _, batch = setting(size)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, NUM_CLASSES, (batch,))
    tune(model, x)
    step = make_step(model, (x, y))
    # ru_maxrss is a high-water mark, and building the m source models already set it higher than a
    # step reaches, so sample the *current* RSS during the step instead. One warm-up step first: the
    # autotuner's one-time measurements are not the steady-state peak.
    step()
    gc.collect()
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    before, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    step()
    done.set()
    sampler.join()
    print(json.dumps({"peak_growth_mib": (max(peak[0], rss()) - before) / 2**20}))


def peak_memory(size: int, name: str, align: str, threads: int) -> float | None:
    command = [sys.executable, __file__, "--memory-probe", f"{size}:{name}", "--align", align,
               "--threads", str(threads)]
    # A fixed mmap threshold makes glibc map every large tensor on its own and unmap it when freed,
    # so RSS follows live memory; otherwise freed heap is kept and the growth depends on fragmentation
    # (measured: two identical architectures differed by 90 MiB without it, 0 with it).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_growth_mib"]


def run_setting(size: int, repeats: int, align: str, memory: bool, threads: int) -> dict:
    _, batch_size = setting(size)
    models = build_models(size, align)
    torch.manual_seed(1)
    x = torch.randn(batch_size, 3, size, size)
    y = torch.randint(0, NUM_CLASSES, (batch_size,))
    reports = {name: tune(models[name], x) for name in ("full", "lite")}  # the explicit tuning step
    train = {name: make_step(models[name], (x, y)) for name in ("plain", "full", "lite")}
    infer = {name: make_infer(models[name], x) for name in ("plain", "full", "lite", "folded")}
    for fn in (*train.values(), *infer.values()):  # warm-up
        fn()
    times = {f"train/{n}": [] for n in train} | {f"infer/{n}": [] for n in infer}
    for _ in range(repeats):  # interleaved so that load changes hit every model alike
        for name, fn in train.items():
            times[f"train/{name}"].append(timed(fn))
        for name, fn in infer.items():
            times[f"infer/{name}"].append(timed(fn))
    median = {key: statistics.median(values) for key, values in times.items()}
    result = {"size": size, "batch": batch_size, "median_s": median, "tune_reports": reports}
    result["ratios"] = {
        "train full / plain": median["train/full"] / median["train/plain"],
        "train lite / plain": median["train/lite"] / median["train/plain"],
        "infer full / plain": median["infer/full"] / median["infer/plain"],
        "infer lite (unfolded) / plain": median["infer/lite"] / median["infer/plain"],
        "infer folded lite / plain": median["infer/folded"] / median["infer/plain"],
    }
    plain_train, plain_infer = flops(models["plain"], x, True), flops(models["plain"], x, False)
    if plain_train:
        result["flops_ratios"] = {
            "train-forward full / plain": flops(models["full"], x, True) / plain_train,
            "train-forward lite / plain": flops(models["lite"], x, True) / plain_train,
            "infer full / plain": flops(models["full"], x, False) / plain_infer,
            "infer folded lite / plain": flops(models["folded"], x, False) / plain_infer,
        }
    if memory:
        result["peak_growth_mib"] = {name: peak_memory(size, name, align, threads)
                                     for name in ("plain", "full", "lite", "folded")}
    return result


def formulation_table(reports: dict, limit: int) -> list[str]:
    rows = []
    for model_name, report in reports.items():
        for layer, per_phase in report.items():
            for phase, choice in per_phase.items():
                if not choice.seconds:
                    continue
                alternatives = ", ".join(f"{n} {t * 1e3:.1f}" for n, t in sorted(choice.seconds.items(), key=lambda kv: kv[1]))
                rows.append(f"  {model_name:<4} {layer:<28} {phase:<5}: chose {choice.chosen}; ms: {alternatives}")
    return rows[:limit]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="112,224,32", help="input sizes; 32 = resnet_small, batch 64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="112 and 32 only, 2 repeats, no memory probe")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--align", default="kernel>1", choices=("kernel>1", "all", "none"))
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--table-rows", type=int, default=40)
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        size, name = args.memory_probe.split(":")
        memory_probe(int(size), name, args.align)
        return
    sizes = [112, 32] if args.quick else [int(s) for s in args.sizes.split(",")]
    repeats = 2 if args.quick else args.repeats
    memory = not (args.quick or args.no_memory)
    print(f"torch {torch.__version__}, {args.threads} threads, m = {NUM_SOURCES}, align = {args.align}, "
          f"{repeats} interleaved repeats (median)")
    for size in sizes:
        result = run_setting(size, repeats, args.align, memory, args.threads)
        arch = "resnet_small(depth 18, width 16)" if size <= 32 else "resnet50"
        print(f"\n== {arch} at {size}x{size}, batch {result['batch']} ==")
        for key, seconds in result["median_s"].items():
            print(f"  {key:<14} {seconds * 1e3:9.1f} ms")
        for key, ratio in result["ratios"].items():
            print(f"  {key:<32} {ratio:6.2f}x")
        for key, ratio in result.get("flops_ratios", {}).items():
            print(f"  FLOPs {key:<26} {ratio:6.2f}x")
        for key, mib in result.get("peak_growth_mib", {}).items():
            print(f"  peak RSS growth, train step, {key:<7} {mib if mib is None else round(mib)} MiB")
        print("  tune() choices (per layer and phase):")
        print("\n".join(formulation_table(result["tune_reports"], args.table_rows)))


if __name__ == "__main__":
    main()
