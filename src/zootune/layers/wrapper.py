"""Layers that replace a model's layer in place and can give it back (PEFT's tuner-layer pattern).

A :class:`LayerWrapper` keeps the layer it replaced as ``base_layer`` and implements
:meth:`LayerWrapper.merge`: the plain layer -- ``base_layer``'s own class -- with what was learned
folded in. Every method that changes a model in place goes through the same two paths: in,
:func:`replace_layer`; out, :func:`merge_and_unload` (a plain copy of the model, wrappers merged; the
model itself is left as it is). Zoo-Tuning's aggregation layers (:class:`zootune.layers.AggregatedLayer`),
Knowledge Flow's flow points and PAC-Net's masked layers are wrappers.
"""

from __future__ import annotations

import copy

from torch import nn


class LayerWrapper(nn.Module):
    """A layer standing in for ``base_layer``; :meth:`merge` gives the plain layer back."""

    base_layer: nn.Module

    def merge(self, **kwargs) -> nn.Module:
        """A new plain layer of ``base_layer``'s class computing what this wrapper computes (or
        what it has learned, for wrappers whose extra inputs go away); raises when it cannot."""
        raise NotImplementedError


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` by ``new`` (in place)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def replace_layer(model: nn.Module, name: str, wrapper: LayerWrapper) -> LayerWrapper:
    """Put ``wrapper`` in place of the layer at dotted ``name`` (in place); returns the wrapper."""
    set_submodule(model, name, wrapper)
    return wrapper


def wrapped_layers(model: nn.Module) -> dict[str, LayerWrapper]:
    """The outermost wrappers of ``model`` by dotted name."""
    found: dict[str, LayerWrapper] = {}
    for name, module in model.named_modules():
        if isinstance(module, LayerWrapper) and not any(name.startswith(f"{outer}.") for outer in found):
            found[name] = module
    return found


def merge_and_unload(model: nn.Module, **merge_kwargs) -> nn.Module:
    """A copy of ``model`` with every wrapper replaced by ``wrapper.merge(**merge_kwargs)``.

    ``model`` is not changed. The copy is made with a deepcopy whose memo already maps each wrapper
    to its merged layer, so what a wrapper holds (Zoo-Tuning's m source banks) is never copied.
    """
    memo = {id(wrapper): wrapper.merge(**merge_kwargs) for wrapper in wrapped_layers(model).values()}
    plain = copy.deepcopy(model, memo)
    left = [name for name, module in plain.named_modules() if isinstance(module, LayerWrapper)]
    if left:  # a merge that returned a wrapper
        raise AssertionError(f"wrappers left after merging: {left}")
    return plain.train(model.training)


__all__ = ["LayerWrapper", "merge_and_unload", "replace_layer", "set_submodule", "wrapped_layers"]
