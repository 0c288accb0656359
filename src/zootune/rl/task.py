"""The RL task: a Q head, the DQN loss and the TD-error metric, as a :class:`zootune.tasks.Task`.

Zoo methods only ask a task for a head (``make_head``), so with this task the same builders that
make classifiers (fine-tune, Zoo-Tuning, Lite) make Q-networks, with no RL special case inside them.

Targets of a batch are a (B, 2) float tensor: column 0 the action a_b taken, column 1 the TD target
y_b = r_b + gamma (1 - done_b) max_a' Q_target(s'_b, a'). The loss is the Huber loss of the chosen
action's value (Mnih et al., 2015; MinAtar's DQN uses it too)::

    L = mean_b huber(Q(s_b, a_b) - y_b),   huber(d) = d^2 / 2 if |d| <= 1 else |d| - 1/2.

The metric over a batch is the mean absolute TD error (lower is better); the number reported for an
agent is its return, measured by playing episodes (:func:`zootune.rl.dqn.evaluate_policy`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zootune.errors import DataError
from zootune.models.heads import new_linear_head
from zootune.rl.envs import NUM_ACTIONS
from zootune.tasks import Task


class RLTask(Task):
    """Q-learning on a game with ``num_actions`` actions (6 for every MinAtar game)."""

    metric_name = "td_error"
    higher_is_better = False

    def __init__(self, num_actions: int = NUM_ACTIONS):
        if num_actions < 2:
            raise DataError(f"a Q-network needs at least 2 actions, got {num_actions}")
        self.num_actions = num_actions

    def make_head(self, in_features: int) -> nn.Module:
        # N(0, 0.01) like the classification head: initial Q-values near 0 for every action
        return new_linear_head(in_features, self.num_actions)

    @staticmethod
    def chosen_values(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Q(s_b, a_b): the output of the action in ``targets[:, 0]``."""
        return outputs.gather(1, targets[:, 0].long().unsqueeze(1)).squeeze(1)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.smooth_l1_loss(self.chosen_values(outputs, targets), targets[:, 1], beta=1.0)

    def metric_sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
        error = (self.chosen_values(outputs, targets) - targets[:, 1]).abs()
        return float(error.sum()), int(error.numel())

    def check_targets(self, targets: torch.Tensor) -> None:
        if targets.ndim != 2 or targets.shape[1] != 2:
            raise DataError(f"RL targets must be (batch, 2) = (action, TD target), got {tuple(targets.shape)}")
        if targets.numel():
            actions = targets[:, 0]
            if bool((actions != actions.round()).any()) or int(actions.min()) < 0 or int(actions.max()) >= self.num_actions:
                raise DataError(f"actions must be integers in 0..{self.num_actions - 1}")
