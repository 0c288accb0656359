"""Layers of the zoo methods, one concept per file.

- :mod:`~zootune.layers.gate`: the per-sample gate a(h) of Zoo-Tuning;
- :mod:`~zootune.layers.align`: channel alignment T_i of the source kernels;
- :mod:`~zootune.layers.aggregate`: the aggregation layer (sum_i a_i T_i W_i) * h and its exact
  formulations (grouped conv, batched matmul, stacked input, mixed outputs, shared kernel);
- :mod:`~zootune.layers.autotune`: :func:`tune`, the explicit step that chooses each layer's
  formulation (timed, or by multiply-adds) before training (the layers' preparation hook for the
  engine); :mod:`~zootune.layers.formulation_cache`: this machine's timed choices, reused by later runs.
"""

from zootune.layers.aggregate import FORMULATIONS, AggregatedLayer, is_aggregatable
from zootune.layers.align import ChannelAlign
from zootune.layers.autotune import tune
from zootune.layers.gate import Gate

__all__ = ["FORMULATIONS", "AggregatedLayer", "ChannelAlign", "Gate", "is_aggregatable", "tune"]
