"""PAC-Net's Prune step: magnitude masks.

For a weight tensor (or, with ``scope="global"``, all pruned weights taken together) of ``n``
entries and ``prune_fraction`` f, the ``k = round(f * n)`` entries of smallest ``|w|`` are
*pruned* (mask 0) and the other ``n - k`` are *essential* (mask 1)::

    m_i = 1  if |w_i| is not among the k smallest magnitudes,  else 0.

``prune_fraction`` is the fraction REMOVED from the source task (the paper's reported 0.8 is read
as "80 % of the weights are pruned and later calibrated on the target"). Ties in ``|w|`` are broken
by position (a stable sort), so the masks are deterministic and the count is exact.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from zootune.errors import ZootuneError

SCOPES = ("layer", "global")


def check_prune_fraction(prune_fraction: float) -> float:
    fraction = float(prune_fraction)
    if not 0.0 < fraction < 1.0:
        raise ZootuneError(
            f"prune_fraction must be in (0, 1) -- the fraction of weights REMOVED from the source task "
            f"(e.g. 0.8 keeps 20 %), got {prune_fraction!r}"
        )
    return fraction


def _prune_smallest(magnitudes: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """Flat bool mask, False at the ``num_pruned`` smallest entries of the flat ``magnitudes``."""
    keep = torch.ones(magnitudes.numel(), dtype=torch.bool)
    order = torch.argsort(magnitudes, stable=True)
    keep[order[:num_pruned]] = False
    return keep


def magnitude_masks(
    weights: Mapping[str, torch.Tensor], prune_fraction: float, scope: str = "layer"
) -> dict[str, torch.Tensor]:
    """Essential-weight masks (bool, ``True`` = essential / kept for the source task).

    Args:
        weights: name -> weight tensor to prune.
        prune_fraction: fraction of entries REMOVED, in (0, 1).
        scope: ``"layer"`` prunes ``round(f * n_l)`` entries in every tensor, so no layer can be
            emptied; ``"global"`` ranks all entries of all tensors together and prunes
            ``round(f * sum_l n_l)`` in total (layers with small weights lose more).
    """
    fraction = check_prune_fraction(prune_fraction)
    if scope not in SCOPES:
        raise ZootuneError(f"pruning scope must be one of {SCOPES}, got {scope!r}")
    if not weights:
        raise ZootuneError("nothing to prune: no weight matched the layer types or names given")
    flat = {name: w.detach().abs().flatten().float().cpu() for name, w in weights.items()}
    if scope == "layer":
        keep = {name: _prune_smallest(m, round(fraction * m.numel())) for name, m in flat.items()}
    else:
        joined = torch.cat(list(flat.values()))
        keep_all = _prune_smallest(joined, round(fraction * joined.numel()))
        keep = dict(zip(flat, torch.split(keep_all, [m.numel() for m in flat.values()])))
    return {name: keep[name].view(w.shape).to(w.device) for name, w in weights.items()}
