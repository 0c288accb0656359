"""DQN training speed on MinAtar: environment steps per second, one environment vs N together (a
script, not a test).

For the plain Q-network (the ``scratch`` method's) and Zoo-Tuning's (the ``zoo-tuning`` method's,
robust variant started on member 0; 4 sources with random weights: speed does not depend on the
values), both built through the registry as ``zootune rl`` builds them, it runs ``train_dqn`` on one
game with ``zootune rl``'s DQN settings (batch 32, an update every 4 steps, replay start 1 000,
epsilon over half the run, no evaluation) for N = 1 (the reference loop: one environment, a batch of
32 every 4 steps) and each N of ``--envs`` (one batched forward for the N actions, a batch of 32·P/4
every P = lcm(N, 4) steps). Every setting keeps the replay ratio -- samples drawn per environment
step -- at 32 / 4 = 8 once learning has started; the table shows it measured.

After an untimed warm-up run per network, settings are interleaved, ``--rounds`` times (median
reported), in one process on one thread (as ``zootune rl`` runs). Prints a markdown table: steps/s
per setting and the ratio to N = 1.

Usage: python benchmarks/rl_speed.py [--game breakout] [--steps 6000] [--envs 8,16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from dataclasses import replace

import torch

from zootune.rl import DQNConfig, MinAtarQNet, RLRunConfig, RLTask, build_q_network, train_dqn
from zootune.zoo import Zoo

NUM_SOURCES = 4
NETWORKS = {"plain Q-network (scratch)": "scratch", "Zoo-Tuning Q-network (zoo-tuning, robust)": "zoo-tuning"}


def random_zoo() -> Zoo:
    members = []
    for i in range(NUM_SOURCES):
        torch.manual_seed(100 + i)
        members.append(MinAtarQNet())
    return Zoo.from_modules(members, [f"source{i}" for i in range(NUM_SOURCES)])


def dqn_config(steps: int, num_envs: int) -> DQNConfig:
    """``zootune rl``'s target DQN settings for ``steps`` steps and ``num_envs`` environments, no evaluation."""
    return replace(RLRunConfig().dqn, steps=steps, num_envs=num_envs, eval_every=0, eps_decay_steps=steps // 2)


def measure(method: str, zoo: Zoo, game: str, config: DQNConfig) -> dict:
    model = build_q_network(method, zoo, RLTask(), seed=0, member_scores=[1.0] + [0.0] * (len(zoo) - 1))
    start = time.perf_counter()
    result = train_dqn(model, game, config, seed=0)
    seconds = time.perf_counter() - start
    learning_steps = result.steps - config.learning_starts
    return {"steps_per_s": result.steps / seconds, "samples_per_step": result.samples / learning_steps,
            "batch": result.samples // max(result.updates, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--game", default="breakout")
    parser.add_argument("--steps", type=int, default=6_000)
    parser.add_argument("--envs", default="8,16", help="numbers of environments to compare with 1")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # Zoo-Tuning's coverage warning (conv only) is expected here
    envs = [1] + [int(n) for n in args.envs.split(",")]
    zoo = random_zoo()
    for method in NETWORKS.values():  # warm-up, not timed: first calls initialise torch's kernels
        measure(method, zoo, args.game, replace(dqn_config(1_500, 1), learning_starts=500))
    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.rounds):
        for label, method in NETWORKS.items():
            for n in envs:
                runs.setdefault((label, n), []).append(measure(method, zoo, args.game, dqn_config(args.steps, n)))
    print(f"{args.game}, {args.steps} environment steps per run (replay start 1000), torch threads 1, "
          f"median of {args.rounds} rounds\n")
    print("| Q-network | environments N | batch per update | samples drawn per env step | env steps/s | vs N = 1 |")
    print("|---|---:|---:|---:|---:|---:|")
    for label in NETWORKS:
        base = statistics.median(r["steps_per_s"] for r in runs[(label, 1)])
        for n in envs:
            rows = runs[(label, n)]
            speed = statistics.median(r["steps_per_s"] for r in rows)
            print(f"| {label} | {n} | {rows[0]['batch']} | {rows[0]['samples_per_step']:.2f} | {speed:.0f} | "
                  f"{speed / base:.2f}x |")


if __name__ == "__main__":
    main()
