"""What each registered architecture may be given: one option table per architecture.

A table is a dataclass: its fields are the options a builder takes (name, type, the builder's own
default), its ``__post_init__`` checks their ranges, and ``fixed`` names the builder arguments that
the architecture sets itself (``resnet10_small`` is ``resnet_small`` with ``depth=10``), which are
refused. :func:`zootune.options.check_kwargs` checks ``--arch-option`` values and a model folder's
``arch_kwargs`` against the table before anything is built, so that a wrong option is one line naming
the architecture, the option and what is valid -- not a traceback from inside the builder.

``timm:NAME``, ``torchvision:NAME``, ``module:function`` and architectures registered without a table
are checked against their builder's signature only: names and annotated types where it declares them,
nothing where it takes ``**kwargs``; the builder reports the rest itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from zootune.options import require


def _require_positive(table, *names: str) -> None:
    for name in names:
        value = getattr(table, name)
        require(value >= 1, f"{name} must be >= 1, got {value}")


@dataclass
class TorchvisionResNetOptions:
    """``resnet18`` / ``resnet34`` / ``resnet50`` / ``resnet101``: the block type and the number of
    blocks per stage are the name's."""

    fixed: ClassVar[tuple[str, ...]] = ("block", "layers")
    num_classes: int = 1000
    widths: tuple[int, ...] = (64, 128, 256, 512)
    small_input: bool = False
    in_chans: int = 3

    def __post_init__(self) -> None:
        _require_positive(self, "num_classes", "in_chans")
        require(len(self.widths) == 4 and min(self.widths) >= 1,
                f"widths must be four channel counts >= 1 (one per stage), got {list(self.widths)}")


@dataclass
class ResNetSmallFixedDepthOptions:
    """``resnet10_small`` / ``resnet18_small``: ``resnet_small`` with the depth of the name."""

    fixed: ClassVar[tuple[str, ...]] = ("depth",)
    num_classes: int = 10
    width: int = 16
    in_chans: int = 3

    def __post_init__(self) -> None:
        _require_positive(self, "num_classes", "width", "in_chans")


@dataclass
class ResNetSmallOptions(ResNetSmallFixedDepthOptions):
    """``resnet_small``: 10 or 18 layers, stage widths ``width * (1, 2, 4, 8)``."""

    fixed: ClassVar[tuple[str, ...]] = ()
    depth: Literal[10, 18] = 10


@dataclass
class MiniZooResNetOptions:
    """``minizoo_resnet10_w8``: the MiniZoo members' ``resnet_small`` (depth 10, width 8 are the name's)."""

    fixed: ClassVar[tuple[str, ...]] = ("depth", "width")
    num_classes: int = 10
    in_chans: int = 3

    def __post_init__(self) -> None:
        _require_positive(self, "num_classes", "in_chans")


@dataclass
class PatchTokenOptions:
    """What the token models share: square patches of a square image, ``dim`` channels, ``depth`` blocks."""

    fixed: ClassVar[tuple[str, ...]] = ()
    num_classes: int = 10
    img_size: int = 32
    patch_size: int = 4
    dim: int = 64
    depth: int = 4
    in_chans: int = 3

    def __post_init__(self) -> None:
        _require_positive(self, "num_classes", "img_size", "patch_size", "dim", "depth", "in_chans")
        require(self.img_size % self.patch_size == 0,
                f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")


@dataclass
class ViTOptions(PatchTokenOptions):
    """``vit_tiny32`` (:class:`zootune.models.vit.VisionTransformer`)."""

    num_heads: int = 4
    mlp_ratio: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_positive(self, "num_heads")
        require(self.dim % self.num_heads == 0, f"dim {self.dim} must be a multiple of num_heads {self.num_heads}")
        require(math.isfinite(self.mlp_ratio) and self.dim * self.mlp_ratio >= 1,
                f"mlp_ratio must be finite with dim * mlp_ratio >= 1, got {self.mlp_ratio}")


@dataclass
class MixerOptions(PatchTokenOptions):
    """``mixer_tiny32`` (:class:`zootune.models.mixer.MLPMixer`)."""

    token_hidden: int = 32
    channel_hidden: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_positive(self, "token_hidden", "channel_hidden")


@dataclass
class MinAtarQNetOptions:
    """``minatar_qnet`` (:class:`zootune.rl.qnet.MinAtarQNet`); ``num_classes`` is the number of actions.
    The defaults are :mod:`zootune.rl.envs`' 6 actions and 10 channels, written out so that this table
    is known without importing the RL package."""

    fixed: ClassVar[tuple[str, ...]] = ("num_actions",)
    num_classes: int = 6
    in_chans: int = 10
    hidden: int = 128
    conv_channels: int = 16

    def __post_init__(self) -> None:
        _require_positive(self, "num_classes", "in_chans", "hidden", "conv_channels")


# architecture name -> its option table (every architecture registered in zootune.models)
ARCH_OPTIONS: dict[str, type] = {
    **dict.fromkeys(("resnet18", "resnet34", "resnet50", "resnet101"), TorchvisionResNetOptions),
    "resnet_small": ResNetSmallOptions,
    "resnet10_small": ResNetSmallFixedDepthOptions,
    "resnet18_small": ResNetSmallFixedDepthOptions,
    "minizoo_resnet10_w8": MiniZooResNetOptions,
    "vit_tiny32": ViTOptions,
    "mixer_tiny32": MixerOptions,
    "minatar_qnet": MinAtarQNetOptions,
}
