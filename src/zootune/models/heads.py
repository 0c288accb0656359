"""Find and replace a model's task head, on any nn.Module.

Methods put a new head for the target task on pretrained backbones. torchvision names it ``fc``
(ResNet) or ``classifier``, timm ``head`` / ``head.fc``; a user's model may use anything, so the
name can always be given explicitly, and otherwise the known names are tried, then the last
``nn.Linear`` registered in the model.
"""

from __future__ import annotations

from torch import nn

from zootune.errors import ZootuneError

KNOWN_HEAD_NAMES = ("fc", "classifier", "head.fc", "head", "last_linear")


def find_head_name(model: nn.Module, head_name: str | None = None) -> str:
    """Dotted name of the model's head module (a Linear, or a module ending in one)."""
    modules = dict(model.named_modules())
    if head_name is not None:
        if head_name not in modules or head_name == "":
            raise ZootuneError(f"model has no module named {head_name!r} to use as the head")
        return head_name
    for name in KNOWN_HEAD_NAMES:
        if isinstance(modules.get(name), nn.Linear):
            return name
    linears = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise ZootuneError(
            f"cannot find a head in {type(model).__name__}: no nn.Linear; pass head_name=... explicitly"
        )
    return linears[-1]


def head_in_features(model: nn.Module, head_name: str | None = None) -> int:
    head = model.get_submodule(find_head_name(model, head_name))
    if isinstance(head, nn.Linear):
        return head.in_features
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ZootuneError(f"head {head_name!r} has no nn.Linear; cannot tell its input size")
    return linears[0].in_features


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` by ``new`` (in place)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def replace_head(model: nn.Module, new_head: nn.Module, head_name: str | None = None) -> str:
    """Swap the model's head for ``new_head`` in place; returns the head's dotted name."""
    name = find_head_name(model, head_name)
    set_submodule(model, name, new_head)
    return name


def new_linear_head(in_features: int, out_features: int, std: float = 0.01) -> nn.Linear:
    """A fresh head as in the Zoo-Tuning reference: weights N(0, std), bias 0."""
    head = nn.Linear(in_features, out_features)
    nn.init.normal_(head.weight, 0.0, std)
    nn.init.zeros_(head.bias)
    return head
