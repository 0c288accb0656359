"""zootune: transfer learning from a zoo of pretrained models.

Public names are imported lazily so that ``import zootune`` is cheap and a missing optional extra
(plotting, RL) only matters when the feature that needs it is used.
"""

from __future__ import annotations

import importlib

from zootune.version import __version__

_EXPORTS = {
    "Zoo": "zootune.zoo",
    "ZooTuning": "zootune.methods.zoo_tuning",
    "Hub": "zootune.zoo",
    "HubPathway": "zootune.methods.hub_pathway",
    "PACNet": "zootune.methods.pac_net",
    "ZootuneError": "zootune.errors",
    "build_model": "zootune.models",
    "count_cost": "zootune.cost",
    "tune": "zootune.layers.autotune",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'zootune' has no attribute {name!r}")


__all__ = ["__version__", *_EXPORTS]
