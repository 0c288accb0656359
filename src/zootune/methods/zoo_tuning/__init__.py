"""Zoo-Tuning and Lite Zoo-Tuning (Shu et al., ICML 2021).

- :mod:`~zootune.methods.zoo_tuning.model`: :class:`ZooTuning`, the zoo turned into one model;
- :mod:`~zootune.methods.zoo_tuning.fold`: Lite folding, ``merge_and_unload``;
- :mod:`~zootune.methods.zoo_tuning.io`: save/load of Zoo-Tuning and folded models (model folders, :mod:`zootune.model_dir`);
- the layers themselves are in :mod:`zootune.layers`.

Registers the methods ``zoo-tuning`` and ``lite``.
"""

from __future__ import annotations

from dataclasses import dataclass

from zootune.methods.registry import BuildContext, MethodSpec, register_method
from zootune.methods.zoo_tuning.fold import merge_and_unload
from zootune.methods.zoo_tuning.io import load_folded, save_folded, save_pretrained
from zootune.methods.zoo_tuning.model import ZooTuning, ZooTuningConfig
from zootune.methods.zoo_tuning.options import ZooTuningOptions
from zootune.methods.zoo_tuning.start import rank, rank_if_robust, score_members
from zootune.models.heads import head_in_features
from zootune.options import require

load_pretrained = ZooTuning.load_pretrained


@dataclass
class PaperOptions(ZooTuningOptions):
    """The options of ``zoo-tuning-paper``/``lite-paper``: the published method, uniform start."""

    variant: str = "paper"

    def __post_init__(self):
        super().__post_init__()
        require(self.variant == "paper", "this is the published method (variant 'paper'); the robust one is "
                                         "method zoo-tuning / lite")


def _builder(lite: bool):
    def build(ctx: BuildContext) -> ZooTuning:
        options = rank_if_robust(ctx, ctx.config or ZooTuningOptions())
        head = ctx.task.make_head(head_in_features(ctx.zoo[0], options.head_name))
        return ZooTuning(ctx.zoo, head=head, options=options, lite=lite)

    return build


def candidate_starts(ctx: BuildContext) -> list[dict]:
    """The robust variant's further starts (``start_candidates`` > 1): the members ranked 2nd, 3rd, ...
    by the first build's ranking, each as ``{"member_scores", "start_member"}``; the experiment trains
    each and keeps the best on validation. None for the paper's variant or a start the user chose."""
    options = ctx.config or ZooTuningOptions()
    scores = ctx.resolved.get("member_scores", options.member_scores)
    if options.variant != "robust" or options.start_member is not None or scores is None:
        return []
    order = rank(scores)
    return [{"member_scores": list(scores), "start_member": order[k]}
            for k in range(1, min(options.start_candidates, len(order)))]


register_method(MethodSpec(
    name="zoo-tuning",
    help="Zoo-Tuning: all sources' kernels trained and mixed per sample by gates (ICML 2021); robust "
         "variant by default: starts on the member ranked best on the target (variant=paper: as published)",
    build=_builder(lite=False),
    config=ZooTuningOptions,
    reports_gates=True,
    layer_types_option="target_types",
    candidates=candidate_starts,
))
register_method(MethodSpec(
    name="lite",
    help="Lite Zoo-Tuning: batch-shared gates, folded into one plain model for inference (robust by default)",
    build=_builder(lite=True),
    config=ZooTuningOptions,
    reports_gates=True,
    layer_types_option="target_types",
    plain_model=True,
    candidates=candidate_starts,
))
# The published method under its own names, so that one `zootune run` reports both starts side by side.
register_method(MethodSpec(
    name="zoo-tuning-paper",
    help="Zoo-Tuning exactly as published: uniform start (= zoo-tuning with variant=paper)",
    build=_builder(lite=False),
    config=PaperOptions,
    reports_gates=True,
    layer_types_option="target_types",
))
register_method(MethodSpec(
    name="lite-paper",
    help="Lite Zoo-Tuning exactly as published: uniform start (= lite with variant=paper)",
    build=_builder(lite=True),
    config=PaperOptions,
    reports_gates=True,
    layer_types_option="target_types",
    plain_model=True,
))

__all__ = ["ZooTuning", "ZooTuningConfig", "ZooTuningOptions", "PaperOptions", "score_members", "load_folded", "load_pretrained", "merge_and_unload",
           "save_folded", "save_pretrained"]
