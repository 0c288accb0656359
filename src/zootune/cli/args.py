"""Argument types and small parsers shared by the ``zootune`` subcommands (no subcommand imports another)."""

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


def seed_int(text: str) -> int:
    """A seed: an integer in 0..2**32-1 (what every random generator zootune seeds accepts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a seed must be an integer, got {text!r}") from None
    return _check_seed(value)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


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
