"""Where Lite Zoo-Tuning is folded into one plain model (``merge_and_unload``).

In eval, a Lite layer uses the temporal ensemble ā for every input, so its kernel is constant:

    W^l = sum_i ā_i^l T_i^l W_i^l,      b^l = sum_i ā_i^l T_i^l b_i^l,

and the layer is exactly the plain layer (same class as the zoo's) with that weight. Folding every
aggregation layer gives a model of the zoo's architecture (same module classes and state_dict keys
as a member, plus the new head) whose eval outputs equal the Lite model's: inference costs one model.
Full Zoo-Tuning has per-sample gates and cannot be folded.
"""

from __future__ import annotations

from torch import nn

from zootune.errors import ZootuneError
from zootune.layers.wrapper import merge_and_unload as unload


def merge_and_unload(zoo_tuning: nn.Module) -> nn.Module:
    """A new plain model equal (in eval) to the Lite Zoo-Tuning model ``zoo_tuning``, through the one
    unload path (:func:`zootune.layers.wrapper.merge_and_unload`: each aggregation layer's ``merge``).

    The Lite model is left unchanged. Raises :class:`ZootuneError` for full Zoo-Tuning and when a
    folded weight is not finite ("safe merge").
    """
    if not zoo_tuning.config.lite:
        raise ZootuneError(
            "full Zoo-Tuning gates every sample differently and cannot be folded into one plain "
            "model; train with lite=True (method 'lite') for a foldable model")
    try:
        return unload(zoo_tuning.model)
    except FloatingPointError as err:
        raise ZootuneError(f"cannot fold the Lite model: {err} (training diverged?)") from None
