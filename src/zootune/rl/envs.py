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
"""

from __future__ import annotations

import numpy as np

from zootune.errors import ZootuneError

GAMES = ("asterix", "breakout", "freeway", "seaquest", "space_invaders")
NUM_CHANNELS = 10
NUM_ACTIONS = 6
GRID = 10
OBSERVATION_SHAPE = (NUM_CHANNELS, GRID, GRID)


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


def pad_observation(state: np.ndarray) -> np.ndarray:
    """A MinAtar state (10, 10, C) bool -> (10, 10, 10) uint8, channels first, zero-padded."""
    if state.ndim != 3 or state.shape[:2] != (GRID, GRID) or state.shape[2] > NUM_CHANNELS:
        raise ZootuneError(f"expected a MinAtar state of shape (10, 10, C<=10), got {tuple(state.shape)}")
    out = np.zeros(OBSERVATION_SHAPE, dtype=np.uint8)
    out[: state.shape[2]] = np.moveaxis(state, 2, 0)
    return out


def observe(env) -> np.ndarray:
    """The environment's current state, padded (:func:`pad_observation`)."""
    return pad_observation(env.state())
