"""Where Lite Zoo-Tuning is folded into one plain model (``merge_and_unload``).

In eval, a Lite layer uses the temporal ensemble ā for every input, so its kernel is constant:

    W^l = sum_i ā_i^l T_i^l W_i^l,      b^l = sum_i ā_i^l T_i^l b_i^l,

and the layer is exactly the plain layer (same class as the zoo's) with that weight. Folding every
aggregation layer gives a model of the zoo's architecture (same module classes and state_dict keys
as a member, plus the new head) whose eval outputs equal the Lite model's: inference costs one model.
Full Zoo-Tuning has per-sample gates and cannot be folded.
"""

from __future__ import annotations

import copy

from torch import nn

from zootune.errors import ZootuneError
from zootune.layers import AggregatedLayer


def merge_and_unload(zoo_tuning: nn.Module) -> nn.Module:
    """A new plain model equal (in eval) to the Lite Zoo-Tuning model ``zoo_tuning``.

    The Lite model is left unchanged. Raises :class:`ZootuneError` for full Zoo-Tuning and when a
    folded weight is not finite ("safe merge").
    """
    if not zoo_tuning.config.lite:
        raise ZootuneError(
            "full Zoo-Tuning gates every sample differently and cannot be folded into one plain "
            "model; train with lite=True (method 'lite') for a foldable model")
    layers = [m for m in zoo_tuning.model.modules() if isinstance(m, AggregatedLayer)]
    try:
        # deepcopy's memo substitutes each aggregation layer by its folded plain layer, so the m
        # source banks are never copied.
        memo = {id(layer): layer.to_plain() for layer in layers}
    except FloatingPointError as err:
        raise ZootuneError(f"cannot fold the Lite model: {err} (training diverged?)") from None
    plain = copy.deepcopy(zoo_tuning.model, memo)
    for module in plain.modules():
        if isinstance(module, AggregatedLayer):  # not reached: every layer was substituted
            raise AssertionError("an aggregation layer survived folding")
    return plain.train(zoo_tuning.training)
