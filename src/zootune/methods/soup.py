"""Uniform model soup of the zoo, then fine-tuning.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time", ICML 2022 (the uniform soup). For every backbone tensor::

    W_soup = (1/m) * sum_i W_i

then a new head is put on the soup and the whole model is fine-tuned like ``finetune``. Members of a
zoo are pretrained on different data, so unlike the fine-tuned soups of the paper their weights need
not lie in one basin; the soup is a cheap baseline whose cost is exactly one model.

Choices (ours):

- The head is not averaged: members' heads belong to different pretraining tasks (they may not even
  have the same size) and are replaced anyway.
- BatchNorm: gamma/beta are averaged like any weight. Running statistics, ``bn_stats="mean"`` (default)
  averages them too -- a uniform soup of the whole state_dict; ``bn_stats="reset"`` sets them to
  mean 0 / variance 1 (as Zoo-Tuning does for its merged BN) so they are re-estimated on the target
  data, since the averaged weights do not produce the averaged statistics. Fine-tuning re-estimates
  them in either case. Integer buffers (``num_batches_tracked``) are taken from the first member.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import nn

from zootune.errors import ZooMismatchError, ZootuneError
from zootune.methods.finetune import FineTune, FineTuneConfig, fine_tune
from zootune.methods.registry import BuildContext, MethodSpec, register_method
from zootune.models.heads import find_head_name

BN_STATS_MODES = ("mean", "reset")


def uniform_soup(
    members: Sequence[nn.Module], head_name: str | None = None, bn_stats: str = "mean"
) -> nn.Module:
    """A copy of ``members[0]`` whose floating-point state (except the head) is the members' mean."""
    if len(members) == 0:
        raise ZootuneError("a soup needs at least one model")
    if bn_stats not in BN_STATS_MODES:
        raise ZootuneError(f"bn_stats must be one of {BN_STATS_MODES}, got {bn_stats!r}")
    head_prefix = find_head_name(members[0], head_name) + "."
    states = [m.state_dict() for m in members]
    soup = copy.deepcopy(members[0])
    averaged = {}
    for key, first in states[0].items():
        if key.startswith(head_prefix) or not first.is_floating_point():
            continue
        for i, state in enumerate(states[1:], start=1):
            if key not in state or state[key].shape != first.shape:
                found = "missing" if key not in state else tuple(state[key].shape)
                raise ZooMismatchError(
                    f"cannot average weights: {key!r} is {tuple(first.shape)} in member 0 but {found} in member {i}"
                )
        # Accumulate in float64 so the mean does not depend on the members' order beyond rounding.
        total = torch.stack([s[key].to(torch.float64) for s in states]).sum(dim=0)
        averaged[key] = (total / len(states)).to(first.dtype)
    soup.load_state_dict(averaged, strict=False)
    if bn_stats == "reset":
        for module in soup.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                module.reset_running_stats()
    return soup


@dataclass
class SoupConfig(FineTuneConfig):
    bn_stats: Literal["mean", "reset"] = "mean"  # running statistics: averaged, or reset to 0/1


def build(ctx: BuildContext) -> FineTune:
    """Uniform soup of the zoo with a new head, fine-tuned like ``finetune``."""
    config = ctx.config or SoupConfig()
    return fine_tune(uniform_soup(list(ctx.zoo), head_name=config.head_name, bn_stats=config.bn_stats),
                     ctx.task, config)


register_method(
    MethodSpec(
        name="soup",
        help="average the members' weights (uniform soup), new head, then fine-tune",
        build=build,
        plain_model=True,
        config=SoupConfig,
    )
)
