"""Reinforcement-learning transfer on MinAtar: a zoo of DQN agents, one per game, transferred to a
held-out game by the same zoo methods as classification (issue 7, item 3).

- :mod:`~zootune.rl.envs`: the games, observation padding to 10 channels, the common 6 actions,
  :class:`VectorEnv` (N environments stepped together);
- :mod:`~zootune.rl.qnet`: :class:`MinAtarQNet`, the one architecture of every agent;
- :mod:`~zootune.rl.task`: :class:`RLTask`, the Q head and the Huber TD loss as a ``Task``;
- :mod:`~zootune.rl.replay`: :class:`ReplayBuffer`;
- :mod:`~zootune.rl.dqn`: :class:`DQNConfig`, :class:`DQNLearner`, :func:`train_dqn`, :func:`evaluate_policy`,
  :func:`update_schedule` (the same replay ratio for any number of environments);
- :mod:`~zootune.rl.zoo`: building, caching and loading the RL zoo (:func:`load_rl_zoo`);
- :mod:`~zootune.rl.transfer`: the ``zootune rl`` comparison (:func:`run_rl_transfer`), every method
  built through the method registry (:func:`rl_methods`, :func:`build_q_network`).
"""

from zootune.rl.dqn import (
    DQNConfig,
    DQNLearner,
    DQNResult,
    epsilon_at,
    evaluate_policy,
    train_dqn,
    update_schedule,
)
from zootune.rl.envs import (
    GAMES,
    NUM_ACTIONS,
    NUM_CHANNELS,
    OBSERVATION_SHAPE,
    VectorEnv,
    env_seeds,
    make_env,
    pad_observation,
)
from zootune.rl.qnet import MinAtarQNet, minatar_qnet
from zootune.rl.replay import ReplayBuffer
from zootune.rl.task import RLTask
from zootune.rl.transfer import (
    RLRunConfig,
    build_q_network,
    rl_methods,
    run_rl_transfer,
    select_best_source,
)
from zootune.rl.zoo import (
    build_rl_zoo,
    load_agents,
    load_rl_zoo,
    rl_zoo_dir,
    source_games,
)

__all__ = [
    "GAMES",
    "NUM_ACTIONS",
    "NUM_CHANNELS",
    "OBSERVATION_SHAPE",
    "DQNConfig",
    "DQNLearner",
    "DQNResult",
    "MinAtarQNet",
    "RLRunConfig",
    "RLTask",
    "ReplayBuffer",
    "VectorEnv",
    "build_q_network",
    "build_rl_zoo",
    "env_seeds",
    "epsilon_at",
    "evaluate_policy",
    "load_agents",
    "load_rl_zoo",
    "make_env",
    "minatar_qnet",
    "pad_observation",
    "rl_methods",
    "rl_zoo_dir",
    "run_rl_transfer",
    "select_best_source",
    "source_games",
    "train_dqn",
    "update_schedule",
]
