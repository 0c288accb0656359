"""The interop lane: zootune against the real torchvision and timm (``pytest -m interop tests/interop``).

Every test here is marked ``interop`` and skipped, with the reason, where the libraries are not
installed (the main environment); ``ZOOTUNE_REQUIRE_INTEROP=1`` (set by .ci/run for this lane) turns
a missing library into an error instead, so that the lane cannot pass by skipping everything.

Nothing may be downloaded: before any of the libraries is imported, their caches are pointed into an
empty temporary folder and the Hugging Face hub is switched offline; tests that load pretrained
names put the files they need into those caches (or pass local files) themselves.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

LIBRARIES = ("torchvision", "timm")
AVAILABLE = {name: importlib.util.find_spec(name) is not None for name in LIBRARIES}

if any(AVAILABLE.values()):
    CACHE_ROOT = Path(tempfile.mkdtemp(prefix="zootune-interop-cache-"))
    os.environ["TORCH_HOME"] = str(CACHE_ROOT / "torch")
    os.environ["HF_HOME"] = str(CACHE_ROOT / "hf")
    os.environ.pop("HF_HUB_CACHE", None)
    os.environ.pop("HUGGINGFACE_HUB_CACHE", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["ZOOTUNE_OFFLINE"] = "1"

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.interop)


def pytest_sessionstart(session):
    if os.environ.get("ZOOTUNE_REQUIRE_INTEROP") == "1":
        missing = [name for name, found in AVAILABLE.items() if not found]
        if missing:
            raise pytest.UsageError(f"ZOOTUNE_REQUIRE_INTEROP=1 but {', '.join(missing)} is not installed in "
                                    "this environment (the interop lane needs torchvision and timm)")
