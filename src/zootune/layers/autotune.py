"""Measured choice of an exact formulation per layer shape, like cuDNN's benchmark mode.

The aggregation layers (``zootune.layers.aggregate``) can compute the same output in several exact
ways whose speed depends on the shape (batch, channels, pixels, kernel), the dtype, the device and
whether a backward pass follows. The first time a layer meets a new key, :func:`choose` times each
candidate on copies of the real inputs and caches the fastest for the rest of the process.

Measuring is kept cheap: candidates whose multiply-add count is more than ``PRUNE_FACTOR`` times the
cheapest one's are not timed at all, each survivor runs once to warm up and then ``MEASURE_REPEATS``
times (the minimum is kept), and copies of the inputs are used (no random numbers are drawn, so the
global RNG stream, and hence a seeded run, is the same whether or not a measurement happened).

Timing makes the choice depend on the machine's load: two runs of one command may pick different
(equally exact) formulations, whose float rounding differs, and a long training can drift apart.
:func:`by_macs` (a context manager; ``zootune run`` uses it) chooses by the multiply-add estimate
instead (ties: the candidates' order), so the same command gives the same numbers.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Hashable, Iterator

PRUNE_FACTOR = 3.0
MEASURE_REPEATS = 2

_CHOICES: dict[Hashable, str] = {}
_TIMINGS: dict[Hashable, dict[str, float]] = {}
_BY_MACS = [False]


@contextlib.contextmanager
def by_macs() -> Iterator[None]:
    """Within the block, choose deterministically by multiply-adds instead of by timing (and keep
    those choices apart from timed ones)."""
    previous = _BY_MACS[0]
    _BY_MACS[0] = True
    try:
        yield
    finally:
        _BY_MACS[0] = previous


def _time_once(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def choose(key: Hashable, candidates: dict[str, Callable[[], None]], macs: dict[str, float]) -> str:
    """Name of the fastest candidate for ``key`` (measured once, then cached).

    ``candidates[name]()`` runs formulation ``name`` once (forward, plus backward when training);
    ``macs[name]`` is its multiply-add estimate, used only to skip hopeless candidates.
    """
    if _BY_MACS[0]:
        return min(candidates, key=lambda name: macs[name])  # first of the cheapest: stable order
    if key in _CHOICES:
        return _CHOICES[key]
    if len(candidates) == 1:
        (name,) = candidates
        _CHOICES[key] = name
        return name
    cheapest = min(macs[name] for name in candidates)
    timings: dict[str, float] = {}
    for name, run in candidates.items():
        if macs[name] > PRUNE_FACTOR * cheapest:
            continue
        run()  # warm-up: allocator, one-time kernel selection
        timings[name] = min(_time_once(run) for _ in range(MEASURE_REPEATS))
    best = min(timings, key=timings.__getitem__)
    _CHOICES[key] = best
    _TIMINGS[key] = timings
    return best


def measured_choices() -> dict[Hashable, tuple[str, dict[str, float]]]:
    """Everything measured so far: key -> (chosen formulation, {formulation: seconds})."""
    return {key: (name, dict(_TIMINGS.get(key, {}))) for key, name in _CHOICES.items()}


def clear_cache() -> None:
    """Forget all measured choices (the next forward of each shape measures again)."""
    _CHOICES.clear()
    _TIMINGS.clear()
