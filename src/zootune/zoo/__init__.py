"""Zoos of pretrained models: safe checkpoint loading, key remapping and the :class:`Zoo` container.

* :mod:`zootune.zoo.checkpoint` -- read/write weight files safely (``weights_only``, safetensors,
  atomic writes).
* :mod:`zootune.zoo.remap` -- map a checkpoint's keys (``module.encoder_q.``, ``backbone.body.``, ...)
  onto an architecture's keys, dropping heads and detection/segmentation parts.
* :mod:`zootune.zoo.zoo` -- :class:`Zoo`, the named sequence of members every method accepts.
* :mod:`zootune.zoo.hub` -- :class:`Hub`, models of different architectures (hub methods).
* :mod:`zootune.zoo.pretrained` -- members by name (``timm:...``, ``torchvision:...``, ``hf-hub:...``)
  through the libraries' own pretrained machinery and caches.
* :mod:`zootune.zoo.preprocessing` -- the preprocessing a checkpoint expects (:class:`DataConfig`).
"""

from zootune.zoo.checkpoint import (
    load_state_dict_file,
    read_safetensors_metadata,
    save_state_dict,
    unwrap_state_dict,
)
from zootune.zoo.hub import Hub, as_hub
from zootune.zoo.preprocessing import DataConfig, data_config
from zootune.zoo.pretrained import NotCachedError, is_pretrained_name, load_pretrained
from zootune.zoo.remap import detect_prefix, match_state_dict
from zootune.zoo.zoo import Zoo, checkpoint_stem

__all__ = [
    "DataConfig", "Hub", "NotCachedError", "Zoo", "as_hub", "checkpoint_stem", "data_config", "detect_prefix", "is_pretrained_name",
    "load_pretrained", "load_state_dict_file", "match_state_dict",
    "read_safetensors_metadata", "save_state_dict", "unwrap_state_dict",
]
