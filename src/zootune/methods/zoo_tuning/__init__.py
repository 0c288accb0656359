"""Zoo-Tuning and Lite Zoo-Tuning (Shu et al., ICML 2021).

- :mod:`~zootune.methods.zoo_tuning.model`: :class:`ZooTuning`, the zoo turned into one model;
- :mod:`~zootune.methods.zoo_tuning.fold`: Lite folding, ``merge_and_unload``;
- :mod:`~zootune.methods.zoo_tuning.io`: save/load of Zoo-Tuning and folded models;
- the layers themselves are in :mod:`zootune.layers`.

Registers the methods ``zoo-tuning`` and ``lite``.
"""

from __future__ import annotations

from zootune.methods.registry import BuildContext, MethodSpec, register_method
from zootune.methods.zoo_tuning.fold import merge_and_unload
from zootune.methods.zoo_tuning.io import load_folded, save_folded, save_pretrained
from zootune.methods.zoo_tuning.model import ZooTuning, ZooTuningConfig
from zootune.methods.zoo_tuning.start import rank_if_robust, score_members

from zootune.models.heads import head_in_features

load_pretrained = ZooTuning.load_pretrained


def _builder(lite: bool, variant: str | None = None):
    def build(ctx: BuildContext) -> ZooTuning:
        options = dict(ctx.config or {})
        if variant is not None:
            options["variant"] = variant
        options = rank_if_robust(ctx, options)
        head = ctx.task.make_head(head_in_features(ctx.zoo[0], options.get("head_name")))
        return ZooTuning(ctx.zoo, head=head, lite=lite, **options)

    return build


# Options are ZooTuning's keyword arguments, less what build sets itself.
_OPTIONS = dict(options_of=ZooTuning.__init__, reports_gates=True)
_SET_BY_BUILD = ("zoo", "head", "num_outputs", "lite")
register_method(MethodSpec(
    name="zoo-tuning",
    help="Zoo-Tuning: all sources' kernels trained and mixed per sample by gates (ICML 2021); robust "
         "variant by default: starts on the member ranked best on the target (variant=paper: as published)",
    build=_builder(lite=False),
    options_exclude=_SET_BY_BUILD,
    **_OPTIONS,
))
register_method(MethodSpec(
    name="lite",
    help="Lite Zoo-Tuning: batch-shared gates, folded into one plain model for inference (robust by default)",
    build=_builder(lite=True),
    plain_model=True,
    options_exclude=_SET_BY_BUILD,
    **_OPTIONS,
))
# The published method under its own names, so that one `zootune run` reports both starts side by side.
register_method(MethodSpec(
    name="zoo-tuning-paper",
    help="Zoo-Tuning exactly as published: uniform start (= zoo-tuning with variant=paper)",
    build=_builder(lite=False, variant="paper"),
    options_exclude=(*_SET_BY_BUILD, "variant"),
    **_OPTIONS,
))
register_method(MethodSpec(
    name="lite-paper",
    help="Lite Zoo-Tuning exactly as published: uniform start (= lite with variant=paper)",
    build=_builder(lite=True, variant="paper"),
    plain_model=True,
    options_exclude=(*_SET_BY_BUILD, "variant"),
    **_OPTIONS,
))

__all__ = ["ZooTuning", "ZooTuningConfig", "load_folded", "load_pretrained", "merge_and_unload",
           "save_folded", "save_pretrained"]
