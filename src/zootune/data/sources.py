"""The old path of :mod:`zootune.suite.sources` (the generated suite moved out of ``zootune.data``):
importing it gives that module itself, so scripts written against this path keep working."""

import sys

from zootune.suite import sources as _module

sys.modules[__name__] = _module
