"""Training the zoo's architecture from random initialisation: the "does the zoo help at all?" row.

The paper's Table 2 reports it, and it matters: a member whose pretraining does not suit the target
can transfer *negatively* (fine-tuning it ends below training from scratch). The model is the zoo's
architecture, freshly initialised from the run's seed (by the zoo's own builder when it has one, so
the architecture's own initialisation is used; else each layer's ``reset_parameters``), with the
task's new head, trained by the same engine, optimiser and budget as every other method.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from zootune.errors import ZootuneError
from zootune.methods.finetune import FineTune, FineTuneConfig, fine_tune
from zootune.methods.registry import BuildContext, MethodSpec, register_method


def fresh_model(zoo, seed: int) -> nn.Module:
    """A randomly initialised instance of the zoo's architecture, drawn from ``seed``."""
    if len(zoo) == 0:
        raise ZootuneError("the zoo is empty: give at least one model")
    new_model = getattr(zoo, "new_model", None)
    if callable(new_model):
        return new_model(seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = copy.deepcopy(zoo[0])
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return model


def build(ctx: BuildContext) -> FineTune:
    return fine_tune(fresh_model(ctx.zoo, ctx.seed), ctx.task, ctx.config)


register_method(
    MethodSpec(
        name="scratch",
        help="the zoo's architecture trained from random initialisation (no transfer): does the zoo help?",
        build=build,
        plain_model=True,
        config=FineTuneConfig,
    )
)
