"""The comparison run behind ``zootune run``: every method on every target and seed, one table.

For each target task and seed, each selected method is built from the zoo
(:func:`zootune.methods.registry.get_method`), trained with the shared engine
(:class:`zootune.engine.Trainer`, model selection on the validation split), finalized, and
evaluated once on the test split. Methods that need other methods' trained models
(``MethodSpec.requires``) receive those of the same target and seed. Costs per sample come from
:func:`zootune.cost.measure_cost` on the training-time module and the finalized inference module,
never from hand-typed numbers. For methods that report gates (``MethodSpec.reports_gates``) the mean
gate weight of every aggregated layer over the validation split is recorded for the heatmap.

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
best validation metric: the honest single-model baseline. ``logme``: when a per-member method runs,
each member's LogME score on the target's training images (frozen features, one pass) and Kendall's
tau between that ranking and the members' test metric (mean over seeds) -- how well ranking without
training would have picked the member.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import nn

from zootune.errors import ZootuneError
from zootune.methods.registry import BuildContext, MethodSpec, available_methods, get_method
from zootune.report import atomic_write_json, atomic_write_text, mean_std, results_markdown, results_table
from zootune.tasks import ClassificationTask
from zootune.version import __version__

BEST_ON_VAL = "best-on-val"  # id suffix of a per-member method's "best on val" row


@dataclass
class RunConfig:
    """What ``zootune run`` compares and how long it trains.

    ``targets=None`` means every target of the suite; ``methods=None`` every registered method that
    applies (hub methods only with ``hub=True``; methods with ``MethodSpec.in_default_run=False`` only
    when named). Every training uses the same optimiser settings (as the paper's Table 1 does);
    ``method_options`` gives a method its options (``{"zoo-tuning": {"align": "all"}}``), checked
    against the method's declared options before anything is trained.
    """

    # Budget of the full default (4 targets x 3 seeds x 11 trainings, ~20 min on 2 quiet CPU cores):
    # all 11 trainings on one (target, seed) cost ~12 s per epoch. lr 0.1: at the earlier 0.02 every
    # method was under-trained in these few hundred steps (best single member on digits8x8 82.8% ->
    # 96.2% at 0.1, count 74.3 -> 87.3, polygons 47.2 -> 59.3; seed 0, validation agreed);
    # docs/dev-notes/zoo-tuning.md has the measurements.
    targets: list[str] | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: list[str] | None = None
    hub: bool = False
    epochs: int = 8
    batch_size: int = 64
    lr: float = 0.1
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    max_steps_per_epoch: int | None = None
    eval_batch_size: int = 256
    data_seed: int = 0  # the target splits are fixed; seeds vary initialisation, order, augmentation
    cache_dir: str | None = None
    plots: bool = True
    progress: bool = False
    deterministic: bool = True  # choose exact formulations by multiply-adds, not by timing
    method_options: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def quick(cls, **overrides) -> "RunConfig":
        """The ``--quick`` preset: the default target, one seed, short trainings (≤3 min on 2 cores
        with the MiniZoo already built)."""
        values = dict(targets=["default"], seeds=[0], epochs=3, max_steps_per_epoch=8)  # 117 s measured at load 2
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


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


def member_names(zoo: Sequence[nn.Module]) -> list[str]:
    """``zoo.names`` for a :class:`zootune.Zoo`, else ``member0, member1, ...`` for a plain list."""
    names = getattr(zoo, "names", None)
    return list(names) if names is not None else [f"member{i}" for i in range(len(zoo))]


def default_excluded() -> dict[str, str]:
    """Registered methods that ``zootune run`` leaves out unless named, with the reason."""
    return {name: spec.default_run_note or "left out of the default comparison"
            for name, spec in available_methods().items() if not spec.in_default_run}


def select_methods(names: Sequence[str] | None = None, hub: bool = False) -> list[MethodSpec]:
    """The methods to run, in registry order, with every method a selected one ``requires`` added
    before it. Unknown names raise :class:`ZootuneError` listing the known ones."""
    registered = available_methods()
    if names is None:
        wanted = [n for n, s in registered.items() if (hub or not s.hub) and s.in_default_run]
    else:
        wanted = [get_method(n).name for n in names]
    ordered: list[str] = []

    def add(name: str, chain: tuple[str, ...] = ()) -> None:
        if name in ordered:
            return
        if name in chain:
            raise ZootuneError(f"methods require each other in a cycle: {' -> '.join(chain + (name,))}")
        for required in get_method(name).requires:
            add(required, chain + (name,))
        ordered.append(name)

    for name in sorted(wanted, key=list(registered).index):
        add(name)
    return [registered[n] for n in ordered]


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
    from zootune.data import targets as suite

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


def _train_config(config: RunConfig, seed: int):
    from zootune.engine import TrainConfig

    return TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        optimizer=config.optimizer,
        lr=config.lr,
        weight_decay=config.weight_decay,
        schedule=config.schedule,
        seed=seed,
        max_steps_per_epoch=config.max_steps_per_epoch,
        progress=config.progress,
        # exact formulations chosen by multiply-adds, not by timing (which depends on load): the same
        # command then gives the same numbers on the same machine
        formulations="macs" if config.deterministic else None,
    )


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
# Fitting one method, with what it requires (shared by `zootune run` and `zootune fit`)


@dataclass
class Fitted:
    """A trained method: the built (training-time) module and the finalized model to evaluate."""

    built: nn.Module
    model: nn.Module
    val_metric: float
    seconds: float
    cost: dict | None = None
    resolved: dict = field(default_factory=dict)  # options the method resolved from the data (BuildContext.resolved)


class _Trained(NamedTuple):
    """One training inside :func:`fit_method` (the method's first, or a further candidate)."""

    ctx: BuildContext
    built: nn.Module
    model: nn.Module
    val_metric: float
    train_cost: dict | None
    measuring: float  # seconds spent measuring costs (not the method's time)
    config: Any = None  # the method's options this training was built with, resolved ones included


# Candidates (e.g. robust Zoo-Tuning's starts) are screened by successive halving: each trains for
# this share of the epochs (the schedule still spans all of them), the best on validation continues.
# A quarter picked the wrong start on polygons seed 1 of `zootune run` (the validation metric after
# 2 of 8 epochs: robust Zoo-Tuning 39.0 where its first start alone reaches 61.0); half picked right.
SCREEN_FRACTION = 0.5


def screening_epochs(epochs: int) -> int | None:
    """Epochs each candidate trains before the best one continues (None: too few epochs to screen)."""
    screen = max(1, math.ceil(SCREEN_FRACTION * epochs))
    return screen if screen < epochs else None


@dataclass
class FittedSet:
    """The methods fitted so far for one target and seed: what later methods may require."""

    models: dict[str, Any] = field(default_factory=dict)  # method -> finalized model (a list per member)
    member_val_metrics: list[float] | None = None  # a per-member method's validation metrics, zoo order

    def add(self, spec: MethodSpec, fits: Sequence[Fitted], zoo_size: int) -> None:
        self.models[spec.name] = [f.model for f in fits] if spec.per_member else fits[0].model
        if spec.per_member and len(fits) == zoo_size:
            self.member_val_metrics = [f.val_metric for f in fits]


def fit_method(
    spec: MethodSpec,
    zoo,
    task,
    splits,
    train_config,
    *,
    member: int | None = None,
    fitted: dict | None = None,
    options=None,
    member_val_metrics: Sequence[float] | None = None,
    source=None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    eval_batch_size: int = 256,
    cost_input: torch.Tensor | None = None,
) -> Fitted:
    """Build ``spec`` on ``zoo`` for ``task`` (a :class:`BuildContext` with the data splits), train
    it on ``splits.train`` (selection on ``splits.val``) unless ``spec.trains`` is False, and finalize it.

    A method with further candidates (``spec.candidates``, e.g. robust Zoo-Tuning's second start)
    screens them by successive halving: every candidate trains the first :func:`screening_epochs` of
    the run (half of it) (the first in ``out_dir``, the others in ``out_dir/candidate-<k>``), the one with the best
    validation metric so far (the first of equals) continues to the end from its checkpoint, which
    the engine resumes exactly -- the winner ends as it would have alone.

    With ``cost_input`` the costs are measured (:func:`zootune.cost.measure_cost`): the training
    columns on the module as built, before training (what training runs: e.g. Knowledge Flow's
    teachers, whose weights training drives to zero), the inference columns on the finalized model.
    The measuring time is not counted in ``seconds``.
    """
    from zootune.cost import measure_cost

    run = _MethodRun(spec, zoo, task, splits, train_config, member=member,
                     fitted={name: fitted[name] for name in spec.requires if name in (fitted or {})},
                     member_val_metrics=member_val_metrics, source=source, resume=resume,
                     eval_batch_size=eval_batch_size, cost_input=cost_input)
    start = time.perf_counter()  # building counts: a method that needs data computes it there
    first = run.build(spec.parse_options(options))
    candidates = spec.candidates(first.ctx) if spec.trains and spec.candidates is not None else []
    screen = screening_epochs(train_config.epochs) if candidates else None
    if screen is None:
        best = run.train(first, out_dir)
        for k, overrides in enumerate(candidates, start=2):  # too few epochs to screen: each in full
            candidate = run.train(run.build(_with(first.config, overrides)), _candidate_dir(out_dir, k))
            best = best if not _better(candidate.val_metric, best.val_metric, task) else candidate
    else:
        best = run.screen_and_continue(first, candidates, out_dir, screen)
    seconds = time.perf_counter() - start - run.measuring  # measuring costs is not the method's time
    cost = None
    if cost_input is not None:
        infer_cost = measure_cost(best.model, best.model, cost_input).to_dict()
        cost = {k: (first.train_cost[k] if k.startswith("train") else v) for k, v in infer_cost.items()}
    resolved = {**first.ctx.resolved, **_overrides_of(best.config, first.config)}
    return Fitted(best.built, best.model, best.val_metric, seconds, cost, resolved)


def _with(config, overrides: dict):
    return dataclasses.replace(config, **overrides) if dataclasses.is_dataclass(config) else {**(config or {}), **overrides}


def _overrides_of(config, first_config) -> dict:
    """The options in which a candidate's config differs from the first's (what it resolved to)."""
    if config is None or first_config is None or config is first_config:
        return {}
    new = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    old = dataclasses.asdict(first_config) if dataclasses.is_dataclass(first_config) else dict(first_config)
    return {k: v for k, v in new.items() if old.get(k) != v}


def _better(metric: float, than: float, task) -> bool:
    return metric > than if task.higher_is_better else metric < than


def _candidate_dir(out_dir, k: int) -> Path | None:
    return None if out_dir is None else Path(out_dir) / f"candidate-{k}"


class _MethodRun:
    """What :func:`fit_method` builds and trains one candidate with (the arguments it shares)."""

    def __init__(self, spec, zoo, task, splits, train_config, **shared):
        self.spec, self.zoo, self.task, self.splits, self.train_config = spec, zoo, task, splits, train_config
        self.shared = shared
        self.measuring = 0.0

    def build(self, config) -> _Trained:
        """The module as built (not trained yet): ``model`` None, the train costs measured."""
        from zootune.cost import measure_cost

        torch.manual_seed(self.train_config.seed)  # the new heads and gates are initialised from this seed
        s = self.shared
        ctx = BuildContext(zoo=self.zoo, task=self.task, config=config, data=self.splits, source=s["source"],
                           fitted=s["fitted"], member=s["member"], member_val_metrics=s["member_val_metrics"],
                           train_config=self.train_config, seed=self.train_config.seed)
        built = self.spec.build(ctx)
        train_cost = None
        if s["cost_input"] is not None:
            # measure_cost leaves the module's state as it was (BN statistics, buffers, RNG-free).
            begin = time.perf_counter()
            train_cost = measure_cost(built, built, s["cost_input"]).to_dict()
            self.measuring += time.perf_counter() - begin
        resolved = _with(config, ctx.resolved) if ctx.resolved and config is not None else config
        return _Trained(ctx, built, None, float("nan"), train_cost, 0.0, resolved)

    def train(self, one: _Trained, out, stop_after: int | None = None, resume: bool | None = None) -> _Trained:
        """Train (unless the method does not), finalize, and the best validation metric; with
        ``stop_after`` the metric is the best of those epochs."""
        from zootune.engine import Trainer, evaluate

        model, val_metric = one.built, None
        if self.spec.trains:
            config = dataclasses.replace(self.train_config, stop_after=stop_after)
            result = Trainer(one.built, self.task, self.splits.train, self.splits.val, config=config, out_dir=out,
                             resume=self.shared["resume"] if resume is None else resume,
                             data_fingerprint=self.splits.fingerprint).fit()
            model, val_metric = result.model, result.best_val_metric
            screened = _best_of_first(result.history, stop_after, self.task) if stop_after is not None else None
            val_metric = val_metric if screened is None else screened
        elif hasattr(one.built, "finalize"):
            model = one.built.finalize()
        model.eval()
        if val_metric is None:
            val_metric = evaluate(model, self.task, self.splits.val,
                                  batch_size=self.shared["eval_batch_size"])[self.task.metric_name]
        return one._replace(model=model, val_metric=float(val_metric))

    def screen_and_continue(self, first: _Trained, candidates: list[dict], out_dir, screen: int) -> _Trained:
        """Successive halving (see :func:`fit_method`): every candidate for ``screen`` epochs, then the
        best one to the end, resumed from its checkpoint (a temporary folder without ``out_dir``)."""
        import shutil
        import tempfile

        scratch = Path(tempfile.mkdtemp(prefix="zootune-screen-")) if out_dir is None else None
        root = Path(out_dir) if out_dir is not None else scratch
        try:
            folders = [root] + [_candidate_dir(root, k) for k in range(2, len(candidates) + 2)]
            starts = [first] + [self.build(_with(first.config, overrides)) for overrides in candidates]
            screened = [self.train(one, folder, stop_after=screen) for one, folder in zip(starts, folders)]
            winner = 0
            for k, one in enumerate(screened):
                if _better(one.val_metric, screened[winner].val_metric, self.task):
                    winner = k
            rebuilt = self.build(screened[winner].config)  # the ranking is in its config: not recomputed
            return self.train(rebuilt._replace(ctx=screened[winner].ctx), folders[winner], resume=True)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)


def _best_of_first(history: list[dict], epochs: int, task) -> float | None:
    """The best validation metric of the first ``epochs`` epochs (None when none was validated)."""
    values = [row[f"val_{task.metric_name}"] for row in history[:epochs] if f"val_{task.metric_name}" in row]
    return (max if task.higher_is_better else min)(values) if values else None


def fit_members(
    spec: MethodSpec,
    zoo,
    task,
    splits,
    train_config,
    done: FittedSet,
    *,
    members: Sequence[int] | None = None,
    options=None,
    source=None,
    out_dir: Callable[[int | None], Path | None] | None = None,
    resume: bool = False,
    eval_batch_size: int = 256,
    cost_input: torch.Tensor | None = None,
) -> list[tuple[int | None, Fitted]]:
    """Fit ``spec`` once, or once per zoo member (``members``, default all) for a per-member method;
    what it requires is taken from ``done``, and its models are added to ``done``."""
    chosen = (list(range(len(zoo))) if members is None else list(members)) if spec.per_member else [None]
    fits = []
    for member in chosen:
        fits.append((member, fit_method(
            spec, zoo, task, splits, train_config, member=member, fitted=done.models, options=options,
            member_val_metrics=done.member_val_metrics, source=source,
            out_dir=out_dir(member) if out_dir is not None else None, resume=resume,
            eval_batch_size=eval_batch_size, cost_input=cost_input)))
    done.add(spec, [f for _, f in fits], len(zoo))
    return fits


def fit_with_requirements(
    spec: MethodSpec,
    zoo,
    task,
    splits,
    train_config,
    *,
    member: int | None = None,
    options=None,
    source=None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    echo: Callable[[str], None] | None = None,
    eval_batch_size: int = 256,
) -> tuple[Fitted, FittedSet]:
    """``zootune fit``: the methods ``spec`` requires (every member of a per-member one; with their
    defaults, each in ``out_dir/requires/<method>[-<member>]`` so that ``resume`` continues any of
    them), then ``spec`` itself in ``out_dir/train`` (a per-member method: ``member``, default 0)."""
    done = FittedSet()
    root = Path(out_dir) if out_dir is not None else None

    def folder(name: str):
        if root is None:
            return None
        return lambda m: root / "requires" / (name if m is None else f"{name}-{m}")

    for required in select_methods([spec.name])[:-1]:
        if echo is not None:
            echo(f"training {required.name} (needed by {spec.name})")
        fit_members(required, zoo, task, splits, train_config, done, out_dir=folder(required.name),
                    resume=resume, eval_batch_size=eval_batch_size)
    fits = fit_members(spec, zoo, task, splits, train_config, done, members=[member or 0], options=options,
                       source=source, out_dir=None if root is None else (lambda _m: root / "train"),
                       resume=resume, eval_batch_size=eval_batch_size)
    return fits[0][1], done


# --------------------------------------------------------------------------------------------------
# LogME against the members' fine-tuned results


def logme_vs_members(
    logme_scores: dict[str, float], member_metrics: dict[str, float], higher_is_better: bool = True
) -> dict:
    """How well LogME's ranking of the zoo predicts the members' trained test metric on a target.

    Returns ``{"scores", "member_test", "kendall_tau", "top_match"}``: Kendall's tau-b
    (:func:`zootune.methods.logme.kendall_tau`; ties counted as scipy does) between the LogME scores and
    the members' metrics for the members both have (negated when lower is better, so tau = 1 always
    means "LogME ranks the members in the order training does"); None when undefined (fewer than
    two members, or one of the lists constant). ``top_match``: whether LogME's best member is (one of)
    the best trained: what a user who trains only LogME's pick gets.
    """
    import math

    from zootune.methods.logme import kendall_tau

    names = [n for n in logme_scores if n in member_metrics]
    sign = 1.0 if higher_is_better else -1.0
    tau = None
    if len(names) >= 2:
        value = kendall_tau([logme_scores[n] for n in names], [sign * member_metrics[n] for n in names])
        tau = value if math.isfinite(value) else None
    top_match = None
    if names:
        best_logme = max(names, key=lambda n: logme_scores[n])
        top_match = sign * member_metrics[best_logme] == max(sign * member_metrics[n] for n in names)
    return {
        "scores": {n: float(logme_scores[n]) for n in names},
        "member_test": {n: float(member_metrics[n]) for n in names},
        "kendall_tau": tau,
        "top_match": top_match,
    }


def _logme_summary(per_target: dict[str, dict]) -> dict:
    """``{"targets": {target: logme_vs_members(...)}, "mean_kendall_tau"}`` (mean over the targets
    where tau is defined; None if none is)."""
    taus = [cell["kendall_tau"] for cell in per_target.values() if cell["kendall_tau"] is not None]
    return {"targets": per_target, "mean_kendall_tau": sum(taus) / len(taus) if taus else None}


def _logme_scores(zoo, dataset, batch_size: int) -> dict[str, float]:
    """LogME of every zoo member's frozen features on ``dataset`` (one pass; augmentation off)."""
    from zootune.methods.logme import rank_zoo

    if hasattr(dataset, "with_transform"):
        dataset = dataset.with_transform(None)  # score the images themselves, not random crops of them
    return dict(rank_zoo(zoo, dataset, batch_size=batch_size, names=member_names(zoo)))


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
    train_config = _train_config(config, seed)
    done = FittedSet()
    records: list[MethodResult] = []
    for spec in run.specs:
        if not spec.supports(task):
            if first_seed:
                log(f"{spec.name}: skipped on {target} (supports "
                    f"{', '.join(t.__name__ for t in spec.task_types)} only)")
            continue
        source = run.hub if spec.hub else run.zoo
        names = member_names(source)
        fits = fit_members(spec, source, task, splits, train_config, done, options=run.options[spec.name],
                           eval_batch_size=config.eval_batch_size,
                           # the architecture is the same for every seed: measure once per target
                           cost_input=example if first_seed else None)
        method_records = []
        for member, result in fits:
            test = float(evaluate(result.model, task, splits.test, batch_size=config.eval_batch_size)[task.metric_name])
            member_name = None if member is None else names[member]
            row_id = spec.name if member is None else f"{spec.name}:{member_name}"
            label = spec.name if member is None else f"{spec.name} [{member_name}]"
            record = MethodResult(row_id, label, spec.name, member_name, target, seed, test, result.val_metric,
                                  round(result.seconds, 2), cost=result.cost if first_seed else None)
            if first_seed and spec.reports_gates:
                record.gates = _record_gates(result.built, task, splits.val, config.eval_batch_size)
                if record.gates is None:
                    log(f"{spec.name}: no gate statistics API; gate heatmap skipped")
            log(f"{target} seed {seed} {label}: val {result.val_metric:.2f} test {test:.2f} "
                f"{task.metric_name} ({result.seconds:.1f} s)")
            method_records.append(record)
        records += method_records
        if spec.per_member:
            records.append(_best_on_val(spec, method_records, task.higher_is_better))
    return records


def _run_target(run: _RunContext, target: str, splits, task) -> tuple[list[MethodResult], dict | None]:
    """Every seed on one target; and LogME's ranking against the first per-member method's results."""
    config, log = run.config, run.log
    # costs per sample at the training batch size: per-step work (Zoo-Tuning's alignment of the
    # bank) is shared by the batch in training, as measure_cost's per-sample numbers assume
    example = _example_input(splits.train, n=config.batch_size)
    kind = (f"{splits.num_classes} classes" if isinstance(task, ClassificationTask)
            else f"{type(task).__name__}, {task.metric_name}")
    log(f"target {target}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test, {kind}")
    per_member = next((spec for spec in run.specs if spec.per_member and not spec.hub and spec.supports(task)), None)
    logme_scores = None
    if per_member is not None:
        try:
            logme_scores = _logme_scores(run.zoo, splits.train, config.eval_batch_size)
        except ZootuneError as error:
            log(f"target {target}: LogME ranking skipped ({error})")
    records: list[MethodResult] = []
    for index, seed in enumerate(config.seeds):
        records += _run_seed(run, target, splits, task, seed, index == 0, example)
    if logme_scores is None:
        return records, None
    tests: dict[str, list[float]] = {}
    for record in records:
        if record.method == per_member.name and record.member is not None:
            tests.setdefault(record.member, []).append(record.test)
    cell = logme_vs_members(logme_scores, {m: sum(v) / len(v) for m, v in tests.items()}, task.higher_is_better)
    tau = cell["kendall_tau"]
    log(f"target {target}: LogME ranking {', '.join(sorted(logme_scores, key=logme_scores.get, reverse=True))}"
        f"; Kendall tau vs {per_member.name} test {task.metric_name}: {'-' if tau is None else f'{tau:.2f}'}")
    return records, cell


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
        build_minizoo(cache_dir=config.cache_dir, progress=config.progress)
        build_seconds = time.perf_counter() - build_start
        log(f"MiniZoo built in {build_seconds:.0f} s (not counted in the run's time)")
    zoo = load_minizoo(cache_dir=config.cache_dir, build_if_missing=False)
    return zoo, list_minizoo(cache_dir=config.cache_dir), build_seconds


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
    ``load_target(name, seed) -> DatasetSplits`` to :func:`zootune.data.targets.get_target`; tests
    pass tiny ones. ``target_names`` then overrides the suite's names.
    """
    specs = select_methods(config.methods, hub=config.hub)
    options = parse_method_options(specs, config.method_options)  # before any work
    _train_config(config, seed=0)  # the training settings too (TrainConfig refuses e.g. lr=inf)
    if load_target is None:
        from functools import partial

        from zootune.data.targets import get_target

        load_target = partial(get_target, cache_dir=config.cache_dir)
        targets = resolve_targets(config.targets)
    else:
        targets = list(target_names or config.targets or [])
        if not targets:
            raise ZootuneError("no targets given")
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
        run = _RunContext(config, specs, options, zoo, hub, log)
        records: list[MethodResult] = []
        logme: dict[str, dict] = {}
        metric_name, higher_is_better = None, True
        for target in targets:
            splits = load_target(target, seed=config.data_seed)
            task = getattr(splits, "task", None) or ClassificationTask(splits.num_classes)
            if metric_name is not None and task.metric_name != metric_name:
                # one table has one metric: a mean over targets of accuracy and NME means nothing
                raise ZootuneError(
                    f"target {target!r} is scored by {task.metric_name}, the targets before it by "
                    f"{metric_name}; run targets with different metrics separately")
            metric_name, higher_is_better = task.metric_name, task.higher_is_better
            target_records, logme_cell = _run_target(run, target, splits, task)
            records += target_records
            if logme_cell is not None:
                logme[target] = logme_cell
        rows, gates = _rows(records, targets, list(config.seeds))
        results = {
            "zootune_version": __version__,
            "config": config.to_dict(),
            "metric": metric_name,
            "higher_is_better": higher_is_better,
            "targets": targets,
            "seeds": list(config.seeds),
            "zoo": {
                "names": names,
                "checksums": {n: state_dict_checksum(m) for n, m in zip(names, zoo)},
                "manifest": manifest,
            },
            "methods": rows,
            "gates": gates,
            "logme": _logme_summary(logme),
            "seconds": round(time.perf_counter() - started - build_seconds, 1),
            "zoo_build_seconds": round(build_seconds, 1),
            "log": "log.txt",
        }
        if config.plots:
            from zootune.report import write_plots

            results["plots"] = write_plots(results, out_dir, log=log)
        atomic_write_json(out_dir / "results.json", results)
        atomic_write_text(out_dir / "results.md", results_markdown(results))
        log("\n" + results_table(results))
        log(f"results written to {out_dir} ({results['seconds']:.0f} s)")
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


__all__ = ["RunConfig", "Fitted", "FittedSet", "MethodResult", "fit_method", "fit_members", "fit_with_requirements",
           "run_experiment", "select_methods", "load_results", "state_dict_checksum", "default_excluded"]
