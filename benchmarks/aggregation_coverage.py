"""What Zoo-Tuning aggregates on torchvision and timm models: the share of each model's parameters
(head excluded) in aggregated layers, with the default targets (convolutions) and with Linear layers
too. Random weights, two members each; needs torchvision and timm (the interop environment):

    .venv-interop/bin/python benchmarks/aggregation_coverage.py
"""

from __future__ import annotations

import argparse
import warnings

import torch

from zootune.methods.zoo_tuning import ZooTuning
from zootune.models import build_model

MODELS = {
    "torchvision:resnet18": {}, "torchvision:resnet50": {}, "torchvision:mobilenet_v3_small": {},
    "torchvision:efficientnet_b0": {}, "torchvision:convnext_tiny": {}, "torchvision:vit_b_16": {"image_size": 32},
    "timm:resnet50": {}, "timm:convnext_atto": {}, "timm:efficientnet_b0": {}, "timm:tf_efficientnet_b0": {},
    "timm:mobilenetv3_small_100": {}, "timm:vit_tiny_patch16_224": {"img_size": 32}, "timm:resnetv2_50x1_bit": {},
}


def coverage(arch: str, kwargs: dict, target_types) -> tuple[float, int]:
    members = []
    for seed in range(2):
        torch.manual_seed(seed)
        members.append(build_model(arch, **kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning says what the table shows
        report = ZooTuning(members, num_outputs=10, target_types=target_types).report
    return report.aggregated_fraction(), len(report.aggregated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated subset of the names below")
    args = parser.parse_args()
    names = args.models.split(",") if args.models else list(MODELS)
    print("| model | aggregated, default (conv) | aggregated, conv + linear |")
    print("|---|---:|---:|")
    for name in names:
        conv, n_conv = coverage(name, MODELS.get(name, {}), ("conv",))
        both, n_both = coverage(name, MODELS.get(name, {}), ("conv", "linear"))
        print(f"| {name} | {100 * conv:.1f}% ({n_conv} layers) | {100 * both:.1f}% ({n_both} layers) |")


if __name__ == "__main__":
    main()
