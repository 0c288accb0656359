"""The comparison run behind ``zootune run``: every method on every target and seed, one table.

For each target task and seed, each selected method is fitted as ``zootune fit`` fits one
(:func:`zootune.fitting.fit_members`: built from the zoo, trained with the shared engine with model
selection on the validation split, finalized) and evaluated once on the test split. Methods that
need other methods' trained models (``MethodSpec.requires``) receive those of the same target and
seed. Costs per sample come from :func:`zootune.cost.measure_cost` on the training-time module and
the finalized inference module, never from hand-typed numbers. For methods that report gates
(``MethodSpec.reports_gates``) the mean gate weight of every aggregated layer over the validation
split is recorded for the heatmap. The analyses the run declares (``RunConfig.analyses``,
:mod:`zootune.analyses`) run beside the trainings and add their own section.

The run goes target -> seed -> method (:func:`run_experiment`, :func:`_run_target`,
:func:`_run_seed`); every trained model gives one typed :class:`MethodResult`, and the rows of the
table are grouped from those records at the end (:func:`_rows`). No method is named here: what the
run does with a method follows from its :class:`~zootune.methods.registry.MethodSpec`.

The result is one JSON-serialisable dictionary (``results.json``)::

    {"zootune_version", "config", "metric", "higher_is_better", "targets", "seeds",
     "zoo": {"names", "checksums", "manifest"},
     "methods": [{"id", "label", "method", "member",
                  "targets": {target: {"test": [per seed], "test_mean", "test_std",
                                       "val": [per seed], "val_mean", "seconds": [per seed],
                                       "cost": {...}}},
                  "mean", "mean_std", "cost": {...}}],
     "gates": {method: {target: {layer: [one mean gate weight per member]}}},
     "logme": {"targets": {target: {"scores", "member_test", "kendall_tau", "top_match"}},
               "mean_kendall_tau"},
     "seconds"}

``mean`` is the mean over targets of the per-target test mean; ``mean_std`` the standard deviation
over seeds of the per-seed mean over targets. For a per-member method (``MethodSpec.per_member``,
e.g. fine-tuning) the row "<method> (best on val)" picks, per target and seed, the member with the
best validation metric: the honest single-model baseline. ``logme`` (the default analysis,
:class:`zootune.analyses.LogMERanking`): each member's LogME score on the target's training images
and Kendall's tau between that ranking and the members' test metric (mean over seeds) -- how well
ranking without training would have picked the member.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from zootune.analyses import make_analyses, member_names
from zootune.engine.config import TrainConfig
from zootune.errors import ZootuneError
from zootune.fitting import FittedSet, fit_members
from zootune.methods.registry import MethodSpec, available_methods, with_requirements
from zootune.report import atomic_write_json, atomic_write_text, mean_std, results_markdown, results_table
from zootune.tasks import ClassificationTask, task_for
from zootune.version import __version__

BEST_ON_VAL = "best-on-val"  # id suffix of a per-member method's "best on val" row


def run_training(**overrides) -> TrainConfig:
    """The training settings of ``zootune run`` (every method, target and seed trains with them, as
    the paper's Table 1 does), with ``overrides`` (TrainConfig fields) applied."""
    # Budget of the full default (4 targets x 3 seeds x 11 trainings, ~20 min on 2 quiet CPU cores):
    # all 11 trainings on one (target, seed) cost ~12 s per epoch. lr 0.1: at the earlier 0.02 every
    # method was under-trained in these few hundred steps (best single member on digits8x8 82.8% ->
    # 96.2% at 0.1, count 74.3 -> 87.3, polygons 47.2 -> 59.3; seed 0, validation agreed);
    # docs/dev-notes/zoo-tuning.md has the measurements. Exact formulations are chosen by
    # multiply-adds, not by timing (which depends on load): the same command then gives the same
    # numbers on any machine with the same floating-point behaviour.
    values = dict(epochs=8, batch_size=64, lr=0.1, eval_batch_size=256, progress=False, exact_choices="macs")
    return TrainConfig(**{**values, **overrides})


@dataclass
class RunConfig:
    """What ``zootune run`` compares, and how it trains (``train``: the engine's :class:`TrainConfig`).

    ``targets=None`` means every target of the suite; ``methods=None`` every registered method that
    applies (hub methods only with ``hub=True``; methods with ``MethodSpec.in_default_run=False`` only
    when named). ``train`` is one :class:`TrainConfig` for every training (given as a TrainConfig, or
    as a dict of fields that override :func:`run_training`'s); its ``seed`` is replaced by each of
    ``seeds``. ``method_options`` gives a method its options (``{"zoo-tuning": {"align": "all"}}``),
    checked against the method's declared options before anything is trained. ``analyses``: the
    steps of :mod:`zootune.analyses` run beside the trainings (LogME's ranking of the zoo).
    """

    targets: list[str] | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: list[str] | None = None
    hub: bool = False
    train: TrainConfig | dict = field(default_factory=run_training)
    data_seed: int = 0  # the target splits are fixed; seeds vary initialisation, order, augmentation
    cache_dir: str | None = None
    plots: bool = True
    method_options: dict[str, dict] = field(default_factory=dict)
    analyses: list[str] = field(default_factory=lambda: ["logme"])

    def __post_init__(self) -> None:
        if not isinstance(self.train, TrainConfig):
            self.train = run_training(**dict(self.train))

    @classmethod
    def quick(cls, **overrides) -> "RunConfig":
        """The ``--quick`` preset: the default target, one seed, 3 epochs of 8 steps (about 1.5 min on
        2 cores with the MiniZoo already built); ``train`` overrides apply on top of those."""
        train = dict(epochs=3, max_steps_per_epoch=8)
        given = overrides.pop("train", {})
        train.update(given.to_dict() if isinstance(given, TrainConfig) else given)
        return cls(**{"targets": ["default"], "seeds": [0], "train": train, **overrides})

    def to_dict(self) -> dict:
        return {**asdict(self), "train": self.train.to_dict()}


# --------------------------------------------------------------------------------------------------
# Small pieces


class RunLog:
    """Lines to the terminal (or a given callable) and to ``log.txt`` in the run folder."""

    def __init__(self, path: Path | None = None, echo: Callable[[str], None] | None = print):
        self.path = path
        self.echo = echo
        self._file = open(path, "a", encoding="utf-8") if path is not None else None

    def __call__(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
        if self.echo is not None:
            self.echo(message)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def state_dict_checksum(module: nn.Module) -> str:
    """sha256 over a module's state_dict (names, dtypes, shapes and values, in key order)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def default_excluded() -> dict[str, str]:
    """Registered methods that ``zootune run`` leaves out unless named, with the reason."""
    return {name: spec.default_run_note or "left out of the default comparison"
            for name, spec in available_methods().items() if not spec.in_default_run}


def select_methods(names: Sequence[str] | None = None, hub: bool = False) -> list[MethodSpec]:
    """The methods to run, in registry order, with every method a selected one ``requires`` added
    before it. ``None``: every method in the default run (hub methods only with ``hub``). Unknown
    names raise :class:`ZootuneError` listing the known ones."""
    if names is None:
        names = [n for n, s in available_methods().items() if (hub or not s.hub) and s.in_default_run]
    return with_requirements(names)


def parse_method_options(specs: Sequence[MethodSpec], method_options: dict | None) -> dict[str, Any]:
    """Every selected method's options, checked before any work (:meth:`MethodSpec.parse_options`);
    options for a method that is not selected are refused too (a typo would otherwise be ignored)."""
    method_options = dict(method_options or {})
    names = {spec.name for spec in specs}
    stray = sorted(set(method_options) - names)
    if stray:
        raise ZootuneError(f"options given for method(s) not in this run: {', '.join(stray)}")
    return {spec.name: spec.parse_options(method_options.get(spec.name)) for spec in specs}


def resolve_targets(names: Sequence[str] | None) -> list[str]:
    """Target names: ``None``/``["all"]`` = the whole suite; ``"default"`` = the suite's default."""
    from zootune.suite import targets as suite

    known = list(suite.TARGETS)
    if names is None or list(names) == ["all"]:
        return known
    resolved = []
    for name in names:
        name = suite.DEFAULT_TARGET if name == "default" else name
        if name not in suite.TARGETS and name not in suite.EXTRA_TARGETS:  # extra: only when named
            raise ZootuneError(f"unknown target {name!r}; choose from: {', '.join([*known, *suite.EXTRA_TARGETS])} "
                               "(or 'all')")
        resolved.append(name)
    return resolved


def _example_input(dataset, n: int = 16) -> torch.Tensor:
    # A batch, not one sample: BatchNorm in train mode needs more than one value per channel, and
    # per-batch work (Zoo-Tuning's kernel aggregation, the formulation its autotuner picks for the
    # shape) should be shared per sample as in training. Costs are reported per sample.
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])


def _record_gates(module: nn.Module, task, dataset, batch_size: int) -> dict[str, list[float]] | None:
    """Mean gate weight per aggregated layer over ``dataset`` (the gate statistics API)."""
    if not (hasattr(module, "record_gates") and hasattr(module, "gate_statistics")):
        return None
    from zootune.engine import evaluate

    with module.record_gates():
        evaluate(module, task, dataset, batch_size=batch_size)
    return {name: [float(v) for v in torch.as_tensor(g).flatten()] for name, g in module.gate_statistics().items()}


# --------------------------------------------------------------------------------------------------
# The comparison: target -> seed -> method, one typed record per trained model


@dataclass
class MethodResult:
    """One trained model (one member of a per-member method) on one target and seed."""

    row_id: str
    label: str
    method: str
    member: str | None
    target: str
    seed: int
    test: float
    val: float
    seconds: float
    cost: dict | None = None  # measured on the first seed
    gates: dict[str, list[float]] | None = None  # first seed, methods that report gates
    chosen: str | None = None  # a "best on val" row: the row it picked


@dataclass
class _RunContext:
    config: RunConfig
    specs: list[MethodSpec]
    options: dict[str, Any]
    zoo: Any
    hub: Any
    log: RunLog
    analyses: list = field(default_factory=list)  # zootune.analyses instances, one per declared analysis


def _best_on_val(spec: MethodSpec, records: list[MethodResult], higher_is_better: bool) -> MethodResult:
    best = records[0]
    for record in records[1:]:
        if record.val > best.val if higher_is_better else record.val < best.val:
            best = record
    return MethodResult(row_id=f"{spec.name}:{BEST_ON_VAL}", label=f"{spec.name} (best on val)", method=spec.name,
                        member=None, target=best.target, seed=best.seed, test=best.test, val=best.val,
                        seconds=0.0, cost=best.cost, chosen=best.row_id)


def _run_seed(run: _RunContext, target: str, splits, task, seed: int, first_seed: bool,
              example: torch.Tensor) -> list[MethodResult]:
    """Every method on one target and seed; requirements are fitted once and shared."""
    from zootune.engine import evaluate

    config, log = run.config, run.log
    train_config = dataclasses.replace(config.train, seed=seed)
    done = FittedSet()
    records: list[MethodResult] = []
    for spec in run.specs:
        if not spec.supports(task):
            if first_seed:
                log(f"{spec.name}: skipped on {target} (supports "
                    f"{', '.join(t.__name__ for t in spec.task_types)} only)")
            continue
        members = run.hub if spec.hub else run.zoo
        names = member_names(members)
        fits = fit_members(spec, members, task, splits, train_config, done, options=run.options[spec.name],
                           eval_batch_size=config.train.eval_batch_size,
                           # the architecture is the same for every seed: measure once per target
                           cost_input=example if first_seed else None)
        method_records = []
        for member, result in fits:
            test = float(evaluate(result.model, task, splits.test, batch_size=config.train.eval_batch_size)[task.metric_name])
            member_name = None if member is None else names[member]
            row_id = spec.name if member is None else f"{spec.name}:{member_name}"
            label = spec.name if member is None else f"{spec.name} [{member_name}]"
            record = MethodResult(row_id, label, spec.name, member_name, target, seed, test, result.val_metric,
                                  round(result.seconds, 2), cost=result.cost if first_seed else None)
            if first_seed and spec.reports_gates:
                record.gates = _record_gates(result.built, task, splits.val, config.train.eval_batch_size)
                if record.gates is None:
                    log(f"{spec.name}: no gate statistics API; gate heatmap skipped")
            log(f"{target} seed {seed} {label}: val {result.val_metric:.2f} test {test:.2f} "
                f"{task.metric_name} ({result.seconds:.1f} s)")
            method_records.append(record)
        records += method_records
        if spec.per_member:
            records.append(_best_on_val(spec, method_records, task.higher_is_better))
    return records


def _run_target(run: _RunContext, target: str, splits, task) -> tuple[list[MethodResult], dict[str, dict]]:
    """Every seed on one target; and the cells of the run's analyses (name -> cell) for it."""
    config = run.config
    log = run.log
    # costs per sample at the training batch size: per-step work (Zoo-Tuning's alignment of the
    # bank) is shared by the batch in training, as measure_cost's per-sample numbers assume
    example = _example_input(splits.train, n=config.train.batch_size)
    kind = (f"{splits.num_classes} classes" if isinstance(task, ClassificationTask)
            else f"{type(task).__name__}, {task.metric_name}")
    log(f"target {target}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test, {kind}")

    def say(message: str) -> None:
        log(f"target {target}: {message}")

    for analysis in run.analyses:
        analysis.before_target(run.zoo, splits, task, config.train.eval_batch_size, say)
    records: list[MethodResult] = []
    for index, seed in enumerate(config.seeds):
        records += _run_seed(run, target, splits, task, seed, index == 0, example)
    cells = {analysis.name: analysis.after_target(records, task, say) for analysis in run.analyses}
    return records, {name: cell for name, cell in cells.items() if cell is not None}


def _rows(records: list[MethodResult], targets: list[str], seeds: list[int]) -> tuple[list[dict], dict]:
    """The table's rows (in the order rows first appear) and the gate statistics, from the records."""
    rows: dict[str, dict] = {}
    gates: dict[str, dict] = {}
    for r in records:
        row = rows.setdefault(r.row_id, {"id": r.row_id, "label": r.label, "method": r.method, "member": r.member,
                                         "targets": {}, "cost": None})
        cell = row["targets"].setdefault(r.target, {"test": [], "val": [], "seconds": []})
        cell["test"].append(r.test)
        cell["val"].append(r.val)
        cell["seconds"].append(r.seconds)
        if r.chosen is not None:
            cell.setdefault("chosen", []).append(r.chosen)
        if r.cost is not None:
            cell["cost"] = r.cost
        if r.gates:
            gates.setdefault(r.method, {})[r.target] = r.gates
    ordered = list(rows.values())
    _summarise(ordered, targets, seeds)
    return ordered, gates


def _summarise(rows: list[dict], targets: list[str], seeds: list[int]) -> None:
    for row in rows:
        per_seed_means = []
        for cell in row["targets"].values():
            cell["test_mean"], cell["test_std"] = mean_std(cell["test"])
            cell["val_mean"], cell["val_std"] = mean_std(cell["val"])
        if all(t in row["targets"] for t in targets):
            for k in range(len(seeds)):
                per_seed_means.append(sum(row["targets"][t]["test"][k] for t in targets) / len(targets))
            row["mean"] = sum(row["targets"][t]["test_mean"] for t in targets) / len(targets)
            row["mean_std"] = mean_std(per_seed_means)[1]
        else:
            row["mean"], row["mean_std"] = None, None
        if row["cost"] is None and row["targets"]:
            row["cost"] = next(iter(row["targets"].values())).get("cost")


def _load_zoo(config: RunConfig, log: RunLog) -> tuple[Any, list | None, float]:
    """The MiniZoo, built first where members are missing (timed apart from the run)."""
    from zootune.minizoo import build_minizoo, list_minizoo, load_minizoo

    build_seconds = 0.0
    missing = [r["name"] for r in list_minizoo(cache_dir=config.cache_dir) if not (r["built"] and r["checksum_ok"])]
    if missing:
        # Pretraining is a one-time cost (cached): timed and reported apart from the run.
        log(f"building MiniZoo members {', '.join(missing)} (once; cached for later runs)")
        build_start = time.perf_counter()
        build_minizoo(cache_dir=config.cache_dir, progress=config.train.progress)
        build_seconds = time.perf_counter() - build_start
        log(f"MiniZoo built in {build_seconds:.0f} s (not counted in the run's time)")
    zoo = load_minizoo(cache_dir=config.cache_dir, build_if_missing=False)
    return zoo, list_minizoo(cache_dir=config.cache_dir), build_seconds


def _resolve_loader(config: RunConfig, load_target: Callable | None,
                    target_names: Sequence[str] | None) -> tuple[Callable, list[str]]:
    """``(load_target(name, seed) -> DatasetSplits, target names)``: the suite's, or the caller's."""
    if load_target is None:
        from functools import partial

        from zootune.suite.targets import get_target

        return partial(get_target, cache_dir=config.cache_dir), resolve_targets(config.targets)
    targets = list(target_names or config.targets or [])
    if not targets:
        raise ZootuneError("no targets given")
    return load_target, targets


def _run_targets(run: _RunContext, targets: list[str], load_target: Callable) -> tuple[list, dict, str | None, bool]:
    """Every target in turn: (records, analysis name -> target -> cell, metric name, higher is better)."""
    records: list[MethodResult] = []
    cells: dict[str, dict] = {analysis.name: {} for analysis in run.analyses}
    metric_name, higher_is_better = None, True
    for target in targets:
        splits = load_target(target, seed=run.config.data_seed)
        task = task_for(splits)
        if metric_name is not None and task.metric_name != metric_name:
            # one table has one metric: a mean over targets of accuracy and NME means nothing
            raise ZootuneError(
                f"target {target!r} is scored by {task.metric_name}, the targets before it by "
                f"{metric_name}; run targets with different metrics separately")
        metric_name, higher_is_better = task.metric_name, task.higher_is_better
        target_records, target_cells = _run_target(run, target, splits, task)
        records += target_records
        for name, cell in target_cells.items():
            cells[name][target] = cell
    return records, cells, metric_name, higher_is_better


def _write_results(results: dict, out_dir: Path, plots: bool, log: RunLog) -> None:
    """results.json, results.md and the plots into ``out_dir``; the table to the log."""
    if plots:
        from zootune.report import write_plots

        results["plots"] = write_plots(results, out_dir, log=log)
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "results.md", results_markdown(results))
    log("\n" + results_table(results))
    log(f"results written to {out_dir} ({results['seconds']:.0f} s)")


def run_experiment(
    config: RunConfig,
    out_dir: str | Path,
    *,
    zoo=None,
    hub=None,
    load_target: Callable | None = None,
    target_names: Sequence[str] | None = None,
    echo: Callable[[str], None] | None = print,
) -> dict:
    """Run the comparison and write ``results.json``, ``results.md``, ``log.txt`` and the plots
    into ``out_dir``; returns the results dictionary.

    ``zoo`` defaults to the MiniZoo (:func:`zootune.minizoo.load_minizoo`, built if missing), ``hub``
    (for hub methods) to the MiniZoo hub (:func:`zootune.minizoo.hub.load_hub`), and
    ``load_target(name, seed) -> DatasetSplits`` to :func:`zootune.suite.targets.get_target`; tests
    pass tiny ones. ``target_names`` then overrides the suite's names.
    """
    specs = select_methods(config.methods, hub=config.hub)
    options = parse_method_options(specs, config.method_options)  # before any work
    analyses = make_analyses(config.analyses)
    load_target, targets = _resolve_loader(config, load_target, target_names)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(out_dir / "log.txt", echo)
    started = time.perf_counter()
    try:
        manifest, build_seconds = None, 0.0
        if zoo is None:
            zoo, manifest, build_seconds = _load_zoo(config, log)
        if hub is None and any(spec.hub for spec in specs):
            from zootune.minizoo.hub import load_hub

            hub = load_hub(cache_dir=config.cache_dir)
        names = member_names(zoo)
        log(f"zootune {__version__}: {len(specs)} methods ({', '.join(s.name for s in specs)}) on "
            f"{len(targets)} targets ({', '.join(targets)}) x {len(config.seeds)} seeds; zoo: {', '.join(names)}")
        run = _RunContext(config, specs, options, zoo, hub, log, analyses)
        records, cells, metric_name, higher_is_better = _run_targets(run, targets, load_target)
        rows, gates = _rows(records, targets, list(config.seeds))
        results = {
            "zootune_version": __version__, "config": config.to_dict(), "metric": metric_name,
            "higher_is_better": higher_is_better, "targets": targets, "seeds": list(config.seeds),
            "zoo": {"names": names, "checksums": {n: state_dict_checksum(m) for n, m in zip(names, zoo)},
                    "manifest": manifest},
            "methods": rows, "gates": gates,
            **{analysis.name: analysis.summary(cells[analysis.name]) for analysis in analyses},
            "seconds": round(time.perf_counter() - started - build_seconds, 1),
            "zoo_build_seconds": round(build_seconds, 1), "log": "log.txt",
        }
        _write_results(results, out_dir, config.plots, log)
        return results
    finally:
        log.close()


def load_results(path: str | Path) -> dict:
    """Read a ``results.json`` (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise ZootuneError(f"no results.json at {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


__all__ = ["RunConfig", "MethodResult", "run_training",
           "run_experiment", "select_methods", "load_results", "state_dict_checksum", "default_excluded"]
