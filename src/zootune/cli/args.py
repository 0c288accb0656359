"""The ``zootune`` flags' argument types (every ``type=`` of the parsers) and the small parsers of
flag values, shared by the subcommands (no subcommand imports another).

A flag that sets a :class:`zootune.engine.TrainConfig` field checks no range of its own that differs
from the one ``TrainConfig`` checks (``positive_int`` is its ``>= 1``, ``positive_float`` its finite
``> 0``); tests/test_cli.py holds them to it.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from zootune.errors import ZootuneError

MAX_SEED = 2**32 - 1
MAX_SEED_COUNT = 1000


def split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; a single number ``"3"`` -> three seeds [0, 1, 2]."""
    try:
        parts = [int(p) for p in split_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers, e.g. 0,1,2 or 3 (got {text!r})") from None
    if not parts:
        raise argparse.ArgumentTypeError("give at least one seed")
    if len(parts) == 1 and "," not in text:
        if not 1 <= parts[0] <= MAX_SEED_COUNT:
            raise argparse.ArgumentTypeError(f"the number of seeds must be in 1..{MAX_SEED_COUNT} (got {parts[0]})")
        return list(range(parts[0]))
    for seed in parts:
        _check_seed(seed)
    return parts


def _check_seed(seed: int) -> int:
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed must be in 0..{MAX_SEED} (got {seed})")
    return seed


def _checked(text: str, convert, accept, not_converted: str, not_accepted: str):
    """``convert(text)`` when it converts and ``accept`` takes the value; else an argparse error,
    ``not_converted`` or ``not_accepted`` formatted with ``text`` and ``value``."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(not_converted.format(text=text)) from None
    if not accept(value):
        raise argparse.ArgumentTypeError(not_accepted.format(text=text, value=value))
    return value


def seed_int(text: str) -> int:
    """A seed: an integer in 0..2**32-1 (what every random generator zootune seeds accepts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a seed must be an integer, got {text!r}") from None
    return _check_seed(value)


def positive_int(text: str) -> int:
    return _checked(text, int, lambda value: value >= 1, "expected a positive integer, got {text!r}",
                    "expected a positive integer, got {value}")


def positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate)."""
    import math

    return _checked(text, float, lambda value: math.isfinite(value) and value > 0,
                    "expected a positive number, got {text!r}", "expected a finite number > 0, got {text!r}")


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (epochs of warm-up)."""
    import math

    return _checked(text, float, lambda value: math.isfinite(value) and value >= 0,
                    "expected a number >= 0, got {text!r}", "expected a finite number >= 0, got {text!r}")


def worker_count(text: str) -> int | str:
    """``auto`` or a number of DataLoader worker processes >= 0."""
    if text == "auto":
        return text
    return _checked(text, int, lambda value: value >= 0, "expected 'auto' or a number of workers >= 0, got {text!r}",
                    "expected 'auto' or a number of workers >= 0, got {value}")


def mebibytes(text: str) -> float:
    """A size in MiB >= 0."""
    return _checked(text, float, lambda value: value >= 0, "expected a size in MiB >= 0, got {text!r}",
                    "expected a size in MiB >= 0, got {text!r}")


def layer_types(text: str) -> list[str]:
    """``--aggregate conv,linear`` (or conv+linear): validated layer type names."""
    from zootune.layers.targets import LAYER_TYPE_NAMES

    names = [part.strip().lower() for part in text.replace("+", ",").split(",") if part.strip()]
    unknown = [name for name in names if name not in LAYER_TYPE_NAMES]
    if unknown or not names:
        problem = f"unknown layer type {unknown[0]!r}" if unknown else "give at least one layer type"
        raise argparse.ArgumentTypeError(
            f"{problem}; choose from {', '.join(LAYER_TYPE_NAMES)} (comma-separated, e.g. conv,linear)")
    return names


def auto_or(parse):
    """An argument type accepting ``auto`` or what ``parse`` accepts."""
    def parse_or_auto(text: str):
        return "auto" if text == "auto" else parse(text)

    parse_or_auto.__name__ = parse.__name__  # argparse names the type in its messages
    return parse_or_auto


def parse_value(text: str):
    """An option value: JSON when it parses (numbers, true/false, null, lists), else the string."""
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"True": True, "False": False, "None": None}.get(text, text)


def parse_options(items: Sequence[str] | None, flag: str = "--option") -> dict:
    """``["k=v", ...]`` -> ``{"k": parsed v}`` (dashes in keys become underscores)."""
    options = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ZootuneError(f"{flag} expects key=value, got {item!r}")
        options[key.strip().replace("-", "_")] = parse_value(value)
    return options


def parse_method_option_list(items: Sequence[str] | None) -> dict[str, dict]:
    """``zootune run --option METHOD:key=value`` -> ``{method: {key: value}}``."""
    grouped: dict[str, dict] = {}
    for item in items or ():
        method, sep, rest = item.partition(":")
        if not sep or not method or "=" in method:
            raise ZootuneError(f"--option for run expects METHOD:key=value, got {item!r}")
        grouped.setdefault(method, {}).update(parse_options([rest]))
    return grouped
