"""Checking options before any work: one place, one exception type (:class:`OptionError`).

A method's options are a dataclass (its ``Config``); an architecture's options are declared the same
way (its option table, :mod:`zootune.models.arch_options`), or are its builder's keyword arguments
when it has no table. All arrive as ``{name: value}`` from Python or from the CLI (``--option k=v``,
values parsed as JSON), and all are checked here against what the receiver declares:

- an unknown name is refused with the list of valid names;
- a value is checked against the declared type (``int``, ``float``, ``bool``, ``str``, ``Literal``
  choices, ``X | None``, unions, lists/tuples of a type, dicts); ints are accepted where floats are
  declared, nothing else is converted (``"3"`` is not an int, ``1`` is not a bool);
- ranges are checked by the dataclass itself (``__post_init__`` calling :func:`require`).

Nothing is imported or called by name: a value that names code stays a string.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import types
import typing
from typing import Any, Callable, Literal, Mapping

from zootune.errors import OptionError

_MISSING = object()


def require(condition: bool, message: str) -> None:
    """Raise :class:`OptionError` with ``message`` unless ``condition`` (for ``__post_init__`` range checks)."""
    if not condition:
        raise OptionError(message)


def describe(annotation) -> str:
    """Human words for a type annotation: ``int``, ``one of 'a', 'b'``, ``a number or None``."""
    origin = typing.get_origin(annotation)
    if annotation is Any or annotation is inspect.Parameter.empty:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if annotation is float:
        return "a number"
    if annotation is int:
        return "an integer"
    if annotation is bool:
        return "true or false"
    if annotation is str:
        return "a string"
    if origin in (list, tuple, collections.abc.Sequence):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return f"a list of {describe(args[0])}" if args else "a list"
    if origin in (dict, collections.abc.Mapping) or annotation is dict:
        return "a JSON object"
    if annotation is list:
        return "a list"
    name = getattr(annotation, "__name__", str(annotation))
    return f"a {name} (Python API only)"


def _check(value, annotation) -> tuple[bool, Any]:
    """(accepted, value) for ``value`` against ``annotation``; ints become floats where floats are declared."""
    origin = typing.get_origin(annotation)
    if annotation is Any or annotation is inspect.Parameter.empty or annotation is object:
        return True, value
    if origin is Literal:
        choices = typing.get_args(annotation)
        return (any(value == c and type(value) is type(c) for c in choices), value)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            ok, converted = _check(value, option)
            if ok:
                return True, converted
        return False, value
    if annotation is type(None):
        return value is None, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        return True, float(value)
    if annotation is str:
        return isinstance(value, str), value
    if origin in (list, tuple, collections.abc.Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        if not args:
            return True, value
        items = []
        for item in value:
            ok, converted = _check(item, args[0])
            if not ok:
                return False, value
            items.append(converted)
        return True, (tuple(items) if origin is tuple else items)
    if origin in (dict, collections.abc.Mapping) or annotation is dict:
        return isinstance(value, dict), value
    if origin is collections.abc.Callable or annotation is collections.abc.Callable:
        return callable(value), value
    if isinstance(annotation, type):
        return isinstance(value, annotation), value
    return True, value  # an annotation we cannot check (a TypeVar, a string we could not resolve)


def check_value(name: str, value, annotation, *, what: str):
    """``value`` checked against ``annotation`` (see the module docstring); :class:`OptionError` if not."""
    ok, converted = _check(value, annotation)
    if not ok:
        raise OptionError(f"{what} option {name!r} must be {describe(annotation)}, got {value!r}")
    return converted


def _unknown(names, valid, what: str) -> OptionError:
    listed = ", ".join(sorted(valid)) or "none"
    return OptionError(f"unknown {what} option(s) {', '.join(repr(n) for n in sorted(names))}; valid: {listed}")


def parse_config(cls: type, values: Mapping[str, Any] | None, *, what: str):
    """An instance of the dataclass ``cls`` from ``values``, every name and type checked first.

    Fields whose name starts with ``_`` are internal and cannot be set. ``what`` names the receiver
    in messages (``"zoo-tuning"``).
    """
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    unknown = set(values) - set(fields)
    if unknown:
        raise _unknown(unknown, fields, what)
    checked = {name: check_value(name, value, hints.get(name, Any), what=what) for name, value in values.items()}
    try:
        return cls(**checked)
    except OptionError as err:
        raise OptionError(f"{what}: {err}") from None


def config_to_dict(config) -> dict:
    """A config dataclass as plain JSON types (tuples become lists)."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def check_kwargs(function: Callable, values: Mapping[str, Any] | None, *, what: str) -> dict:
    """``values`` checked against what ``function`` accepts: an architecture builder's keyword
    parameters, or -- when ``function`` is a dataclass -- an architecture's declared option table.

    A table is checked completely before anything is built (:func:`parse_config`: names, types, and
    the ranges of its ``__post_init__``); the names in its ``fixed`` (builder arguments that the
    architecture sets itself) are refused as such. A builder is checked as far as its signature
    tells: unknown names are refused unless it takes ``**kwargs``; types where a parameter is
    annotated, else against the type of its default (a float default admits ints); ranges are left
    to the builder.
    """
    values = dict(values or {})
    if dataclasses.is_dataclass(function):
        return _check_table(function, values, what=what)
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return values  # a builtin without a signature: the call itself will say
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # unresolvable string annotations: fall back to the defaults' types
        hints = {}
    params = {n: p for n, p in signature.parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    unknown = set(values) - set(params)
    if unknown and not takes_any:
        raise _unknown(unknown, params, what)
    checked = {}
    for name, value in values.items():
        param = params.get(name)
        annotation = hints.get(name, inspect.Parameter.empty)
        if annotation is inspect.Parameter.empty and param is not None and param.default not in (
                inspect.Parameter.empty, None):
            default_type = type(param.default)
            annotation = float if default_type is float else default_type
        checked[name] = value if param is None else check_value(name, value, annotation, what=what)
    return checked


def _check_table(table: type, values: dict, *, what: str) -> dict:
    """``values`` checked against the option table ``table`` (see :func:`check_kwargs`); only the
    names given come back (the builder's defaults stay the builder's)."""
    refused = sorted(set(values) & set(getattr(table, "fixed", ())))
    if refused:
        valid = ", ".join(sorted(f.name for f in dataclasses.fields(table) if f.init and not f.name.startswith("_")))
        raise OptionError(f"{what} option {refused[0]!r} is fixed by this architecture; valid: {valid}")
    config = parse_config(table, values, what=what)
    return {name: getattr(config, name) for name in values}


__all__ = ["OptionError", "check_kwargs", "check_value", "config_to_dict", "describe", "parse_config", "require"]
