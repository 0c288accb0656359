"""The docs name what exists: every ``zootune.x.y`` written in backticks in README.md and docs/
resolves to a module or an attribute, where it is defined (not a name another module merely imports).

The notes in docs/dev-notes are session logs; they may say what a thing *was* called, but a dotted
``zootune.`` path in them must be one a reader can import today.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
SPAN = re.compile(r"`([^`\n]+)`")
# zootune.a.b, zootune.a.b(), zootune.a.b(args): the dotted part; not a command (`zootune run`), a
# file (`zootune.json`), a glob or a placeholder (`zootune.<x>`)
DOTTED = re.compile(r"zootune(?:\.[A-Za-z_][A-Za-z0-9_]*)+(?=\(|$)")
NOT_PYTHON = re.compile(r"\.(json|jsonl|md|py|txt|csv|png|toml|yaml|yml|safetensors|pt|pth)$")


def logger_names() -> set[str]:
    """Logger names the library uses (``zootune.pac_net``): dotted, but not Python paths."""
    names = set()
    for path in (ROOT / "src" / "zootune").rglob("*.py"):
        names |= set(re.findall(r"getLogger\(\s*[\"']([^\"']+)[\"']", path.read_text(encoding="utf-8")))
    return names


def dotted_names(text: str) -> list[tuple[int, str]]:
    """(line number, name) of every ``zootune.`` dotted path in an inline code span of ``text``."""
    # fenced blocks are code (tested where they are meant to run); blank them, keeping line numbers
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for span in SPAN.findall(line):
            match = DOTTED.match(span.strip())
            if match and not NOT_PYTHON.search(match.group(0)):
                found.append((number, match.group(0)))
    return found


def problem(name: str) -> str | None:
    """None when ``name`` resolves to what it names; else what is wrong."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):  # the longest importable module prefix
        try:
            obj = importlib.import_module(".".join(parts[:end]))
            break
        except ModuleNotFoundError as error:
            if error.name and not error.name.startswith("zootune"):
                pytest.skip(f"{name} needs {error.name}, not installed here")
    else:
        return "no such module"
    for attr in parts[end:]:
        if not hasattr(obj, attr):
            return f"{obj.__name__} has no attribute {attr!r}"
        owner, obj = obj, getattr(obj, attr)
        defined_in = getattr(obj, "__module__", None) if inspect.isclass(obj) or inspect.isfunction(obj) else None
        is_package = hasattr(owner, "__path__")  # packages re-export their public names on purpose
        if inspect.ismodule(owner) and not is_package and defined_in and defined_in != owner.__name__:
            return f"only imported by {owner.__name__}: it is {defined_in}.{obj.__name__}"
    return None


def test_every_dotted_zootune_name_in_the_docs_resolves():
    loggers = logger_names()
    names = [(path, number, name) for path in DOCS
             for number, name in dotted_names(path.read_text(encoding="utf-8")) if name not in loggers]
    assert len(names) > 20, "the scan finds the docs' dotted names"  # not vacuously empty
    stale = []
    for path, number, name in names:
        why = problem(name)
        if why is not None:
            stale.append(f"{path.relative_to(ROOT)}:{number}: `{name}`: {why}")
    assert not stale, "stale names in the docs:\n" + "\n".join(stale)


def test_the_scan_reports_stale_names_and_skips_what_is_not_a_python_path():
    text = """Written with `zootune.data.cache.atomic_write_bytes`, then `zootune.methods.base.unwrap(m)`
and `zootune.no_such_module`; fine: `zootune.atomic.atomic_write_bytes`, `zootune.Zoo`,
`zootune.engine.Trainer`, `zootune.minizoo.hub.load_hub()`.
```python
zootune.not_checked_in_a_code_block
```
Not paths: `zootune run --quick`, `zootune.json`, `zootune.<name>`, the `zootune.pac_net` logger.
"""
    names = [name for _, name in dotted_names(text)]
    assert names == ["zootune.data.cache.atomic_write_bytes", "zootune.methods.base.unwrap", "zootune.no_such_module",
                     "zootune.atomic.atomic_write_bytes", "zootune.Zoo", "zootune.engine.Trainer",
                     "zootune.minizoo.hub.load_hub", "zootune.pac_net"]
    assert "zootune.pac_net" in logger_names()
    assert "zootune.atomic.atomic_write_bytes" in problem("zootune.data.cache.atomic_write_bytes")
    assert "no attribute 'unwrap'" in problem("zootune.methods.base.unwrap")
    assert problem("zootune.no_such_module") is not None
    assert [problem(n) for n in names[3:7]] == [None] * 4
