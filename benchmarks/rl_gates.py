"""What Zoo-Tuning's gates choose on a MinAtar target (a script, not a test).

Builds the zoo methods exactly as ``zootune rl`` does (the cached RL zoo of the target, the
zero-shot ranking, ``build_q_network`` with the run's model seed), trains each by DQN with
``zootune rl``'s settings for one seed, and prints, per aggregated layer, the mean gate weight of
every source:

- Zoo-Tuning: the per-sample gates averaged over the states of greedy evaluation episodes
  (epsilon 0.05), before training and after it -- the after-training episodes are the comparison's
  final evaluation (same seed and count), so the final return printed equals ``zootune rl``'s row;
- Lite: its temporal-ensemble gates (the weights the folded Q-network was built with).

Usage: python benchmarks/rl_gates.py --game breakout [--seed 0] [--methods zoo-tuning,lite]
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import replace

import numpy as np
import torch

from zootune.rl import RLRunConfig, RLTask, build_q_network, load_rl_zoo, select_best_source, train_dqn
from zootune.rl.transfer import MODEL_SEED_OFFSET, final_evaluation


def evaluate_recording_gates(model, config: RLRunConfig, seed: int) -> tuple[float, dict]:
    """The comparison's final evaluation of ``model`` (mean return) and the mean gates over its states."""
    with model.record_gates():
        returns = final_evaluation(model, config, seed)
    return float(np.mean(returns)), model.gate_statistics()


def print_gates(title: str, names: list[str], gates: dict) -> None:
    print(f"\n{title}\n\n| layer | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    for layer, values in gates.items():
        print(f"| {layer} | " + " | ".join(f"{float(v):.3f}" for v in values) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--game", default="breakout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="zoo-tuning,lite")
    parser.add_argument("--steps", type=int, help="target DQN steps (default: zootune rl's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the conv-only coverage warning is expected
    config = RLRunConfig(game=args.game, seeds=[args.seed], progress=False)
    if args.steps:
        config.dqn = replace(config.dqn, steps=args.steps, eval_every=args.steps // 10,
                             eps_decay_steps=args.steps // 2)
    zoo, _ = load_rl_zoo(config.game, config.source_dqn, seed=config.zoo_seed, log=lambda message: None)
    best, selection = select_best_source(zoo, config.game, config.selection_episodes,
                                         config.dqn.sticky_action_prob, config.dqn.max_eval_episode_steps)
    print(f"{config.game}, seed {args.seed}: zero-shot returns "
          + ", ".join(f"{name} {value:.2f}" for name, value in selection.items()) + f"; start: {zoo.names[best]}")
    scores = [selection[name] for name in zoo.names]
    for method in args.methods.split(","):
        model = build_q_network(method, zoo, RLTask(), seed=args.seed + MODEL_SEED_OFFSET, aggregate=config.aggregate,
                                member_scores=scores)
        if not model.config.lite:
            before, gates = evaluate_recording_gates(model, config, args.seed)
            print_gates(f"{method} before training (return {before:.2f}): mean gate over the evaluation states",
                        zoo.names, gates)
        result = train_dqn(model, config.game, config.dqn, seed=args.seed, task=RLTask())
        if model.config.lite:
            final = float(np.mean(final_evaluation(result.model, config, args.seed)))
            print_gates(f"{method} after training (final return {final:.2f}): the temporal-ensemble gates it folded",
                        zoo.names, model.lite_gates())
        else:
            final, gates = evaluate_recording_gates(model, config, args.seed)
            print_gates(f"{method} after training (final return {final:.2f}): mean gate over the final evaluation's "
                        "states", zoo.names, gates)


if __name__ == "__main__":
    main()
