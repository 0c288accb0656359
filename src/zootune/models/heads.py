"""Find and replace a model's task head, on any nn.Module.

Methods put a new head for the target task on pretrained backbones. torchvision names it ``fc``
(ResNet) or ``classifier``, timm ``head`` / ``head.fc``; a user's model may use anything, so the
name can always be given explicitly (``head_name=``). Otherwise the known names are tried, then the
model's final layer if it is a Linear or a 1x1 convolution (BiT's ``head.fc``, SqueezeNet's
classifier: a pointwise conv on pooled features), then the last ``nn.Linear`` registered.

A head that is a 1x1 convolution is replaced by a 1x1 convolution: a new Linear head (what tasks
make) is converted to the equivalent pointwise conv (same weights), so the model keeps its layout
(the layer after it, e.g. a Flatten, still sees a map) and its state_dict loads into the library's
own model built with that many classes.
"""

from __future__ import annotations

from torch import nn

from zootune.errors import ZootuneError
from zootune.layers.wrapper import set_submodule  # noqa: F401 - re-exported: heads are set with it

KNOWN_HEAD_NAMES = ("fc", "classifier", "head.fc", "head", "last_linear")
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_pointwise_conv(module: nn.Module | None) -> bool:
    """A Conv1d/2d/3d with a 1x1 kernel, stride 1, no groups: a Linear map over channels."""
    return (isinstance(module, _CONV_TYPES) and all(k == 1 for k in module.kernel_size)
            and all(s == 1 for s in module.stride) and module.groups == 1)


def _is_head_layer(module: nn.Module | None) -> bool:
    return isinstance(module, nn.Linear) or is_pointwise_conv(module)


def find_head_name(model: nn.Module, head_name: str | None = None) -> str:
    """Dotted name of the model's head module (a Linear or a final 1x1 conv, or a module holding one)."""
    modules = dict(model.named_modules())
    if head_name is not None:
        if head_name not in modules or head_name == "":
            raise ZootuneError(f"model has no module named {head_name!r} to use as the head")
        return head_name
    for name in KNOWN_HEAD_NAMES:
        if _is_head_layer(modules.get(name)):
            return name
    # The final layer: the last registered module with parameters of its own.
    with_params = [name for name, m in modules.items() if next(m.parameters(recurse=False), None) is not None]
    if with_params and _is_head_layer(modules[with_params[-1]]):
        return with_params[-1]
    linears = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise ZootuneError(
            f"cannot find a head in {type(model).__name__}: no nn.Linear and no final 1x1 convolution; "
            "pass head_name=... (the dotted name of the head layer) explicitly"
        )
    return linears[-1]


def head_in_features(model: nn.Module, head_name: str | None = None) -> int:
    """Input features of the head: a Linear's ``in_features``, a 1x1 conv's ``in_channels``."""
    name = find_head_name(model, head_name)
    head = model.get_submodule(name)
    layers = [head] if _is_head_layer(head) else [m for m in head.modules() if _is_head_layer(m)]
    if not layers:
        raise ZootuneError(f"head {name!r} has no nn.Linear or 1x1 convolution; cannot tell its input size")
    first = layers[0]
    return first.in_features if isinstance(first, nn.Linear) else first.in_channels


def fit_head_to(old_head: nn.Module, new_head: nn.Module) -> nn.Module:
    """``new_head`` shaped to take ``old_head``'s place: a Linear replacing a 1x1 conv becomes the
    equivalent 1x1 conv (same weights and bias, same device and dtype); anything else is unchanged."""
    if not (is_pointwise_conv(old_head) and isinstance(new_head, nn.Linear)):
        return new_head
    dims = len(old_head.kernel_size)
    conv = type(old_head) if type(old_head) in _CONV_TYPES else _CONV_TYPES[dims - 1]
    weight = new_head.weight
    pointwise = conv(new_head.in_features, new_head.out_features, 1, bias=new_head.bias is not None,
                     device=weight.device, dtype=weight.dtype)
    pointwise.weight.data.copy_(weight.detach().view(*weight.shape, *(1,) * dims))
    if new_head.bias is not None:
        pointwise.bias.data.copy_(new_head.bias.detach())
    pointwise.train(new_head.training)
    return pointwise




def replace_head(model: nn.Module, new_head: nn.Module, head_name: str | None = None) -> str:
    """Swap the model's head for ``new_head`` in place (a Linear replacing a 1x1 conv head becomes
    that conv, :func:`fit_head_to`); returns the head's dotted name."""
    name = find_head_name(model, head_name)
    set_submodule(model, name, fit_head_to(model.get_submodule(name), new_head))
    return name


def new_linear_head(in_features: int, out_features: int, std: float = 0.01) -> nn.Linear:
    """A fresh head as in the Zoo-Tuning reference: weights N(0, std), bias 0."""
    head = nn.Linear(in_features, out_features)
    nn.init.normal_(head.weight, 0.0, std)
    nn.init.zeros_(head.bias)
    return head
