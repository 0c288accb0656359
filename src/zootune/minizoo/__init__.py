"""The MiniZoo: small 32x32 ResNets pretrained offline on different data, tasks and algorithms.

- :data:`MEMBERS` -- the member specs (name, description, task, data, algorithm, budget);
- :func:`build_minizoo` -- pretrain and cache them (``zootune zoo build``);
- :func:`load_minizoo` -- the cached members as a :class:`zootune.Zoo`, building what is missing;
- :func:`list_minizoo` -- what is built and whether its checksum is right (``zootune zoo list``);
- :func:`minizoo_arch` -- the member architecture's builder;
- :func:`pretrain` -- one pretext task on any backbone exposing the hook of
  :mod:`zootune.minizoo.features` (used to pretrain other architectures on the same tasks).
"""

from zootune.minizoo.features import feature_map, pooled_features
from zootune.minizoo.members import MEMBERS, MemberSpec
from zootune.minizoo.pretrain import get_member, pretrain
from zootune.minizoo.store import (
    ARCH_NAME, build_minizoo, list_minizoo, load_member, load_minizoo, minizoo_arch, minizoo_dir,
)

__all__ = [
    "ARCH_NAME", "MEMBERS", "MemberSpec", "build_minizoo", "feature_map", "get_member", "list_minizoo",
    "load_member", "load_minizoo", "minizoo_arch", "minizoo_dir", "pooled_features", "pretrain",
]
