"""The RL zoo: one DQN agent per MinAtar game, cached like the MiniZoo, loaded as a :class:`zootune.Zoo`.

Layout under ``<cache>/rlzoo`` (``<cache>`` from :func:`zootune.data.cache.user_cache_dir`)::

    manifest.json                                        # one row per agent: game, steps, seed, sha256, returns
    <game>-<steps>steps-seed<seed>[-<n>envs].safetensors # the agent's state_dict (head included)

Each agent is a :class:`~zootune.rl.qnet.MinAtarQNet` trained by :func:`zootune.rl.dqn.train_dqn`
from a random initialisation on its game. The file name carries the budget and the number of
environments stepped together (when more than one), so a ``--quick`` zoo, the full one and agents
trained by the single-environment loop live side by side. Files are written atomically and checked
against the manifest's sha256 on load; a missing or corrupt agent is retrained when ``build_if_missing`` (deterministic
given the seed), else a :class:`CheckpointError` says which.

The zoo of a target game is the agents of the *other* games (the target is held out).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as save_safetensors_bytes

from zootune.data.cache import (
    atomic_write_bytes,
    atomic_write_json,
    read_manifest,
    sha256_file,
    user_cache_dir,
)
from zootune.errors import CheckpointError, ZootuneError
from zootune.rl.dqn import DQNConfig, evaluate_policy, train_dqn
from zootune.rl.envs import GAMES, check_game
from zootune.rl.qnet import minatar_qnet
from zootune.version import __version__

MANIFEST_FORMAT = 1


def rl_zoo_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return user_cache_dir(cache_dir) / "rlzoo"


def source_games(target: str) -> list[str]:
    """The zoo's games for ``target``: every MinAtar game but the target, in :data:`GAMES` order."""
    check_game(target)
    return [g for g in GAMES if g != target]


def agent_file(game: str, config: DQNConfig, seed: int) -> str:
    envs = f"-{config.num_envs}envs" if config.num_envs > 1 else ""
    return f"{game}-{config.steps}steps-seed{seed}{envs}.safetensors"


def _read_manifest(folder: Path) -> dict:
    return read_manifest(folder / "manifest.json", "agents", MANIFEST_FORMAT, "delete it to rebuild the RL zoo")


def _is_valid(folder: Path, row: dict | None) -> bool:
    return row is not None and (folder / row["file"]).is_file() and sha256_file(folder / row["file"]) == row.get("sha256")


# Settings added to DQNConfig after agents were cached, with the value those agents were trained at.
_LEGACY_DQN = {"num_envs": 1, "stop_patience": 0, "stop_min_gain": 0.05, "stop_min_steps": 0}


def _trained_with(row: dict) -> dict | None:
    """The DQN settings a cached agent was trained with (rows from before a setting existed: the
    only behaviour there was -- one environment, no early stop)."""
    return {**_LEGACY_DQN, **row["dqn"]} if isinstance(row.get("dqn"), dict) else None


def build_rl_agent(game: str, config: DQNConfig, seed: int = 0, progress: bool = False,
                   log: Callable[[str], None] | None = None):
    """Train one source agent from scratch on ``game``; returns the :class:`DQNResult`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = minatar_qnet()
    return train_dqn(model, game, config, seed=seed, progress=progress, desc=f"source {game}", log=log)


def build_rl_zoo(games: Sequence[str], config: DQNConfig, seed: int = 0, cache_dir: str | os.PathLike | None = None,
                 force: bool = False, progress: bool = False, log: Callable[[str], None] = print) -> list[dict]:
    """Train (or reuse from the cache) one agent per game; returns their manifest rows."""
    folder = rl_zoo_dir(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for game in games:
        check_game(game)
        file = agent_file(game, config, seed)
        manifest = _read_manifest(folder)
        row = manifest["agents"].get(file)
        if not force and _is_valid(folder, row) and _trained_with(row) == config.to_dict():
            rows.append(row)
            continue
        until = ", fewer if its return plateaus first" if config.stop_patience else ""
        log(f"training source agent {game} (up to {config.steps} DQN steps{until}, seed {seed}); cached in {folder}")
        result = build_rl_agent(game, config, seed=seed, progress=progress, log=None if progress else log)
        state = {k: v.detach().contiguous().clone() for k, v in result.model.state_dict().items()}
        # one metadata entry so the same training gives the same bytes (and sha256)
        metadata = {"zootune": json.dumps({"game": game, "zootune_version": __version__}, sort_keys=True)}
        atomic_write_bytes(folder / file, save_safetensors_bytes(state, metadata=metadata))
        returns = evaluate_policy(result.model, game, episodes=config.eval_episodes, seed=seed + 77,
                                  epsilon=config.eval_epsilon, sticky_action_prob=config.sticky_action_prob,
                                  max_episode_steps=config.max_eval_episode_steps)
        last = [r for _, r in result.episodes[-20:]]
        row = {
            "game": game, "file": file, "sha256": sha256_file(folder / file), "seed": seed, "steps": config.steps,
            "steps_trained": result.steps, "curve": result.curve,
            "dqn": config.to_dict(), "seconds": result.seconds, "eval_return": float(np.mean(returns)),
            "train_return_last20": float(np.mean(last)) if last else None,
            "zootune_version": __version__, "torch_version": torch.__version__,
        }
        manifest = _read_manifest(folder)  # re-read: keep rows another process may have added
        manifest["agents"][file] = row
        manifest["format"] = MANIFEST_FORMAT
        atomic_write_json(folder / "manifest.json", manifest)
        log(f"source agent {game}: eval return {row['eval_return']:.2f} after {result.steps} steps "
            f"in {row['seconds']:.0f}s")
        rows.append(row)
    return rows


def load_rl_zoo(target: str, config: DQNConfig, seed: int = 0, cache_dir: str | os.PathLike | None = None,
                build_if_missing: bool = True, progress: bool = False, log: Callable[[str], None] = print):
    """The agents of every game but ``target`` as a :class:`zootune.Zoo` (heads kept: the 6 MinAtar
    actions are the same in every game). Builds what is missing when ``build_if_missing``."""
    from zootune.zoo import Zoo

    games = source_games(target)
    folder = rl_zoo_dir(cache_dir)
    manifest = _read_manifest(folder) if folder.exists() else {"agents": {}}
    missing = [g for g in games if not _is_valid(folder, manifest["agents"].get(agent_file(g, config, seed)))]
    if missing and not build_if_missing:
        raise CheckpointError(f"RL zoo in {folder}: agents missing or corrupt for {', '.join(missing)}")
    rows = build_rl_zoo(games, config, seed=seed, cache_dir=cache_dir, progress=progress, log=log)
    zoo = Zoo.from_checkpoints([folder / row["file"] for row in rows], arch=minatar_qnet, names=games,
                               keep_head=True)
    return zoo, rows


def load_agents(paths: Sequence[str | os.PathLike], names: Sequence[str] | None = None):
    """A zoo of your own agent files (any checkpoint format :class:`zootune.Zoo` reads), heads kept."""
    from zootune.zoo import Zoo

    if not paths:
        raise ZootuneError("give at least one agent file")
    return Zoo.from_checkpoints(list(paths), arch=minatar_qnet, names=names, keep_head=True)
