"""``zootune rl``: RL transfer on MinAtar (argument parsing; the work is :func:`zootune.rl.run_rl_transfer`)."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path


def cmd_rl(args) -> int:
    from zootune.cli.args import split_list
    from zootune.rl import RLRunConfig, run_rl_transfer

    overrides = {"progress": not args.no_progress, "plots": not args.no_plots, "cache_dir": args.cache_dir,
                 "finetune_each": args.finetune_each}
    for name in ("game", "seeds", "aggregate"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.methods is not None:
        overrides["methods"] = split_list(args.methods)
    config = RLRunConfig.quick(**overrides) if args.quick else RLRunConfig(**overrides)
    if args.steps is not None:
        config.dqn = replace(config.dqn, steps=args.steps, eval_every=max(1, args.steps // 10),
                             eps_decay_steps=min(config.dqn.eps_decay_steps, args.steps // 2))
    if args.source_steps is not None:
        config.source_dqn = replace(config.source_dqn, steps=args.source_steps,
                                    eps_decay_steps=min(config.source_dqn.eps_decay_steps, args.source_steps // 2),
                                    stop_min_steps=min(config.source_dqn.stop_min_steps, args.source_steps))
    if args.envs is not None:
        config.dqn = replace(config.dqn, num_envs=args.envs)
        config.source_dqn = replace(config.source_dqn, num_envs=args.envs)
    out = Path(args.out) if args.out else Path("zootune-out") / f"rl-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.quick:
        print("--quick: one seed, short trainings and a small cached source zoo (well under a minute on one core)")
    run_rl_transfer(config, out)
    return 0


def add_rl_parser(sub) -> argparse.ArgumentParser:
    """``zootune rl``'s parser, added to the subcommands ``sub``."""
    from zootune.cli.args import parse_seeds, positive_int

    # Help texts name the choices without importing zootune.rl (torch): `zootune --help` stays fast.
    # The library checks every value and says what is allowed.
    p = sub.add_parser(
        "rl", help="RL transfer on MinAtar: a zoo of DQN agents -> a held-out game",
        description="Build or load the RL zoo (one DQN agent per MinAtar game but the target, cached), then "
                    "train each method by DQN on the target game for every seed; writes curves.csv/jsonl, "
                    "learning_curves.png, results.json and results.md into --out.")
    p.add_argument("--quick", action="store_true", help="1 seed, short trainings: well under a minute on one core")
    p.add_argument("--game", help="target game: asterix, breakout, freeway, seaquest or space_invaders (default breakout)")
    p.add_argument("--steps", type=positive_int, help="DQN environment steps per target run (default 150000)")
    p.add_argument("--source-steps", type=positive_int,
                   help="at most this many DQN steps per source agent (default 750000; each stops earlier once its "
                        "evaluation return plateaus)")
    p.add_argument("--seeds", type=parse_seeds, help="comma-separated seeds (0,1,2) or a count (3); default 5")
    p.add_argument("--methods", help="comma-separated registered methods (default: docs/rl.md; an unknown name is "
                                     "answered with the methods RL can run)")
    p.add_argument("--finetune-each", action="store_true", help="also fine-tune every source agent")
    p.add_argument("--envs", type=positive_int, help="environments stepped together in every DQN run, the same "
                                                     "samples per environment step for any number (default 16; "
                                                     "1: the single-environment loop)")
    p.add_argument("--aggregate", choices=("conv", "conv+linear"),
                   help="layers the zoo methods aggregate: conv (default) or conv+linear (also the hidden Linear)")
    p.add_argument("--out", help="output folder (default ./zootune-out/rl-<timestamp>)")
    p.add_argument("--cache-dir", help="where the RL zoo is cached (default $ZOOTUNE_CACHE or ~/.cache/zootune)")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
    p.add_argument("--no-plots", action="store_true", help="do not write the learning-curve plot")
    p.set_defaults(func=cmd_rl)
    return p
