"""The Q-network of every RL zoo agent: MinAtar's standard small network on padded observations.

Young & Tian (2019), "MinAtar: An Atari-Inspired Testbed for Thorough and Reproducible
Reinforcement Learning Experiments", DQN network::

    Q(s, .) = W_head ReLU(W_hidden flatten(ReLU(conv3x3_16(s))) + b_hidden) + b_head

with a 3x3 convolution of 16 channels (stride 1, no padding: 10x10 -> 8x8), a hidden Linear of 128
units and a head of one output per action. Inputs are the padded (10, 10, 10) observations of
:mod:`zootune.rl.envs`. The head is named ``head`` so that :func:`zootune.models.heads.find_head_name`
finds it and every zoo method replaces it like a classifier.
"""

from __future__ import annotations

import torch
from torch import nn

from zootune.rl.envs import GRID, NUM_ACTIONS, NUM_CHANNELS

ARCH_NAME = "minatar_qnet"  # registered (with its option table) in zootune.models


class MinAtarQNet(nn.Module):
    """conv 3x3 (16) -> ReLU -> flatten -> Linear 128 -> ReLU -> Linear ``num_actions``."""

    def __init__(self, num_actions: int = NUM_ACTIONS, in_chans: int = NUM_CHANNELS, hidden: int = 128,
                 conv_channels: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, conv_channels, kernel_size=3, stride=1)
        self.hidden = nn.Linear(conv_channels * (GRID - 2) ** 2, hidden)
        self.head = nn.Linear(hidden, num_actions)
        self.num_features = hidden

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        return torch.relu(self.hidden(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def minatar_qnet(num_classes: int = NUM_ACTIONS, **kwargs) -> MinAtarQNet:
    """Builder in the ``build_model`` convention (``num_classes`` = number of actions)."""
    return MinAtarQNet(num_actions=num_classes, **kwargs)
