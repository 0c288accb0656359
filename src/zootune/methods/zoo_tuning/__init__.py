"""Zoo-Tuning and Lite Zoo-Tuning (Shu et al., ICML 2021).

- :mod:`~zootune.methods.zoo_tuning.model`: :class:`ZooTuning`, the zoo turned into one model;
- :mod:`~zootune.methods.zoo_tuning.fold`: Lite folding, ``merge_and_unload``;
- :mod:`~zootune.methods.zoo_tuning.io`: save/load of Zoo-Tuning and folded models;
- the layers themselves are in :mod:`zootune.layers`.

Registers the methods ``zoo-tuning`` and ``lite``.
"""

from __future__ import annotations

from zootune.methods.registry import MethodSpec, register_method
from zootune.methods.zoo_tuning.fold import merge_and_unload
from zootune.methods.zoo_tuning.io import load_folded, load_pretrained, save_folded, save_pretrained
from zootune.methods.zoo_tuning.model import ZooTuning, ZooTuningConfig
from zootune.models.heads import head_in_features


def _builder(lite: bool):
    def build(zoo, task, *, member=None, fitted=None, **options):
        del member, fitted  # Zoo-Tuning uses the whole zoo and no previously fitted model
        head = task.make_head(head_in_features(zoo[0], options.get("head_name")))
        return ZooTuning(zoo, head=head, lite=lite, **options)

    return build


register_method(MethodSpec(
    name="zoo-tuning",
    help="Zoo-Tuning: all sources' kernels trained and mixed per sample by gates (ICML 2021)",
    build=_builder(lite=False),
))
register_method(MethodSpec(
    name="lite",
    help="Lite Zoo-Tuning: batch-shared gates, folded into one plain model for inference",
    build=_builder(lite=True),
))

__all__ = ["ZooTuning", "ZooTuningConfig", "load_folded", "load_pretrained", "merge_and_unload",
           "save_folded", "save_pretrained"]
