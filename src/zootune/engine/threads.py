"""How many intra-op threads a CPU training uses (``TrainConfig.threads``).

torch splits every operator over all cores by default. For a small model each operator is short, so
the threads mostly synchronise; and when another process holds one of the cores, every operator
waits for the thread that was descheduled (OpenMP spins, then sleeps). Measured on a 2-core machine
(``benchmarks/threads.py``, numbers in docs/dev-notes/engine.md): a MiniZoo member's training step
(resnet_small, width 8, batch 64 at 32²; 0.26 G multiply-adds forward) took 49 ms with 1 thread and
up to 28x longer with 2 while other jobs ran; a second thread never paid for itself below
``SMALL_FORWARD_MACS`` per step, and on a machine already busy it cost more than it gave at every
size we tried.

Rule (``threads=None``): on the CPU, unless ``OMP_NUM_THREADS`` is set (the user's choice stands),
use 1 thread when the forward pass of one batch costs fewer than ``SMALL_FORWARD_MACS``
multiply-adds or when the machine is already busy at the start (1-minute load average at least
cores - 1/2); otherwise leave torch's default (one thread per core). A number fixes the count.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch

SMALL_FORWARD_MACS = 2e9


def choose_threads(requested: int | None, device: torch.device, forward_macs: Callable[[], float]) -> int | None:
    """The thread count to set for this training, or None to leave torch's current setting.

    ``forward_macs()`` (called only when needed) gives the multiply-adds of one batch's forward.
    """
    if requested is not None:
        return requested
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = torch.get_num_threads()
    if cores <= 1:
        return None
    try:
        busy = os.getloadavg()[0] >= cores - 0.5
    except OSError:  # no load average on this platform
        busy = False
    if busy or forward_macs() < SMALL_FORWARD_MACS:
        return 1
    return None


def forward_macs(module: torch.nn.Module, example: tuple) -> float:
    """Multiply-adds of ``module(*example)`` in eval mode without gradients (torch's FLOP counter;
    nothing in the module changes: eval mode updates no statistics, random streams are forked)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = [(m, m.training) for m in module.modules()]
    counter = FlopCounterMode(display=False)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), counter:
            module.eval()
            module(*example)
    finally:
        for m, flag in was_training:
            m.training = flag
    return counter.get_total_flops() / 2


@contextlib.contextmanager
def thread_rule(requested: int | None, device: torch.device, forward_macs: Callable[[], float]) -> Iterator[int]:
    """Within the block, the thread count :func:`choose_threads` gives (torch's count restored
    afterwards); yields the count in effect. For training loops outside the engine, e.g.::

        with thread_rule(None, torch.device("cpu"), lambda: forward_macs(model, (batch,))):
            ...  # the MiniZoo's pretraining steps
    """
    before = torch.get_num_threads()
    chosen = choose_threads(requested, device, forward_macs)
    if chosen is not None:
        torch.set_num_threads(chosen)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
