"""The engine's CUDA paths, run once on a GPU (a check script, not a test; CPU-only machines skip).

Trains a small Zoo-Tuning model (aggregation layers, BatchNorm, a head) on random images with the
engine on ``cuda``: bf16 autocast with channels-last (the CUDA default), fp16 with a GradScaler, and
formulations chosen by timing with CUDA events; then resumes the bf16 run from its checkpoint in
this process and prints what it chose and how long tuning took. Prints one line per check and exits
non-zero on a failure.

    python benchmarks/gpu_engine_check.py [--out DIR] [--device cpu]   (cpu: a dry run of the script)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from zootune.engine import TrainConfig, Trainer
from zootune.engine.checkpoint import load_checkpoint
from zootune.layers import AggregatedLayer, autotune
from zootune.tasks import ClassificationTask


def model() -> nn.Module:
    torch.manual_seed(0)

    def sources(c_in, c_out, k, stride=1):
        return [nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2) for _ in range(5)]

    return nn.Sequential(
        AggregatedLayer(sources(3, 32, 3)), nn.BatchNorm2d(32), nn.ReLU(),
        AggregatedLayer(sources(32, 64, 3, 2)), nn.BatchNorm2d(64), nn.ReLU(),
        AggregatedLayer(sources(64, 64, 1)), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    print(f"device: {torch.cuda.get_device_name(0) if device == 'cuda' else device}, torch {torch.__version__}")
    g = torch.Generator().manual_seed(0)
    n = 512 if device == "cuda" else 128
    data = TensorDataset(torch.randn(n, 3, 64, 64, generator=g), torch.randint(0, 10, (n,), generator=g))
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        for precision in ("bf16", "fp16"):
            out = root / precision
            cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, device=device, precision=precision,
                              exact_choices="time", progress=False)
            net = model()
            t0 = time.perf_counter()
            result = Trainer(net, ClassificationTask(10), data, None, cfg, out_dir=out).fit()
            seconds = time.perf_counter() - t0
            ckpt = load_checkpoint(out / "checkpoint.pt")
            choices = {name: state for name, state in ckpt["training_states"].items() if state}
            finite = all(torch.isfinite(p).all() for p in result.model.parameters())
            contiguous = all(p.is_contiguous() for p in result.model.parameters())
            ok = finite and contiguous and set(choices) == {"0", "3", "6"} and next(net.parameters()).device.type == device
            ok = ok and (precision != "fp16" or ckpt["grad_scaler"]["scale"] > 0)
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {precision}: 2 epochs in {seconds:.1f} s, last loss "
                  f"{result.history[-1]['train_loss']:.3f}, choices {choices}, "
                  f"{result.history[-1]['images_per_s']:.0f} images/s")
        # resume the bf16 run for a third epoch: the stored choices come back, no timing
        calls = []
        real = autotune.tune
        autotune.tune = lambda *a, **k: calls.append(1) or real(*a, **k)
        try:
            net = model()
            cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, device=device, precision="bf16",
                              exact_choices="time", progress=False)
            Trainer(net, ClassificationTask(10), data, None, cfg, out_dir=root / "bf16", resume=True).fit()
        finally:
            autotune.tune = real
        ok = not calls and autotune.formulation_choices(net) == {name: state for name, state in load_checkpoint(
            root / "bf16" / "checkpoint.pt")["training_states"].items() if state}
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} resume: choices read back from the checkpoint, tune() not called")
        # tune() on CUDA directly: CUDA-event timings of every candidate
        net = model().to(device)
        x = torch.randn(64, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device, dtype=torch.bfloat16):
            report = autotune.tune(net, x, phases=("train", "eval"))
        for name, phases in report.items():
            for phase, choice in phases.items():
                timings = ", ".join(f"{n} {s * 1e3:.2f} ms" for n, s in sorted(choice.seconds.items(), key=lambda kv: kv[1]))
                print(f"     tune layer {name} {phase}: {choice.chosen} ({timings or 'one candidate left by the multiply-adds'})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
