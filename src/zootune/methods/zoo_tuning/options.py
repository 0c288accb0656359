"""The options of Zoo-Tuning (:class:`ZooTuningOptions`): what a user chooses, checked in one place.

Used by :class:`~zootune.methods.zoo_tuning.model.ZooTuning` (the constructor takes them), by the
registry (``zoo-tuning`` / ``lite`` methods: checked before any work) and by
:mod:`~zootune.methods.zoo_tuning.io` (read back from a saved model's config.json as they are).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from zootune.errors import ZootuneError
from zootune.layers import FORMULATIONS
from zootune.layers.gate import GATE_ACTIVATIONS, GATE_INITS
from zootune.layers.targets import resolve_layer_types

ALIGN_CHOICES = ("kernel>1", "all", "none")
VARIANTS = ("paper", "robust")
NORM_INITS = ("mean", "start")
ROBUST_START_CANDIDATES = 2  # robust variant: a second start, chosen on validation (docs/robustness.md)


def patterns(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)



def _is_lr_scale(value) -> bool:
    """None (the variant's), "auto", a number > 0, or a dict {layer name: number > 0}."""
    if value is None or value == "auto":
        return True
    values = value.values() if isinstance(value, dict) else [value]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
               for v in values)


@dataclass
class ZooTuningOptions:
    """What a user chooses for :class:`ZooTuning` (the ``zoo-tuning``/``lite`` methods' options),
    checked once, here (:class:`zootune.errors.OptionError`); the meaning of each field is on
    :class:`ZooTuning`. What depends on the zoo itself (the number of scores, a member index in
    range) is checked by the constructor. Saved as JSON beside the weights and read back as it is."""

    head_name: str | None = None
    target_types: Sequence[str | type] = ("Conv1d", "Conv2d")
    include: str | list[str] | None = None
    exclude: str | list[str] | None = None
    variant: str = "robust"
    member_scores: list[float] | None = None
    start_member: int | None = None
    start_candidates: int = ROBUST_START_CANDIDATES
    keep_members: list[int] | None = None
    prune_margin: float | None = None
    off_gate: float | None = None
    norm_init: str | None = None
    align: str = "kernel>1"
    gate: str | None = None
    gate_init: str = "zero"
    keep_bn_stats: bool = False
    lite_momentum: float = 0.9
    formulation: str = "auto"
    bank_lr_scale: str | float | dict[str, float] = "auto"
    gate_lr_scale: str | float | dict[str, float] | None = None
    align_lr_scale: str | float | dict[str, float] | None = None
    align_weight_decay: float | None = None

    def __post_init__(self):
        from zootune.errors import OptionError
        from zootune.options import require

        try:
            self.target_types = [t.__name__ for t in resolve_layer_types(self.target_types)]
        except ZootuneError as err:
            raise OptionError(str(err)) from None
        self.include, self.exclude = patterns(self.include), patterns(self.exclude)
        require(self.variant in VARIANTS, f"variant must be one of {VARIANTS}, got {self.variant!r}")
        require(self.align in ALIGN_CHOICES, f"align must be one of {ALIGN_CHOICES}, got {self.align!r}")
        require(self.gate is None or self.gate in GATE_ACTIVATIONS,
                f"gate must be one of {GATE_ACTIVATIONS}, got {self.gate!r}")
        require(self.gate_init in GATE_INITS, f"gate_init must be one of {GATE_INITS}, got {self.gate_init!r}")
        require(self.formulation == "auto" or self.formulation in FORMULATIONS,
                f"formulation must be 'auto' or one of {FORMULATIONS}, got {self.formulation!r}")
        require(self.norm_init is None or self.norm_init in NORM_INITS,
                f"norm_init must be one of {NORM_INITS}, got {self.norm_init!r}")
        require(0.0 <= self.lite_momentum < 1.0, f"lite_momentum must be in [0, 1), got {self.lite_momentum}")
        require(self.bank_lr_scale is not None and _is_lr_scale(self.bank_lr_scale),
                f"bank_lr_scale must be 'auto', a number > 0 or a dict of them, got {self.bank_lr_scale!r}")
        for name in ("gate_lr_scale", "align_lr_scale"):
            value = getattr(self, name)
            require(_is_lr_scale(value), f"{name} must be 'auto', a number > 0 or a dict of them, got {value!r}")
        require(self.align_weight_decay is None or self.align_weight_decay >= 0,
                f"align_weight_decay must be >= 0, got {self.align_weight_decay}")
        require(self.prune_margin is None or self.prune_margin >= 0,
                f"prune_margin must be >= 0, got {self.prune_margin}")
        require(isinstance(self.start_candidates, int) and self.start_candidates >= 1,
                f"start_candidates must be an integer >= 1, got {self.start_candidates!r}")
        require(self.start_member is None or self.start_member >= 0,
                f"start_member must be a member index >= 0, got {self.start_member}")
        if self.member_scores is not None:
            self.member_scores = [float(v) for v in self.member_scores]
            require(all(math.isfinite(v) for v in self.member_scores),
                    f"member_scores must be finite numbers, got {self.member_scores}")
        if self.keep_members is not None:
            self.keep_members = [int(i) for i in self.keep_members]
            require(bool(self.keep_members) and min(self.keep_members) >= 0,
                    f"keep_members must be member indices >= 0, got {self.keep_members}")

    def to_dict(self) -> dict:
        return asdict(self)
