"""Map a checkpoint's keys onto an architecture's ``state_dict`` keys.

Pretrained backbones come wrapped in whatever model they were trained in. For a torchvision ResNet-50
the paper's five files hold the backbone keys (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...)

* as they are, plus the ImageNet classifier ``fc.*`` (supervised ImageNet);
* under ``module.encoder_q.`` (MoCo; DataParallel's ``module.`` around the query encoder), next to
  the momentum copy ``module.encoder_k.*`` and the ``module.queue`` / ``module.queue_ptr`` buffers;
* under ``backbone.body.`` (Mask R-CNN, Keypoint R-CNN), next to ``backbone.fpn.*``, ``rpn.*`` and
  ``roi_heads.*``, with FrozenBatchNorm2d, which has no ``num_batches_tracked``;
* under ``backbone.`` (DeepLabV3), next to ``classifier.*`` and ``aux_classifier.*``.

Rather than recognising files, :func:`detect_prefix` finds, for every checkpoint key that ends in an
architecture key, the prefix in front of it, and picks the prefix that covers the most architecture
keys. Ties -- MoCo's ``encoder_q`` and ``encoder_k`` both cover everything -- never go to a prefix
that names a momentum copy (:data:`MOMENTUM_COPY_MARKERS`: the key encoder is an average of the
query encoder, not the network that was trained), and otherwise to the prefix seen first in the
file. ``remap=`` overrides the detection with a prefix or a function.

The head (``fc`` for a ResNet) is never taken from the checkpoint unless asked: a pretraining head
(1000 ImageNet classes, MoCo's 128-d projection) is of no use on a new task, and every method puts a
task head on the backbone anyway. A missing ``num_batches_tracked`` is fine (BN's default momentum
does not use it); any other missing, unexpected or wrongly shaped key is an error naming the file.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping, Union

import torch
from torch import nn

from zootune.errors import CheckpointError, ZootuneError
from zootune.models.heads import KNOWN_HEAD_NAMES

logger = logging.getLogger(__name__)

#: ``"auto"``, a prefix to strip (``""`` for none), or ``key -> new key`` (``None`` drops the key).
Remap = Union[str, Callable[[str], Union[str, None]], None]

OPTIONAL_KEY_SUFFIXES = ("num_batches_tracked",)

# Prefix parts that mark the momentum (EMA) copy in self-supervised checkpoints: MoCo v1/v2
# ``encoder_k``, MoCo v3 ``momentum_encoder``, BYOL ``target_network``/``target_encoder``. File
# order cannot decide between the two copies (safetensors sorts keys, so ``encoder_k`` comes first).
MOMENTUM_COPY_MARKERS = ("encoder_k", "key_encoder", "momentum_encoder", "target_encoder", "target_network")


def is_head_key(key: str, head_name: str | None) -> bool:
    return head_name is not None and (key == head_name or key.startswith(head_name + "."))


def is_optional_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in OPTIONAL_KEY_SUFFIXES


def backbone_shapes(model: nn.Module, head_name: str | None) -> dict[str, torch.Size]:
    """Shapes of the model's state_dict entries, head excluded."""
    return {k: v.shape for k, v in model.state_dict().items() if not is_head_key(k, head_name)}


def detect_prefix(checkpoint_keys: list[str], architecture_keys: set[str]) -> tuple[str, int, list[str]]:
    """The key prefix under which a checkpoint stores an architecture's weights.

    For every checkpoint key ``prefix + k`` with ``k`` an architecture key (split at a ``.``), the
    prefix collects ``k``. Returns ``(best prefix, number of architecture keys it covers, other
    prefixes covering as many)``; among the widest, prefixes naming a momentum copy come last,
    then the order of first appearance in the file decides.
    """
    covered: dict[str, set[str]] = {}
    first_seen: dict[str, int] = {}
    for position, key in enumerate(checkpoint_keys):
        starts = [0] + [i + 1 for i, ch in enumerate(key) if ch == "."]
        for start in starts:
            if key[start:] in architecture_keys:
                prefix = key[:start]
                covered.setdefault(prefix, set()).add(key[start:])
                first_seen.setdefault(prefix, position)
    if not covered:
        return "", 0, []
    width = max(len(keys) for keys in covered.values())
    def rank(prefix: str) -> tuple[bool, int]:
        is_momentum_copy = any(marker in prefix for marker in MOMENTUM_COPY_MARKERS)
        return is_momentum_copy, first_seen[prefix]

    widest = sorted((p for p, keys in covered.items() if len(keys) == width), key=rank)
    return widest[0], width, widest[1:]


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, with the prefix removed; everything else is dropped."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def apply_key_function(
    state: Mapping[str, torch.Tensor], rename: Callable[[str], str | None], origin: str
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    old_key: dict[str, str] = {}  # new key -> the checkpoint key renamed to it
    for key, value in state.items():
        new = rename(key)
        if new is None:
            continue
        if new in out:
            raise CheckpointError(f"{origin}: remap sends both {old_key[new]!r} and {key!r} to {new!r}")
        out[new], old_key[new] = value, key
    return out


def _preview(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _auto_prefix(state: Mapping[str, torch.Tensor], model: nn.Module, shapes: Mapping[str, torch.Size],
                 origin: str) -> str:
    """The prefix :func:`detect_prefix` finds; none at all is an error, a tie is logged."""
    wanted = {k for k in shapes if not is_optional_key(k)}
    prefix, width, tied = detect_prefix(list(state), set(shapes))
    if width == 0:
        raise CheckpointError(
            f"{origin}: none of the {type(model).__name__}'s keys (e.g. {next(iter(wanted), '?')!r}) "
            f"appear in the checkpoint, under any prefix; its keys look like {_preview(list(state), 3)}. "
            "Is it another architecture? Otherwise pass remap= (a prefix or a key function)"
        )
    if tied:
        logger.info("%s: prefixes %r and %s cover the backbone equally; using %r (pass remap= to choose)",
                    origin, prefix, ", ".join(map(repr, tied)), prefix)
    return prefix


def _renamed(state: Mapping[str, torch.Tensor], model: nn.Module, shapes: Mapping[str, torch.Size],
             remap: Remap, origin: str) -> tuple[dict[str, torch.Tensor], str]:
    """(the entries under the architecture's key names, where they were found: for error messages)."""
    if remap == "auto":
        prefix = _auto_prefix(state, model, shapes, origin)
    elif remap is None or isinstance(remap, str):
        prefix = remap or ""
    elif callable(remap):
        return apply_key_function(state, remap, origin), " after remap"
    else:
        raise ZootuneError(f"remap must be 'auto', a prefix string, a callable or None, not {type(remap).__name__}")
    return strip_prefix(state, prefix), f" under prefix {prefix!r}" if prefix else ""


def _check_backbone(body: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size], model: nn.Module,
                    origin: str, where: str) -> None:
    """Every backbone key present (``num_batches_tracked`` may be missing), no other key, same shapes."""
    unexpected = [k for k in body if k not in shapes]
    if unexpected:
        raise CheckpointError(
            f"{origin}: keys{where} that {type(model).__name__} does not have: {_preview(unexpected)} "
            "(a different architecture or depth? pass remap= to rename or drop keys)"
        )
    missing = [k for k in shapes if k not in body and not is_optional_key(k)]
    if missing:
        raise CheckpointError(f"{origin}: backbone keys missing{where}: {_preview(missing)}")
    for key, value in body.items():
        if value.shape != shapes[key]:
            raise CheckpointError(
                f"{origin}: {key} has shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(shapes[key])} in {type(model).__name__} (different width or class count?)"
            )


def match_state_dict(
    state: Mapping[str, torch.Tensor],
    model: nn.Module,
    *,
    head_name: str | None,
    remap: Remap = "auto",
    origin: str = "checkpoint",
    keep_head: bool = False,
) -> dict[str, torch.Tensor]:
    """Checkpoint entries renamed to ``model``'s keys and checked; ready for ``load_state_dict``.

    Args:
        state: flat tensor dict from :func:`zootune.zoo.load_state_dict_file`.
        model: a freshly built instance of the architecture.
        head_name: dotted name of the model's head (its keys are not taken from the checkpoint
            unless ``keep_head`` and their shapes fit).
        remap: ``"auto"`` detects the prefix; a string strips exactly that prefix (keys outside it
            are ignored); ``None`` or ``""`` uses the keys as they are; a callable maps each key to
            the architecture's key or to ``None`` to drop it.
        origin: file name for error messages.

    Raises:
        CheckpointError: a backbone key is missing, an unexpected key remains, or a shape differs.
    """
    shapes = backbone_shapes(model, head_name)
    mapped, where = _renamed(state, model, shapes, remap, origin)
    # A headless architecture (fc = Identity) still drops a checkpoint's classifier by its usual names.
    head_names = [head_name] if head_name is not None else list(KNOWN_HEAD_NAMES)
    in_head = lambda key: any(is_head_key(key, name) for name in head_names)  # noqa: E731
    head_state = {k: v for k, v in mapped.items() if in_head(k)}
    body = {k: v for k, v in mapped.items() if not in_head(k)}
    _check_backbone(body, shapes, model, origin, where)
    if keep_head and head_state:
        model_state = model.state_dict()
        if all(k in model_state and model_state[k].shape == v.shape for k, v in head_state.items()):
            body.update(head_state)
        else:
            logger.info("%s: checkpoint head does not fit the model's head; keeping a fresh head", origin)
    return body
