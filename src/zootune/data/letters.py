"""The old path of :mod:`zootune.suite.letters` (the generated suite moved out of ``zootune.data``):
importing it gives that module itself, so scripts written against this path keep working."""

import sys

from zootune.suite import letters as _module

sys.modules[__name__] = _module
