"""Zoos of pretrained models: safe checkpoint loading, key remapping and the :class:`Zoo` container.

* :mod:`zootune.zoo.checkpoint` -- read/write weight files safely (``weights_only``, safetensors,
  atomic writes).
* :mod:`zootune.zoo.remap` -- map a checkpoint's keys (``module.encoder_q.``, ``backbone.body.``, ...)
  onto an architecture's keys, dropping heads and detection/segmentation parts.
* :mod:`zootune.zoo.zoo` -- :class:`Zoo`, the named sequence of members every method accepts.
"""

from zootune.zoo.checkpoint import (
    load_state_dict_file,
    read_safetensors_metadata,
    save_state_dict,
    unwrap_state_dict,
)
from zootune.zoo.remap import detect_prefix, match_state_dict
from zootune.zoo.zoo import Zoo, checkpoint_stem

__all__ = [
    "Zoo", "checkpoint_stem", "detect_prefix", "load_state_dict_file", "match_state_dict",
    "read_safetensors_metadata", "save_state_dict", "unwrap_state_dict",
]
