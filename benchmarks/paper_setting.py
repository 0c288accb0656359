"""Throughput at the paper's setting: ResNet-50 x 5 members, 224², batch 48 (a script, not a test).

Zoo-Tuning's Table 1 trains with batch 48 on random-resized 224² crops of JPEG photos. This script
measures, in ONE run, on generated JPEGs of 256-320 px (decoded, cropped, flipped and normalised per
sample, as a training pipeline does):

- the data pipeline alone: images/s of a DataLoader over the folder with 0 and with 2 workers
  (``zootune.data.folder_dataset.ImageFolderDataset``, the "paper" preset: random-resized crop of
  the original image, area 8-100 %, aspect 3/4-4/3, to 224², horizontal flip, normalisation);
- the whole pipeline (next batch from the loader + forward, cross-entropy, backward, SGD step) of a
  plain ResNet-50 (one member, new head), full Zoo-Tuning and Lite Zoo-Tuning over 5 random members
  (speed does not depend on the weights' values): the models take turns step by step (so that load
  changes hit all alike) and the median step is reported;
- time ratios to the plain model beside the FLOPs ratios of a training step (forward + backward,
  ``zootune.cost.count_flops``; aggregation layers on their fewest-FLOPs formulation, as the paper
  counts) and the efficiency = FLOPs ratio / time ratio (1: the extra work runs as fast as the plain
  model's; below 1: it runs slower).

Before timing, each Zoo-Tuning model chooses its formulations once with ``zootune.tune`` (timed,
the engine's default; ``--formulations macs`` for the fewest multiply-adds).

CPU (the default; a ResNet-50 step at batch 48 takes seconds here, so few steps):
    python benchmarks/paper_setting.py                      # ~10 min on 2 cores
GPU (one CUDA device, at most ~5 minutes):
    python benchmarks/paper_setting.py --device cuda --precision bf16 --steps 20 --warmup 3

Options: --steps N (timed steps per model), --warmup N, --batch, --size, --members, --precision
fp32|bf16|fp16, --channels-last auto|on|off, --threads N (CPU), --workers N (whole pipeline),
--images N (generated JPEGs), --data DIR (reuse a folder of JPEGs), --json FILE (write the results).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from zootune.cost import count_flops
from zootune.data.folder_dataset import ImageFolderDataset
from zootune.layers import AggregatedLayer
from zootune.layers.autotune import tune
from zootune.methods.zoo_tuning import ZooTuning
from zootune.models import resnet50
from zootune.models.heads import new_linear_head, replace_head

NUM_CLASSES = 10


# ----------------------------------------------------------------------------- data


def make_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` photo-like JPEGs (smooth colour fields with texture), 256-320 px per side."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        h, w = rng.integers(256, 321, size=2)
        coarse = rng.uniform(0, 255, size=(6, 6, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((int(w), int(h)), Image.BICUBIC), dtype=np.float32)
        texture = rng.normal(0, 12, size=(int(h), int(w), 1)).astype(np.float32)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray((field + texture).clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def loader(dataset: Dataset, batch: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                      persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(0))


def endless(data: DataLoader):
    while True:
        yield from data


def data_pipeline_rate(dataset: Dataset, batch: int, workers: int, batches: int, device) -> float:
    """Images/s of the loader alone: ``batches`` batches timed from the iterator's creation (worker
    start-up included: prefetching would otherwise hand out batches decoded before the clock started)."""
    data = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                      pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    stream = endless(data)
    for _ in range(batches):
        next(stream)
    return batches * batch / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- models


def build_models(members: int, align: str) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    zoo = [resnet50(num_classes=1000) for _ in range(members)]
    plain = copy.deepcopy(zoo[0])
    replace_head(plain, new_linear_head(plain.fc.in_features, NUM_CLASSES))
    return {
        "plain": plain,
        "zoo-tuning": ZooTuning(zoo, num_outputs=NUM_CLASSES, align=align),
        "lite": ZooTuning(zoo, num_outputs=NUM_CLASSES, align=align, lite=True),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_flops_per_sample(model: torch.nn.Module, size: int, device: torch.device) -> float:
    """Forward + backward FLOPs of a training step, per sample, at batch 48, with every aggregation
    layer on its fewest-FLOPs formulation (per-sample kernels; Lite: the shared kernel).

    Counted at batches 2 and 4 and extended linearly to the benchmark's batch (exact: with the
    formulation fixed, every count is a + b * batch -- the alignment a per-step constant, the rest
    per sample), so that counting costs seconds, not two more full-size steps."""
    layers = [m for m in model.modules() if isinstance(m, AggregatedLayer)]
    saved = [layer.formulation for layer in layers]
    for layer in layers:
        layer.formulation = "grouped"
    try:
        counts = {b: count_flops(model, torch.randn(b, 3, size, size, device=device), backward=True,
                                 train_mode=True) for b in (2, 4)}
    finally:
        for layer, name in zip(layers, saved):
            layer.formulation = name
    return counts[2], (counts[4] - counts[2]) / 2  # (at batch 2, per extra sample)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--formulations", default="time", choices=("time", "macs"))
    parser.add_argument("--align", default="kernel>1", choices=("kernel>1", "all", "none"))
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    parser.add_argument("--workers", type=int, default=2, help="loader workers of the whole pipeline")
    parser.add_argument("--data-batches", type=int, default=4, help="batches timed for the data pipeline alone")
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--data", help="a folder of JPEGs to use instead of generated ones")
    parser.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's)")
    parser.add_argument("--tune-repeats", type=int, default=1, help="timed runs per candidate in tune()")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cuda")
    autocast = (torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.precision])
                if args.precision != "fp32" else contextlib.nullcontext())
    started = time.perf_counter()
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
          + f", {args.precision}, channels_last={channels_last}, batch {args.batch}, {args.size}², "
          f"{args.members} members, formulations by {args.formulations}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            paths = sorted(p for p in Path(args.data).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
        else:
            paths = make_jpegs(Path(tmp) / "jpegs", args.images)
        dataset = ImageFolderDataset(paths, [i % NUM_CLASSES for i in range(len(paths))], args.size, augment="paper")
        results: dict = {"setting": vars(args), "device_name": torch.cuda.get_device_name(device)
                         if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"}

        # 1. the data pipeline alone
        data_rates = {}
        for workers in (0, 2):
            data_rates[workers] = data_pipeline_rate(dataset, args.batch, workers, args.data_batches, device)
            print(f"data pipeline alone, {workers} workers: {data_rates[workers]:7.1f} images/s", flush=True)
        results["data_images_per_s"] = data_rates

        # 2. models, formulations tuned once, FLOPs
        models = build_models(args.members, args.align)
        for name, model in models.items():
            model.to(device)
            if channels_last:
                for tensor in [*model.parameters(), *model.buffers()]:
                    if tensor.dim() == 4:
                        tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
        stream = endless(loader(dataset, args.batch, args.workers, device))

        def batch_on_device():
            x, y = next(stream)
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return x, y.to(device, non_blocking=True)

        example, _ = batch_on_device()
        tune_seconds = {}
        for name in ("zoo-tuning", "lite"):
            t0 = time.perf_counter()
            with autocast:  # only the training phase is timed below
                report = tune(models[name], example, mode=args.formulations, phases=("train",),
                              repeats=args.tune_repeats)
            synchronize(device)
            tune_seconds[name] = time.perf_counter() - t0
            chosen = [phases["train"].chosen for phases in report.values()]
            counts = {n: chosen.count(n) for n in sorted(set(chosen))}
            results.setdefault("formulations", {})[name] = counts
            print(f"tune({name}, mode={args.formulations}): {tune_seconds[name]:.1f} s; layers per formulation {counts}",
                  flush=True)
        results["tune_seconds"] = tune_seconds
        flops = {}
        for name, model in models.items():
            at_two, per_sample = train_flops_per_sample(model, args.size, device)
            flops[name] = (at_two + per_sample * (args.batch - 2)) / args.batch
        results["train_step_gflops_per_sample"] = {k: v / 1e9 for k, v in flops.items()}

        optimizers = {name: torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True,
                                            weight_decay=5e-4) for name, model in models.items()}
        scalers = {name: torch.amp.GradScaler(device.type) for name in models} if args.precision == "fp16" else {}

        def step(name: str) -> tuple[float, float]:
            """(wall seconds, this process's CPU seconds) of one whole-pipeline step: the next batch,
            forward, loss, backward, SGD."""
            model, optimizer = models[name], optimizers[name]
            synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            x, y = batch_on_device()
            model.train()
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = F.cross_entropy(model(x), y)
            if name in scalers:
                scalers[name].scale(loss).backward()
                scalers[name].step(optimizer)
                scalers[name].update()
            else:
                loss.backward()
                optimizer.step()
            synchronize(device)
            return time.perf_counter() - t0, time.process_time() - c0

        times = {name: [] for name in models}
        cpu_times = {name: [] for name in models}
        for round_ in range(args.warmup + args.steps):
            this_round = {name: step(name) for name in models}  # interleaved: the models take turns
            if round_ >= args.warmup:
                for name, (seconds, cpu_seconds) in this_round.items():
                    times[name].append(seconds)
                    cpu_times[name].append(cpu_seconds)
            print(f"round {round_ + 1}/{args.warmup + args.steps}{' (warm-up)' if round_ < args.warmup else ''}: "
                  + ", ".join(f"{n} {w:.2f} s (CPU {c:.2f} s)" for n, (w, c) in this_round.items()), flush=True)

    median = {name: statistics.median(values) for name, values in times.items()}
    cpu_median = {name: statistics.median(values) for name, values in cpu_times.items()}
    results["median_step_s"] = median
    results["median_step_cpu_s"] = cpu_median
    results["images_per_s"] = {name: args.batch / s for name, s in median.items()}
    results["ratios"], results["cpu_ratios"] = {}, {}
    tables = [("wall time", median, results["ratios"])]
    if device.type == "cpu":
        # On a shared CPU other processes take turns with this one: wall time then measures the
        # load as much as the model. The process's own CPU time (one intra-op thread: the compute;
        # decoding runs in the loader's worker processes) does not.
        tables.append(("CPU time of this process", cpu_median, results["cpu_ratios"]))
    for title, seconds, ratios in tables:
        print(f"\n== ResNet-50 x {args.members}, {args.size}², batch {args.batch}, {args.precision}, "
              f"{results['device_name']}: whole pipeline ({args.workers} workers), median of {args.steps} steps, {title} ==")
        print(f"{'model':<11} {'step s':>8} {'images/s':>9} {'time ratio':>11} {'FLOPs ratio':>12} {'efficiency':>11}")
        for name in models:
            time_ratio = seconds[name] / seconds["plain"]
            flops_ratio = flops[name] / flops["plain"]
            ratios[name] = {"time": time_ratio, "flops": flops_ratio, "efficiency": flops_ratio / time_ratio}
            print(f"{name:<11} {seconds[name]:8.2f} {args.batch / seconds[name]:9.2f} {time_ratio:10.2f}x "
                  f"{flops_ratio:11.2f}x {flops_ratio / time_ratio:11.2f}")
    print(f"data pipeline alone: {data_rates[0]:.1f} images/s with 0 workers, {data_rates[2]:.1f} with 2")
    print("training-step GFLOPs (multiply-adds) per sample: "
          + ", ".join(f"{n} {v / 1e9 / 2:.2f}" for n, v in flops.items()))
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
