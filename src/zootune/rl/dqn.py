"""Deep Q-learning (DQN; Mnih et al., Nature 2015) for any Q-network module, zoo methods included.

``num_envs`` = N environments are stepped together (:class:`zootune.rl.envs.VectorEnv`); one step of
the vector is N environment steps. Its N actions come from one batched forward of the online network,
epsilon-greedy with the linearly decaying epsilon of the environment steps t done so far::

    eps(t) = max(eps_end, eps_start - (eps_start - eps_end) * t / eps_decay_steps),

drawn for all N at once (a uniform draw per environment decides whether it explores). The N
transitions (s, a, r, s', done) go into a :class:`~zootune.rl.replay.ReplayBuffer`. Learning keeps
the *replay ratio* -- samples drawn per environment step -- at ``batch_size / train_every`` for
every N: once ``learning_starts`` transitions are stored, one gradient step on a batch of::

    B = batch_size * P / train_every  samples every  P = lcm(N, train_every)  environment steps

(:func:`update_schedule`; N = 1: ``batch_size`` every ``train_every`` steps, the reference loop;
N = 8 and train_every 4: twice the batch every 8 steps) at the learning rate ``lr * B / batch_size``
(linear scaling, Goyal et al. 2017: fewer, larger steps move the weights as far per environment step;
without it N = 16 learned far slower per step, docs/rl.md), on the loss::

    y_b = r_b + gamma (1 - done_b) max_a' Q_target(s'_b, a'),     L = mean_b huber(Q(s_b, a_b) - y_b)

(the task's, :class:`zootune.rl.task.RLTask`). Whenever the environment steps pass a multiple of
``target_update`` the target network becomes a hard copy of the online network (after that step's
update), so right after a sync the two are equal and between syncs the target is frozen. A run ends
at the first vector step that reaches ``steps`` environment steps (at most N - 1 more), or, with
``stop_patience``, at the first evaluation past ``stop_min_steps`` where the curve has plateaued
(:func:`plateaued`; how the RL zoo's source agents are trained to competence).

The online network is whatever a zoo method built (a fine-tuned Q-network, a ``ZooTuning`` module,
...) and the engine's hook contract (:mod:`zootune.methods.base`) is honoured: ``param_groups``,
``set_training_progress``, ``auxiliary_loss``, ``after_optimizer_step`` and, at the end,
``finalize`` (Lite Zoo-Tuning folds into a plain Q-network there). The target network is a deepcopy
of the online module kept in eval mode. Acting uses the online network in eval mode (for Lite:
the temporal-ensemble gate, not a batch gate over the N environments).

Everything random is seeded from ``seed``: torch, NumPy's generator for exploration and replay
sampling, and the environments (:func:`zootune.rl.envs.env_seeds`); the same call gives the same
learning curve on the same machine.
"""

from __future__ import annotations

import copy
import math
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
from zootune.rl.envs import NUM_ACTIONS, OBSERVATION_SHAPE, VectorEnv, env_seeds, make_env, observe
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

    ``num_envs``: environments stepped together; the replay ratio ``batch_size / train_every`` is
    the same for every value (:func:`update_schedule`) and ``lr`` is the rate of an update of
    ``batch_size`` samples, scaled linearly for the larger batches of several environments. 1 is
    the reference loop; ``zootune rl`` uses :data:`zootune.rl.transfer.NUM_ENVS` (docs/rl.md:
    the speed of each, and a learning check).
    """

    steps: int = 30_000
    num_envs: int = 1
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
    # Stop early once the evaluation return has plateaued (:func:`plateaued`); 0: always run ``steps``.
    stop_patience: int = 0
    stop_min_gain: float = 0.05
    stop_min_steps: int = 0

    def __post_init__(self):
        positive = ("steps", "num_envs", "batch_size", "replay_capacity", "train_every", "target_update",
                    "eval_episodes", "max_eval_episode_steps")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ZootuneError(f"DQN {name} must be >= 1, got {getattr(self, name)}")
        for name in ("learning_starts", "eval_every", "eps_decay_steps", "stop_patience", "stop_min_steps"):
            if int(getattr(self, name)) < 0:
                raise ZootuneError(f"DQN {name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ZootuneError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.stop_patience and not self.eval_every:
            raise ZootuneError("stop_patience needs an evaluation curve: set eval_every > 0")
        if not self.stop_min_gain >= 0:
            raise ZootuneError(f"stop_min_gain must be >= 0, got {self.stop_min_gain}")
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


def plateaued(returns: list[float], patience: int, min_gain: float) -> bool:
    """Whether an evaluation curve has stopped improving. With s_k the mean of evaluations k-1 and k
    (one evaluation of a few episodes is noisy), the curve has plateaued when none of the last
    ``patience`` values of s improves on the best earlier one by ``min_gain`` of its magnitude::

        max_{k > K - patience} s_k  <  b + min_gain * |b|,   b = max_{k <= K - patience} s_k

    (K the last evaluation; at least ``patience + 2`` evaluations). ``patience`` 0: never."""
    if patience < 1 or len(returns) < patience + 2:
        return False
    smooth = [float(np.mean(returns[max(0, k - 1):k + 1])) for k in range(len(returns))]
    best_before = max(smooth[:-patience])
    return max(smooth[-patience:]) < best_before + min_gain * abs(best_before)


def make_optimizer(module: nn.Module, config: DQNConfig) -> torch.optim.Optimizer:
    """The engine's optimizer (:func:`zootune.engine.optim.build_optimizer`: the method's
    ``param_groups`` when it defines them) with the DQN learning rate (:func:`update_schedule`'s)
    and no weight decay."""
    lr = update_schedule(config)[2]
    return build_optimizer(module, TrainConfig(optimizer=config.optimizer, lr=lr, weight_decay=0.0))


def update_schedule(config: DQNConfig) -> tuple[int, int, float]:
    """(P, B, lr): one update of B samples every P environment steps, P = lcm(num_envs, train_every)
    and B = batch_size * P / train_every, so that B / P = batch_size / train_every for every
    num_envs; at lr = config.lr * B / batch_size (config.lr itself for one environment)."""
    period = math.lcm(config.num_envs, config.train_every)
    batch = config.batch_size * period // config.train_every
    return period, batch, config.lr * batch / config.batch_size


def greedy_actions(model: nn.Module, observations: np.ndarray) -> np.ndarray:
    """argmax_a Q(s_i, a) for a batch of observations (n, C, H, W), by one forward of ``model``."""
    with torch.no_grad():
        q = model(torch.from_numpy(observations).float())
    return q.argmax(dim=1).numpy()


def epsilon_greedy(model: nn.Module, observations: np.ndarray, epsilon: float, rng: np.random.Generator,
                   num_actions: int = NUM_ACTIONS) -> np.ndarray:
    """One action per observation: uniform with probability ``epsilon``, else greedy. One uniform
    draw per observation, then one action draw per exploring observation (for one observation the
    draws of a scalar loop: ``a = rng.integers(A) if rng.random() < eps else greedy``); the forward
    runs only when some observation acts greedily."""
    explore = rng.random(len(observations)) < epsilon
    actions = np.empty(len(observations), dtype=np.int64)
    actions[explore] = rng.integers(num_actions, size=int(explore.sum()))
    if not explore.all():
        actions[~explore] = greedy_actions(model, observations[~explore])
    return actions


class DQNLearner:
    """The learning half of DQN: online/target networks, optimizer, replay and the step counter.

    ``observe(...)`` is called with the n transitions of one (vector) step; it stores them, updates
    the online network when due (:func:`update_schedule`) and syncs the target network when due.
    ``act(...)`` picks one action per observation. Tests drive it directly; :func:`train_dqn` drives
    it with environments.
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
        self.update_period, self.update_batch, _ = update_schedule(config)
        self.step = 0
        self.updates = 0
        self.samples = 0
        self.syncs = 0
        self.last_loss: float | None = None

    # ---------------------------------------------------------------- acting
    def act(self, observations: np.ndarray, epsilon: float) -> np.ndarray:
        """Epsilon-greedy actions for observations (n, C, H, W), the online network in eval mode."""
        self.online.eval()
        try:
            return epsilon_greedy(self.online, observations, epsilon, self.rng, self.num_actions)
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
        self.samples += len(targets)
        self.last_loss = float(loss.detach())
        return self.last_loss

    def sync_target(self) -> None:
        """Hard copy: target <- online (parameters and buffers, e.g. Lite's gate ensembles)."""
        self.target.load_state_dict(self.module.state_dict())
        self.syncs += 1

    def observe(self, observations: np.ndarray, actions, rewards, next_observations: np.ndarray, dones) -> None:
        """Store the n transitions of one step (arrays with n rows); then every update that fell due
        in these n environment steps (past ``learning_starts``) and, if one fell due, a target sync."""
        before = self.step
        self.replay.add(observations, actions, rewards, next_observations, dones)
        self.step += len(observations)
        cfg = self.config
        for _ in range(self.step // self.update_period - max(before, cfg.learning_starts) // self.update_period):
            self.update(self.replay.sample(self.update_batch, self.rng))
        if self.step // cfg.target_update > before // cfg.target_update:
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
                action = int(epsilon_greedy(model, obs[None], epsilon, rng, num_actions)[0])
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

    ``curve``: (step, mean evaluation return) at the first vector step past each multiple of
    ``eval_every``; ``episodes``: (environment step at the episode's end, training return) of every
    finished training episode. ``steps``: environment steps taken (``steps`` rounded up to a multiple
    of ``num_envs``; fewer when the evaluation curve plateaued first, ``stop_patience``); ``samples``:
    replay samples drawn by the updates.
    """

    model: nn.Module
    curve: list[tuple[int, float]]
    episodes: list[tuple[int, float]]
    seconds: float
    updates: int
    syncs: int
    steps: int = 0
    samples: int = 0


class _RunRecord:
    """The episodes, evaluation curve and progress display of one :func:`train_dqn` run."""

    def __init__(self, game: str, config: DQNConfig, seed: int, progress: bool, desc: str,
                 log: Callable[[str], None] | None):
        self.game, self.config, self.seed, self.desc, self.log = game, config, seed, desc, log
        self.curve: list[tuple[int, float]] = []
        self.episodes: list[tuple[int, float]] = []
        self.recent = deque(maxlen=20)
        self.returns = np.zeros(config.num_envs)  # the running return of each environment's episode
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=config.steps, desc=desc, unit="step", leave=False, mininterval=1.0)

    def add(self, before: int, step: int, rewards: np.ndarray, dones: np.ndarray, model: nn.Module) -> None:
        """Account for the vector step from environment step ``before`` to ``step``: environment i's
        transition is step ``before + i + 1``."""
        self.returns += rewards
        for i in np.flatnonzero(dones):
            self.episodes.append((before + int(i) + 1, float(self.returns[i])))
            self.recent.append(float(self.returns[i]))
            self.returns[i] = 0.0
        cfg = self.config
        if cfg.eval_every and step // cfg.eval_every > before // cfg.eval_every:
            returns = evaluate_policy(model, self.game, cfg.eval_episodes, seed=self.seed + EVAL_SEED_OFFSET + step,
                                      epsilon=cfg.eval_epsilon, sticky_action_prob=cfg.sticky_action_prob,
                                      max_episode_steps=cfg.max_eval_episode_steps)
            self.curve.append((step, float(np.mean(returns))))
            if self.log is not None and self.bar is None:
                self.log(f"{self.desc}: step {step}/{cfg.steps} eval return {self.curve[-1][1]:.2f}")
        if self.bar is not None and (step // 250 > before // 250 or step >= cfg.steps):
            self.bar.update(min(step, cfg.steps) - self.bar.n)
            self.bar.set_postfix(ret=f"{np.mean(self.recent):.2f}" if self.recent else "-",
                                 eval=f"{self.curve[-1][1]:.2f}" if self.curve else "-", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_dqn(model: nn.Module, game: str, config: DQNConfig, seed: int = 0, *, task: RLTask | None = None,
              progress: bool = False, desc: str = "dqn",
              log: Callable[[str], None] | None = None) -> DQNResult:
    """Train ``model`` (any Q-network module) by DQN on ``game`` with ``config.num_envs``
    environments stepped together; see the module docstring."""
    seed_everything(seed)
    envs = VectorEnv(game, env_seeds(seed, config.num_envs), config.sticky_action_prob)
    learner = DQNLearner(model, config, task=task, seed=seed)
    record = _RunRecord(game, config, seed, progress, desc, log)
    set_progress = getattr(learner.module, "set_training_progress", None)
    start = time.perf_counter()
    try:
        while learner.step < config.steps:
            before = learner.step
            if callable(set_progress):
                set_progress(before / config.steps)
            observations = envs.observations
            actions = learner.act(observations, epsilon_at(before, config))
            rewards, dones, next_observations = envs.step(actions)
            learner.observe(observations, actions, rewards, next_observations, dones)
            record.add(before, learner.step, rewards, dones, learner.online)
            just_evaluated = bool(record.curve) and record.curve[-1][0] == learner.step
            if (just_evaluated and learner.step >= config.stop_min_steps
                    and plateaued([r for _, r in record.curve], config.stop_patience, config.stop_min_gain)):
                break
    finally:
        record.close()
    finalize = getattr(learner.module, "finalize", None)
    final = finalize() if callable(finalize) else learner.module
    return DQNResult(model=final, curve=record.curve, episodes=record.episodes, seconds=time.perf_counter() - start,
                     updates=learner.updates, syncs=learner.syncs, steps=learner.step, samples=learner.samples)
