"""Intra-op threads for small models on a shared machine (a script, not a test).

Measures the seconds per training step (forward, cross-entropy, backward, SGD step) of small models
with 1 thread and with every core, alone and next to busy competitor processes (``--busy N``:
N processes spinning a core each, like another engineer's job), each configuration in a fresh
subprocess, and prints the forward+backward multiply-adds per step (``zootune.cost``) beside them.
The engine's thread rule (:func:`zootune.engine.threads.choose_threads`) comes from these numbers;
docs/dev-notes/engine.md has them.

Usage: python benchmarks/threads.py [--models minizoo,small16,resnet18_64] [--steps 20] [--busy 0,1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

MODELS = {
    # name: (builder, batch, image size)
    "minizoo": (lambda: __import__("zootune.models", fromlist=["x"]).resnet_small(10, depth=10, width=8), 64, 32),
    "small16": (lambda: __import__("zootune.models", fromlist=["x"]).resnet_small(10, depth=18, width=16), 64, 32),
    "resnet18_64": (lambda: __import__("zootune.models", fromlist=["x"]).resnet18(10), 32, 64),
    "resnet50_112": (lambda: __import__("zootune.models", fromlist=["x"]).resnet50(10), 16, 112),
}


def probe(name: str, threads: int, steps: int) -> dict:
    """Subprocess entry: median seconds per training step of ``name`` with ``threads`` threads."""
    torch.set_num_threads(threads)
    builder, batch, size = MODELS[name]
    torch.manual_seed(0)
    model = builder()
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times)}


def step_macs(name: str) -> int:
    from zootune.cost import count_macs

    builder, batch, size = MODELS[name]
    return count_macs(builder(), torch.randn(batch, 3, size, size), backward=True, train_mode=True)


def run_probe(name: str, threads: int, steps: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "--probe", f"{name}:{threads}:{steps}"],
                         capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["median_s"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minizoo,small16,resnet18_64")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--busy", default="0,1", help="numbers of competing busy processes to try")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        name, threads, steps = args.probe.split(":")
        print(json.dumps(probe(name, int(threads), int(steps))))
        return
    cores = os.cpu_count() or 1
    thread_counts = sorted({1, cores})
    print(f"torch {torch.__version__}, {cores} cores, median of {args.steps} steps per cell")
    for busy in [int(b) for b in args.busy.split(",")]:
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            time.sleep(0.5 if busy else 0)
            for name in args.models.split(","):
                cells = {t: run_probe(name, t, args.steps) for t in thread_counts}
                shown = ", ".join(f"{t} thread(s) {s * 1e3:8.1f} ms" for t, s in cells.items())
                ratio = cells[max(thread_counts)] / cells[1]
                print(f"busy={busy} {name:<13} {shown}   {max(thread_counts)}/1 = {ratio:5.2f}x")
        finally:
            for p in spinners:
                p.kill()
                p.wait()
    for name in args.models.split(","):
        torch.set_num_threads(1)
        print(f"{name:<13} train-step MACs (forward + backward) {step_macs(name) / 1e9:.3f} G")


if __name__ == "__main__":
    main()
