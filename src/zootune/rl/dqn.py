"""Deep Q-learning (DQN; Mnih et al., Nature 2015) for any Q-network module, zoo methods included.

Per environment step t the agent acts epsilon-greedily with a linearly decaying epsilon::

    eps(t) = max(eps_end, eps_start - (eps_start - eps_end) * t / eps_decay_steps),

stores (s, a, r, s', done) in a :class:`~zootune.rl.replay.ReplayBuffer` and, every ``train_every``
steps once ``learning_starts`` transitions are stored, takes one gradient step on a sampled batch::

    y_b = r_b + gamma (1 - done_b) max_a' Q_target(s'_b, a'),     L = mean_b huber(Q(s_b, a_b) - y_b)

(the loss is the task's, :class:`zootune.rl.task.RLTask`). Every ``target_update`` steps the target
network becomes a hard copy of the online network (after that step's update), so right after a sync
step the two are equal and between syncs the target is frozen.

The online network is whatever a zoo method built (a fine-tuned Q-network, a ``ZooTuning`` module,
...) and the engine's hook contract (:mod:`zootune.methods.base`) is honoured: ``param_groups``,
``set_training_progress``, ``auxiliary_loss``, ``after_optimizer_step`` and, at the end,
``finalize`` (Lite Zoo-Tuning folds into a plain Q-network there). The target network is a deepcopy
of the online module kept in eval mode. Acting uses the online network in eval mode (for Lite:
the temporal-ensemble gate, not a one-sample batch gate).

Everything random is seeded from ``seed``: torch, NumPy's generator for exploration and replay
sampling, and the environment; the same call gives the same learning curve on the same machine.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from zootune.engine.checkpoint import seed_everything
from zootune.engine.config import OPTIMIZERS, TrainConfig
from zootune.engine.optim import build_optimizer
from zootune.errors import NonFiniteLossError, ZootuneError
from zootune.engine.distributed import unwrap
from zootune.rl.envs import NUM_ACTIONS, OBSERVATION_SHAPE, make_env, observe
from zootune.rl.replay import ReplayBuffer
from zootune.rl.task import RLTask

# Evaluation seeds are offset so evaluation episodes never replay the training environment's stream.
EVAL_SEED_OFFSET = 1_000_003


@dataclass
class DQNConfig:
    """DQN hyperparameters (defaults: MinAtar's DQN where it fits a CPU budget; see docs/rl.md).

    MinAtar's paper uses RMSprop (lr 2.5e-4, alpha 0.95, centered, eps 0.01), a 100k replay, 5k
    replay start, epsilon 1 -> 0.1 over 100k frames, target sync every 1k frames and an update every
    frame. Our budgets are tens of thousands of steps, so exploration decays faster, the replay
    starts sooner and updates happen every 4th step (Atari DQN's frequency; 4x cheaper). The
    optimizer is the engine's Adam at MinAtar's learning rate (Adam needs no tuning of RMSprop's
    centring/epsilon and is what zoo methods are trained with elsewhere in zootune).
    """

    steps: int = 30_000
    batch_size: int = 32
    gamma: float = 0.99
    optimizer: str = "adam"  # any optimizer of the engine: "adam", "adamw" or "sgd"
    lr: float = 2.5e-4
    replay_capacity: int = 100_000
    learning_starts: int = 1_000
    train_every: int = 4
    target_update: int = 1_000
    eps_start: float = 1.0
    eps_end: float = 0.05
    eps_decay_steps: int = 10_000
    sticky_action_prob: float = 0.1
    eval_every: int = 3_000  # 0: no learning curve, only the final evaluation
    eval_episodes: int = 5
    eval_epsilon: float = 0.05
    max_eval_episode_steps: int = 2_000  # bounds the time a good agent's evaluation episode can take

    def __post_init__(self):
        positive = ("steps", "batch_size", "replay_capacity", "train_every", "target_update",
                    "eval_episodes", "max_eval_episode_steps")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ZootuneError(f"DQN {name} must be >= 1, got {getattr(self, name)}")
        for name in ("learning_starts", "eval_every", "eps_decay_steps"):
            if int(getattr(self, name)) < 0:
                raise ZootuneError(f"DQN {name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ZootuneError(f"gamma must be in [0, 1], got {self.gamma}")
        if not self.lr > 0:
            raise ZootuneError(f"lr must be > 0, got {self.lr}")
        for name in ("eps_start", "eps_end", "eval_epsilon", "sticky_action_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ZootuneError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.optimizer not in OPTIMIZERS:
            raise ZootuneError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def epsilon_at(step: int, config: DQNConfig) -> float:
    """Linearly decayed exploration rate at environment step ``step`` (formula in the module doc)."""
    if config.eps_decay_steps == 0:
        return config.eps_end
    fraction = min(1.0, step / config.eps_decay_steps)
    return config.eps_start + fraction * (config.eps_end - config.eps_start)


def make_optimizer(module: nn.Module, config: DQNConfig) -> torch.optim.Optimizer:
    """The engine's optimizer (:func:`zootune.engine.optim.build_optimizer`: the method's
    ``param_groups`` when it defines them) with the DQN learning rate and no weight decay."""
    return build_optimizer(module, TrainConfig(optimizer=config.optimizer, lr=config.lr, weight_decay=0.0))


def greedy_action(model: nn.Module, observation: np.ndarray) -> int:
    with torch.no_grad():
        q = model(torch.from_numpy(observation).float().unsqueeze(0))
    return int(q.argmax(dim=1).item())


class DQNLearner:
    """The learning half of DQN: online/target networks, optimizer, replay and the step counter.

    ``observe(...)`` is called once per environment step; it stores the transition, updates the
    online network when due and syncs the target network when due. ``act(...)`` picks an action.
    Tests drive it directly; :func:`train_dqn` drives it with an environment.
    """

    def __init__(self, model: nn.Module, config: DQNConfig, task: RLTask | None = None, seed: int = 0,
                 num_actions: int = NUM_ACTIONS):
        self.online = model
        self.module = unwrap(model)
        self.config = config
        self.task = task or RLTask(num_actions)
        self.num_actions = num_actions
        self.rng = np.random.default_rng(seed)
        self.online.train()
        self.target = copy.deepcopy(self.module).eval()
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.optimizer = make_optimizer(self.module, config)
        self.replay = ReplayBuffer(config.replay_capacity, OBSERVATION_SHAPE)
        self.step = 0
        self.updates = 0
        self.syncs = 0
        self.last_loss: float | None = None

    # ---------------------------------------------------------------- acting
    def act(self, observation: np.ndarray, epsilon: float) -> int:
        if self.rng.random() < epsilon:
            return int(self.rng.integers(self.num_actions))
        self.online.eval()
        try:
            return greedy_action(self.online, observation)
        finally:
            self.online.train()

    # ---------------------------------------------------------------- learning
    def td_targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 2): the action and y = r + gamma (1 - done) max_a' Q_target(s', a')."""
        with torch.no_grad():
            next_value = self.target(batch["next_obs"]).max(dim=1).values
            y = batch["reward"] + self.config.gamma * (1.0 - batch["done"]) * next_value
        return torch.stack([batch["action"].float(), y], dim=1)

    def update(self, batch: dict[str, torch.Tensor]) -> float:
        """One gradient step on ``batch``; returns the loss."""
        targets = self.td_targets(batch)
        outputs = self.online(batch["obs"])
        loss = self.task.loss(outputs, targets)
        auxiliary = getattr(self.module, "auxiliary_loss", None)
        if callable(auxiliary):
            loss = loss + auxiliary(outputs, targets)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"DQN loss became {loss.item()} at step {self.step}; lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        after = getattr(self.module, "after_optimizer_step", None)
        if callable(after):
            after()
        self.updates += 1
        self.last_loss = float(loss.detach())
        return self.last_loss

    def sync_target(self) -> None:
        """Hard copy: target <- online (parameters and buffers, e.g. Lite's gate ensembles)."""
        self.target.load_state_dict(self.module.state_dict())
        self.syncs += 1

    def observe(self, observation, action: int, reward: float, next_observation, done: bool) -> None:
        self.step += 1
        self.replay.add(observation, action, reward, next_observation, done)
        cfg = self.config
        if self.step > cfg.learning_starts and self.step % cfg.train_every == 0:
            self.update(self.replay.sample(cfg.batch_size, self.rng))
        if self.step % cfg.target_update == 0:
            self.sync_target()


def evaluate_policy(model: nn.Module, game: str, episodes: int, seed: int, epsilon: float = 0.05,
                    sticky_action_prob: float = 0.1, max_episode_steps: int = 2_000,
                    num_actions: int = NUM_ACTIONS) -> list[float]:
    """Returns of ``episodes`` epsilon-greedy episodes of ``model`` on ``game`` (own seeded env and
    generator, so evaluation does not disturb training's random streams). An episode longer than
    ``max_episode_steps`` is cut there and its return so far counted."""
    env = make_env(game, seed, sticky_action_prob)
    rng = np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    returns = []
    try:
        for _ in range(episodes):
            env.reset()
            total, done, steps = 0.0, False, 0
            while not done and steps < max_episode_steps:
                obs = observe(env)
                action = int(rng.integers(num_actions)) if rng.random() < epsilon else greedy_action(model, obs)
                reward, done = env.act(action)
                total += reward
                steps += 1
            returns.append(total)
    finally:
        model.train(was_training)
    return returns


@dataclass
class DQNResult:
    """What :func:`train_dqn` returns: the trained (finalized) model and its curves.

    ``curve``: (step, mean evaluation return) every ``eval_every`` steps; ``episodes``: (step at the
    episode's end, training return) of every finished training episode.
    """

    model: nn.Module
    curve: list[tuple[int, float]]
    episodes: list[tuple[int, float]]
    seconds: float
    updates: int
    syncs: int


def train_dqn(model: nn.Module, game: str, config: DQNConfig, seed: int = 0, *, task: RLTask | None = None,
              progress: bool = False, desc: str = "dqn",
              log: Callable[[str], None] | None = None) -> DQNResult:
    """Train ``model`` (any Q-network module) by DQN on ``game``; see the module docstring."""
    seed_everything(seed)
    env = make_env(game, seed, config.sticky_action_prob)
    learner = DQNLearner(model, config, task=task, seed=seed)
    curve: list[tuple[int, float]] = []
    episodes: list[tuple[int, float]] = []
    recent = deque(maxlen=20)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc=desc, unit="step", leave=False, mininterval=1.0)
    start = time.perf_counter()
    obs, episode_return = observe(env), 0.0
    set_progress = getattr(learner.module, "set_training_progress", None)
    for step in range(1, config.steps + 1):
        if callable(set_progress):
            set_progress((step - 1) / config.steps)
        action = learner.act(obs, epsilon_at(step - 1, config))
        reward, done = env.act(action)
        next_obs = observe(env)
        learner.observe(obs, action, reward, next_obs, done)
        episode_return += reward
        if done:
            episodes.append((step, episode_return))
            recent.append(episode_return)
            env.reset()
            obs, episode_return = observe(env), 0.0
        else:
            obs = next_obs
        if config.eval_every and step % config.eval_every == 0:
            returns = evaluate_policy(learner.online, game, config.eval_episodes,
                                      seed=seed + EVAL_SEED_OFFSET + step, epsilon=config.eval_epsilon,
                                      sticky_action_prob=config.sticky_action_prob,
                                      max_episode_steps=config.max_eval_episode_steps)
            curve.append((step, float(np.mean(returns))))
            if log is not None and bar is None:
                log(f"{desc}: step {step}/{config.steps} eval return {curve[-1][1]:.2f}")
        if bar is not None and (step % 250 == 0 or step == config.steps):
            bar.update(step - bar.n)
            bar.set_postfix(ret=f"{np.mean(recent):.2f}" if recent else "-",
                            eval=f"{curve[-1][1]:.2f}" if curve else "-", refresh=False)
    if bar is not None:
        bar.close()
    finalize = getattr(learner.module, "finalize", None)
    final = finalize() if callable(finalize) else learner.module
    return DQNResult(model=final, curve=curve, episodes=episodes, seconds=time.perf_counter() - start,
                     updates=learner.updates, syncs=learner.syncs)
