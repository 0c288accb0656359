"""The RL transfer comparison behind ``zootune rl``: a zoo of MinAtar agents -> a held-out game.

Every method is a registered method (:mod:`zootune.methods.registry`), built by its own
``MethodSpec.build`` with an :class:`RLTask` (which supplies the Q head) exactly as classification
builds it, and trained by DQN (:func:`zootune.rl.dqn.train_dqn`); nothing here names a method.
The comparison runs the registered methods that make one trained module from the zoo alone
(:func:`rl_methods`); by default :data:`zootune.methods.registry.DEFAULT_RL_METHODS`.

Before any training on the target, each source agent plays the target game zero-shot with its own
head (``selection_episodes`` episodes, epsilon 0.05; :func:`select_best_source`). Those returns are
the members' ranking: every build receives them as ``BuildContext.member_scores`` (the robust
Zoo-Tuning variant starts on the best of them), and a per-member method (fine-tuning) runs on the
best source (row ``<method>-best``) and, with ``finetune_each``, on every source (``<method>-<game>``).
A method whose result is a plain model (Lite Zoo-Tuning: folded) is evaluated as that model.

Outputs in ``out``: ``curves.csv`` and ``curves.jsonl`` (method, seed, step, mean evaluation return),
``learning_curves.png`` (mean and 95% interval over seeds), ``results.json`` and ``results.md`` (area
under the learning curve and final return per method, mean and 95% interval over seeds), ``log.txt``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from zootune.errors import ZootuneError
from zootune.methods.registry import DEFAULT_RL_METHODS, BuildContext, MethodSpec, available_methods, get_method
from zootune.report import (
    atomic_write_json,
    atomic_write_text,
    format_markdown_table,
    format_mean_std,
    mean_ci95,
    mean_std,
)
from zootune.rl.dqn import EVAL_SEED_OFFSET, DQNConfig, evaluate_policy, train_dqn
from zootune.rl.envs import check_game
from zootune.rl.task import RLTask
from zootune.rl.zoo import load_rl_zoo
from zootune.version import __version__

AGGREGATE_CHOICES = {"conv": (nn.Conv2d,), "conv+linear": (nn.Conv2d, nn.Linear)}
# Environments stepped together in every DQN run of the comparison (docs/rl.md measures 1, 8 and 16):
# the replay ratio is the reference loop's for any number (zootune.rl.dqn.update_schedule).
NUM_ENVS = 16
# The zoo's source agents: trained until their evaluation return plateaus (10 episodes every 50k
# steps; no 5% gain over 4 evaluations, after 300k steps), at most 750k steps; exploration decays
# over MinAtar's 100k steps, the replay starts after 5k (docs/rl.md: each agent's curve).
SOURCE_DQN = DQNConfig(steps=750_000, num_envs=NUM_ENVS, learning_starts=5_000, eval_every=50_000, eval_episodes=10,
                       eps_decay_steps=100_000, stop_patience=4, stop_min_gain=0.05, stop_min_steps=300_000)
# Model construction and source selection use seeds offset from the training seed, so a fresh head
# and the exploration stream are not drawn from one generator state.
MODEL_SEED_OFFSET = 3_000_017
SELECTION_SEED = 2_000_003


@dataclass
class RLRunConfig:
    """The comparison's settings; :meth:`quick` is the short preset (~20 s, docs/rl.md)."""

    game: str = "breakout"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_RL_METHODS))
    finetune_each: bool = False  # also run every per-member method (fine-tuning) on every source
    aggregate: str = "conv"
    dqn: DQNConfig = field(default_factory=lambda: DQNConfig(steps=150_000, num_envs=NUM_ENVS, eval_every=15_000,
                                                             eps_decay_steps=75_000))
    source_dqn: DQNConfig = field(default_factory=lambda: replace(SOURCE_DQN))
    zoo_seed: int = 0
    selection_episodes: int = 10
    final_episodes: int = 20
    threads: int = 1  # the nets are tiny: one thread is fastest on a shared CPU and keeps runs reproducible
    cache_dir: str | None = None
    progress: bool = True
    plots: bool = True

    def __post_init__(self):
        check_game(self.game)
        runnable = rl_methods(RLTask())
        unknown = [m for m in self.methods if m not in runnable]
        if unknown:
            raise ZootuneError(f"unknown RL method {unknown[0]!r}; choose from: {', '.join(runnable)}")
        if not self.methods and not self.finetune_each:
            raise ZootuneError("no RL method selected")
        if self.aggregate not in AGGREGATE_CHOICES:
            raise ZootuneError(f"aggregate must be one of {', '.join(AGGREGATE_CHOICES)}, got {self.aggregate!r}")
        if not self.seeds:
            raise ZootuneError("give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ZootuneError(f"seeds must be distinct, got {self.seeds}")
        for name in ("selection_episodes", "final_episodes", "threads"):
            if int(getattr(self, name)) < 1:
                raise ZootuneError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def quick(cls, **overrides) -> RLRunConfig:
        """One seed, 4k target steps, 3k-step source agents: ~20 s on one core, the zoo built included."""
        quick = dict(
            seeds=[0],
            dqn=DQNConfig(steps=4_000, num_envs=NUM_ENVS, learning_starts=500, eval_every=1_000, eval_episodes=3,
                          eps_decay_steps=2_000, replay_capacity=10_000, target_update=500,
                          max_eval_episode_steps=500),
            source_dqn=DQNConfig(steps=3_000, num_envs=NUM_ENVS, learning_starts=500, eval_every=0, eval_episodes=3,
                                 eps_decay_steps=1_500, replay_capacity=10_000, target_update=500,
                                 max_eval_episode_steps=500),
            selection_episodes=3, final_episodes=5,
        )
        quick.update(overrides)
        return cls(**quick)

    def to_dict(self) -> dict:
        return asdict(self)


def rl_methods(task: RLTask) -> dict[str, MethodSpec]:
    """The registered methods the comparison can run on ``task``: those that train one module built
    from the zoo alone (no hub, no other method's fitted models, no source data), in table order.
    A method that needs the target's labelled data says so when it is built."""
    return {name: spec for name, spec in available_methods().items()
            if spec.trains and not spec.hub and not spec.requires and not spec.needs_source_data
            and spec.supports(task)}


def build_q_network(method: str, zoo, task: RLTask, seed: int, aggregate: str = "conv", member: int | None = None,
                    member_scores: list[float] | None = None) -> nn.Module:
    """Registered method ``method``'s Q-network, built by its ``MethodSpec.build`` from a
    :class:`BuildContext` (zoo, task, ``seed``, the zoo ``member`` of a per-member method, the
    members' ranking ``member_scores``); a method that aggregates layers aggregates ``aggregate``'s.
    torch's generator is seeded with ``seed`` first, so the new head is drawn from it."""
    spec = get_method(method)
    options = {spec.layer_types_option: AGGREGATE_CHOICES[aggregate]} if spec.layer_types_option else None
    torch.manual_seed(seed)
    return spec.build(BuildContext(zoo=zoo, task=task, config=spec.parse_options(options), member=member,
                                   member_scores=member_scores, seed=seed))


def select_best_source(zoo, game: str, episodes: int, sticky_action_prob: float = 0.1,
                       max_episode_steps: int = 2_000) -> tuple[int, dict[str, float]]:
    """(index, {name: mean return}) of the member whose own Q-head plays ``game`` best, zero-shot
    (epsilon 0.05; ties go to the earlier member)."""
    scores = {}
    for name, member in zoo.items():
        returns = evaluate_policy(member, game, episodes, seed=SELECTION_SEED, sticky_action_prob=sticky_action_prob,
                                  max_episode_steps=max_episode_steps)
        scores[name] = float(np.mean(returns))
    best = max(range(len(zoo)), key=lambda i: (scores[zoo.names[i]], -i))
    return best, scores


def _runs(config: RLRunConfig, zoo, best: int) -> list[tuple[str, str, str, int | None]]:
    """(row id, label, method, member) in table order: a per-member method on the zero-shot-best
    source; ``finetune_each`` adds every per-member method on every source."""
    runs = []
    for name in config.methods:
        if get_method(name).per_member:
            runs.append((f"{name}-best", f"{name} [{zoo.names[best]}] (zero-shot best)", name, best))
        else:
            runs.append((name, name, name, None))
    if config.finetune_each:  # every source but the best one a row above already trains
        per_member = [name for name, spec in rl_methods(RLTask()).items() if spec.per_member]
        runs += [(f"{name}-{member}", f"{name} [{member}]", name, i)
                 for name in per_member for i, member in enumerate(zoo.names)
                 if not (i == best and name in config.methods)]
    return runs


def summarize_curves(curves: dict[int, list[tuple[int, float]]]) -> list[dict]:
    """Mean, std and 95% interval half-width (over seeds) of the evaluation return at each step all
    seeds evaluated."""
    steps = sorted(set.intersection(*({s for s, _ in c} for c in curves.values()))) if curves else []
    rows = []
    for step in steps:
        values = [dict(c)[step] for c in curves.values()]
        mean, std = mean_std(values)
        rows.append({"step": step, "mean": mean, "std": std, "ci95": mean_ci95(values)[1]})
    return rows


def area_under_curve(curve: list[tuple[int, float]]) -> float | None:
    """A learning curve's normalised area: the mean evaluation return over its points (evaluations
    are evenly spaced, every ``eval_every`` steps), so it rewards learning early as well as ending high."""
    return float(np.mean([r for _, r in curve])) if curve else None


def run_rl_transfer(config: RLRunConfig, out: str | Path, log: Callable[[str], None] | None = None) -> dict:
    """Run the comparison and write its files into ``out``; returns the results dictionary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def say(message: str) -> None:
        lines.append(message)
        (log or print)(message)
        atomic_write_text(out / "log.txt", "\n".join(lines) + "\n")

    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    start = time.perf_counter()
    try:
        zoo, zoo_rows = load_rl_zoo(config.game, config.source_dqn, seed=config.zoo_seed, cache_dir=config.cache_dir,
                                    progress=config.progress, log=say)
        say(f"RL zoo for target {config.game}: {', '.join(zoo.names)}")
        best, selection = select_best_source(zoo, config.game, config.selection_episodes,
                                             config.dqn.sticky_action_prob, config.dqn.max_eval_episode_steps)
        say("zero-shot return on " + config.game + ": "
            + ", ".join(f"{n} {v:.2f}" for n, v in selection.items()) + f" -> best source {zoo.names[best]}")
        records = _train_runs(config, zoo, best, [selection[name] for name in zoo.names], out, say)
        results = {
            "zootune_version": __version__, "game": config.game, "seeds": list(config.seeds),
            "config": config.to_dict(), "metric": "return", "higher_is_better": True,
            "zoo": {"names": zoo.names, "agents": zoo_rows}, "selection": selection, "best_source": zoo.names[best],
            "methods": [_summarize_record(record) for record in records.values()],
            "seconds": time.perf_counter() - start,
        }
        if config.plots:
            plot = plot_learning_curves(results, out / "learning_curves.png", log=say)
            results["plot"] = plot.name if plot else None
        atomic_write_json(out / "results.json", results)
        atomic_write_text(out / "results.md", results_markdown(results))
        say(results_table_text(results))
        say(f"wrote {out / 'results.json'}, results.md, curves.csv ({results['seconds']:.0f}s)")
        return results
    finally:
        torch.set_num_threads(threads)


def final_evaluation(model: nn.Module, config: RLRunConfig, seed: int) -> list[float]:
    """The returns of a trained run's final evaluation: ``final_episodes`` episodes on their own
    seed stream (offset from the curve's), at the evaluation epsilon."""
    return evaluate_policy(model, config.game, config.final_episodes, seed=seed + 2 * EVAL_SEED_OFFSET,
                           epsilon=config.dqn.eval_epsilon, sticky_action_prob=config.dqn.sticky_action_prob,
                           max_episode_steps=config.dqn.max_eval_episode_steps)


def _train_runs(config: RLRunConfig, zoo, best: int, member_scores: list[float], out: Path,
                say: Callable[[str], None]) -> dict[str, dict]:
    """Train every run of every seed (each seed's Q-networks are all built first, so a method that
    cannot be built fails before any training); returns {row id: record}, curves written as they come."""
    task = RLTask()
    runs = _runs(config, zoo, best)
    records: dict[str, dict] = {}
    curve_rows = []
    for seed in config.seeds:
        models = [build_q_network(method, zoo, task, seed=seed + MODEL_SEED_OFFSET, aggregate=config.aggregate,
                                  member=member, member_scores=member_scores) for _, _, method, member in runs]
        for (run_id, label, _, member), model in zip(runs, models):
            result = train_dqn(model, config.game, config.dqn, seed=seed, task=task, progress=config.progress,
                               desc=f"{run_id} seed {seed}", log=say)
            final = float(np.mean(final_evaluation(result.model, config, seed)))
            record = records.setdefault(run_id, {"id": run_id, "label": label,
                                                 "member": None if member is None else zoo.names[member],
                                                 "final": [], "seconds": [], "curves": {}})
            record["final"].append(final)
            record["seconds"].append(result.seconds)
            record["curves"][seed] = result.curve
            curve_rows += [{"method": run_id, "seed": seed, "step": s, "mean_return": r} for s, r in result.curve]
            say(f"{run_id} seed {seed}: final return {final:.2f} over {config.final_episodes} episodes "
                f"({result.seconds:.0f}s, {result.steps / max(result.seconds, 1e-9):.0f} steps/s)")
            _write_curves(out, curve_rows)
    return records


def _summarize_record(record: dict) -> dict:
    """A run's record with its final return's and area under the curve's mean and 95% interval over
    seeds, and its mean curve."""
    mean, std = mean_std(record["final"])
    areas = [area_under_curve(c) for c in record["curves"].values()]
    areas = [a for a in areas if a is not None]
    auc_mean, auc_ci95 = mean_ci95(areas) if areas else (None, None)
    return {**{k: v for k, v in record.items() if k != "curves"}, "mean": mean, "std": std,
            "ci95": mean_ci95(record["final"])[1], "auc": areas, "auc_mean": auc_mean, "auc_ci95": auc_ci95,
            "curve": summarize_curves(record["curves"]),
            "curves": {str(s): c for s, c in record["curves"].items()}}


def _write_curves(out: Path, rows: list[dict]) -> None:
    csv = "method,seed,step,mean_return\n" + "".join(
        f"{r['method']},{r['seed']},{r['step']},{r['mean_return']:.6g}\n" for r in rows)
    atomic_write_text(out / "curves.csv", csv)
    atomic_write_text(out / "curves.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def _table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    header = ["method", f"area under the curve on {results['game']} (± 95% CI)",
              "final return (± 95% CI)", "seeds", "seconds/run"]
    rows = []
    for row in results["methods"]:
        rows.append([row["label"], format_mean_std(row.get("auc_mean"), row.get("auc_ci95")),
                     format_mean_std(row["mean"], row.get("ci95")), str(len(row["final"])),
                     f"{np.mean(row['seconds']):.0f}"])
    return header, rows


def merge_results(runs: list[dict]) -> dict:
    """One results dictionary from several ``zootune rl`` runs on the same game and zoo (e.g. the
    default methods, the paper variants, ``--finetune-each`` run separately): the first run's,
    with the rows of later runs whose id is new appended; each row keeps its own seeds."""
    if not runs:
        raise ZootuneError("no results to merge")
    first = runs[0]
    for other in runs[1:]:
        if (other["game"], other["zoo"]["names"], other["selection"]) != (first["game"], first["zoo"]["names"],
                                                                          first["selection"]):
            raise ZootuneError("runs to merge must share the game, the zoo and its zero-shot returns")
    merged = {**first, "methods": list(first["methods"]), "seconds": sum(r["seconds"] for r in runs)}
    seen = {row["id"] for row in merged["methods"]}
    for other in runs[1:]:
        for row in other["methods"]:
            if row["id"] not in seen:
                merged["methods"].append(row)
                seen.add(row["id"])
    merged["seeds"] = sorted({int(s) for row in merged["methods"] for s in row["curves"]})
    return merged


def source_agents_markdown(rows: list[dict]) -> str:
    """A markdown table of the zoo's agents: steps trained, the return of the kept agent on its own
    game and its evaluation curve (rows of agents built without a curve show none)."""
    table = [[r["game"], str(r.get("steps_trained", r["steps"])), f"{r['eval_return']:.2f}",
              ", ".join(f"{value:.1f}" for _, value in r.get("curve", [])) or "-"] for r in rows]
    return format_markdown_table(["source agent", "steps trained", "return (own game)", "evaluation curve"], table)


def results_table_text(results: dict) -> str:
    from zootune.report import format_text_table

    header, rows = _table_rows(results)
    return format_text_table(header, rows)


def results_markdown(results: dict) -> str:
    header, rows = _table_rows(results)
    cfg = results["config"]
    seeds = ", ".join(map(str, results["seeds"]))
    lines = [
        f"# RL transfer to MinAtar {results['game']}",
        "",
        (f"Zoo: the DQN agents of {', '.join(results['zoo']['names'])} (below). "
         f"Target training: {cfg['dqn']['steps']} DQN steps per run, seeds {seeds}. Final return: mean over "
         f"{cfg['final_episodes']} episodes (epsilon {cfg['dqn']['eval_epsilon']}); area under the curve: the mean "
         f"evaluation return over the curve's points ({cfg['dqn']['eval_episodes']} episodes every "
         f"{cfg['dqn']['eval_every']} steps); both as mean ± the half-width of a 95% t-interval over seeds."),
        "",
        f"Zero-shot return of each source on {results['game']}: "
        + ", ".join(f"{k} {v:.2f}" for k, v in results["selection"].items())
        + f" (best: {results['best_source']}).",
        "",
        format_markdown_table(header, rows),
        "",
        f"Source agents: the return of each kept agent on its own game ({cfg['source_dqn']['eval_episodes']} "
        f"episodes)" + (f" and its curve during training (one point every {cfg['source_dqn']['eval_every']} steps)"
                        if cfg["source_dqn"]["eval_every"] else "") + ":",
        "",
        source_agents_markdown(results["zoo"]["agents"]),
        "",
    ]
    if results.get("plot"):
        lines += [f"![learning curves]({results['plot']})", ""]
    lines.append(f"Wall time: {results['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def plot_learning_curves(results: dict, path: Path, log: Callable[[str], None] = print) -> Path | None:
    """Mean evaluation return vs environment steps per method, shaded by the 95% interval over seeds."""
    from zootune.report import matplotlib_available

    if not matplotlib_available():
        log("matplotlib is not installed: learning-curve plot skipped (pip install 'zootune[plot]')")
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for row in results["methods"]:
        if not row["curve"]:
            continue
        steps = np.array([p["step"] for p in row["curve"]])
        mean = np.array([p["mean"] for p in row["curve"]])
        half = np.nan_to_num(np.array([p.get("ci95", np.nan) for p in row["curve"]]))
        ax.plot(steps, mean, label=row["label"])
        ax.fill_between(steps, mean - half, mean + half, alpha=0.15)
    ax.set_xlabel("environment steps on the target game")
    ax.set_ylabel("evaluation return (epsilon 0.05)")
    ax.set_title(f"MinAtar {results['game']}: mean and 95% interval over seeds")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path
