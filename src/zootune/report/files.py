"""Report files (results.json, results.md) are written with the one atomic writer,
:mod:`zootune.atomic`: a reader never sees a half-written results file."""

from __future__ import annotations

from zootune.atomic import atomic_write_json, atomic_write_text, json_safe

__all__ = ["atomic_write_json", "atomic_write_text", "json_safe"]
