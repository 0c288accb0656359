"""The old path of :mod:`zootune.suite.bundled` (the generated suite moved out of ``zootune.data``):
importing it gives that module itself, so scripts written against this path keep working."""

import sys

from zootune.suite import bundled as _module

sys.modules[__name__] = _module
