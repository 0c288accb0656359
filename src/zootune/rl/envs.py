"""MinAtar games behind one observation and action layout, so one Q-network fits every game.

MinAtar (Young & Tian, 2019) renders each game as a 10x10 grid of C boolean channels, with C
depending on the game (breakout 4, asterix 4, freeway 7, space_invaders 6, seaquest 10). Every
agent of the RL zoo must have the same architecture, so observations are padded with all-zero
channels to :data:`NUM_CHANNELS` = 10 (the largest game) and moved channels-first:

    o_pad[c, y, x] = s[y, x, c]  for c < C,    o_pad[c, y, x] = 0  for C <= c < 10.

Actions: every MinAtar environment exposes the same 6 actions (no-op, left, up, right, down, fire;
``Environment.num_actions() == 6``); games ignore the ones they do not use. Using all 6 for every
game gives every agent the same head shape, so a source agent's head is defined on the target game
too (which is what zero-shot source selection evaluates).

:class:`VectorEnv` steps N environments together (vectorised acting, :func:`zootune.rl.dqn.train_dqn`):
environment i is seeded ``seed + i * ENV_SEED_STRIDE`` (:func:`env_seeds`), so environment 0 of a
run is the single environment of the same seed and environment i is the single environment of seed
``seed + i * ENV_SEED_STRIDE``: N environments stepped together give the transitions of N single runs.
"""

from __future__ import annotations

import numpy as np

from zootune.errors import ZootuneError

GAMES = ("asterix", "breakout", "freeway", "seaquest", "space_invaders")
NUM_CHANNELS = 10
NUM_ACTIONS = 6
GRID = 10
OBSERVATION_SHAPE = (NUM_CHANNELS, GRID, GRID)
# Environment i of a vectorised run is seeded seed + i * ENV_SEED_STRIDE: far above the seeds of a
# comparison (0, 1, 2, ...), so two runs' environments never share a seed.
ENV_SEED_STRIDE = 10_007


def check_game(name: str) -> str:
    """``name`` if it is a MinAtar game, else a :class:`ZootuneError` listing the games."""
    if name not in GAMES:
        raise ZootuneError(f"unknown MinAtar game {name!r}; choose from: {', '.join(GAMES)}")
    return name


def make_env(game: str, seed: int, sticky_action_prob: float = 0.1):
    """A seeded, reset MinAtar environment (sticky actions as in the MinAtar paper, p = 0.1)."""
    check_game(game)
    try:
        from minatar import Environment
    except ImportError:
        raise ZootuneError("RL transfer needs the MinAtar games: pip install 'minatar'") from None
    env = Environment(game, sticky_action_prob=sticky_action_prob)
    # Environment.seed replaces the game's RandomState; reset afterwards so the first episode uses it.
    env.seed(int(seed) % 2**32)
    env.reset()
    return env


def write_observation(out: np.ndarray, state: np.ndarray) -> np.ndarray:
    """Write a MinAtar state (10, 10, C) bool into ``out`` (10, 10, 10) uint8, channels first,
    zero-padded (the formula in the module docstring); returns ``out``."""
    if state.ndim != 3 or state.shape[:2] != (GRID, GRID) or state.shape[2] > NUM_CHANNELS:
        raise ZootuneError(f"expected a MinAtar state of shape (10, 10, C<=10), got {tuple(state.shape)}")
    channels = state.shape[2]
    out[:channels] = state.transpose(2, 0, 1)
    out[channels:] = 0
    return out


def pad_observation(state: np.ndarray) -> np.ndarray:
    """A MinAtar state (10, 10, C) bool -> a new (10, 10, 10) uint8 array, channels first, zero-padded."""
    return write_observation(np.empty(OBSERVATION_SHAPE, dtype=np.uint8), state)


def observe(env) -> np.ndarray:
    """The environment's current state, padded (:func:`pad_observation`)."""
    return pad_observation(env.state())


def env_seeds(seed: int, num_envs: int) -> list[int]:
    """The seeds of a vectorised run's environments: ``seed + i * ENV_SEED_STRIDE``."""
    return [int(seed) + i * ENV_SEED_STRIDE for i in range(num_envs)]


class VectorEnv:
    """N environments of one game stepped together, each reset when its episode ends.

    ``observations`` (N, 10, 10, 10) uint8 holds every environment's current state. :meth:`step`
    takes one action per environment and returns ``(rewards, dones, next_observations)``:
    ``next_observations[i]`` is the state reached by environment i's action (the terminal state when
    ``dones[i]``, which is what the replay stores); afterwards ``observations`` is ``next_observations``
    except where an episode ended, where it is the first state of the next episode.
    """

    def __init__(self, game: str, seeds: list[int], sticky_action_prob: float = 0.1):
        if not seeds:
            raise ZootuneError("a vector of environments needs at least one seed")
        self.envs = [make_env(game, seed, sticky_action_prob) for seed in seeds]
        self.observations = np.empty((len(self.envs), *OBSERVATION_SHAPE), dtype=np.uint8)
        for env, out in zip(self.envs, self.observations):
            write_observation(out, env.state())

    def __len__(self) -> int:
        return len(self.envs)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(self.envs)
        rewards = np.empty(n, dtype=np.float32)
        dones = np.empty(n, dtype=bool)
        next_observations = np.empty_like(self.observations)
        for i, env in enumerate(self.envs):
            rewards[i], dones[i] = env.act(int(actions[i]))
            write_observation(next_observations[i], env.state())
        current = next_observations.copy() if dones.any() else next_observations
        for i in np.flatnonzero(dones):
            self.envs[i].reset()
            write_observation(current[i], self.envs[i].state())
        self.observations = current
        return rewards, dones, next_observations
