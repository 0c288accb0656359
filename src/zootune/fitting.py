"""Fitting one method on one target, with what it requires: what ``zootune fit`` runs once and
``zootune run`` runs for every method, target and seed (:mod:`zootune.experiment`).

:func:`fit_method` builds a registered method on a zoo (:class:`~zootune.methods.registry.BuildContext`
with the data splits), trains it with the shared engine (:class:`zootune.engine.Trainer`; model
selection on the validation split) and finalizes it. A method with further candidates (robust
Zoo-Tuning's second start) screens them by successive halving. :func:`fit_members` fits a
per-member method once per zoo member; :func:`fit_with_requirements` first fits what a method
requires. No method is named here: everything follows from its :class:`MethodSpec`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import nn

from zootune.methods.registry import BuildContext, MethodSpec, with_requirements

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


# Candidates (e.g. robust Zoo-Tuning's starts) are screened by successive halving: each trains the
# first `screening_epochs` of the run (the schedule still spans all of them), the best on validation
# continues. Why a quarter with a floor of steps: a quarter of 8 epochs (2 epochs, ~40 steps) picked
# the wrong start on polygons seed 1 of `zootune run` where half picked right; at the 1000-step
# budgets of `zootune fit` a quarter (>= 250 steps) made the same choice as half in all 8 screenings
# of benchmarks/defaults.py (docs/dev-notes/cli-and-run.md) at half the screening's cost.
SCREEN_FRACTION = 0.25
SCREEN_MIN_STEPS = 250


def screening_epochs(epochs: int, steps_per_epoch: int = 1) -> int | None:
    """Epochs each candidate trains before the best one continues: a quarter of the run, but at least
    ``SCREEN_MIN_STEPS`` steps as long as that is within the first half (None: too few epochs to screen),

        screen = max(ceil(epochs / 4), min(ceil(epochs / 2), ceil(SCREEN_MIN_STEPS / steps_per_epoch)))."""
    floor = min(math.ceil(epochs / 2), math.ceil(SCREEN_MIN_STEPS / max(1, steps_per_epoch)))
    screen = max(1, math.ceil(SCREEN_FRACTION * epochs), floor)
    return screen if screen < epochs else None


def _steps_per_epoch(train_dataset, train_config) -> int:
    steps = math.ceil(len(train_dataset) / train_config.batch_size)
    return min(steps, train_config.max_steps_per_epoch or steps)


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
    source_data=None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    eval_batch_size: int = 256,
    cost_input: torch.Tensor | None = None,
) -> Fitted:
    """Build ``spec`` on ``zoo`` for ``task`` (a :class:`BuildContext` with the data splits), train
    it on ``splits.train`` (selection on ``splits.val``) unless ``spec.trains`` is False, and finalize it.

    A method with further candidates (``spec.candidates``, e.g. robust Zoo-Tuning's second start)
    screens them by successive halving: every candidate trains the first :func:`screening_epochs` of
    the run (a quarter of it, at least 250 steps) (the first in ``out_dir``, the others in ``out_dir/candidate-<k>``), the one with the best
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
                     member_val_metrics=member_val_metrics, source_data=source_data, resume=resume,
                     eval_batch_size=eval_batch_size, cost_input=cost_input)
    start = time.perf_counter()  # building counts: a method that needs data computes it there
    first = run.build(spec.parse_options(options))
    candidates = spec.candidates(first.ctx) if spec.trains and spec.candidates is not None else []
    screen = screening_epochs(train_config.epochs, _steps_per_epoch(splits.train, train_config)) if candidates else None
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
        ctx = BuildContext(zoo=self.zoo, task=self.task, config=config, data=self.splits, source_data=s["source_data"],
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
    source_data=None,
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
            member_val_metrics=done.member_val_metrics, source_data=source_data,
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
    source_data=None,
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

    for required in with_requirements([spec.name])[:-1]:
        if echo is not None:
            echo(f"training {required.name} (needed by {spec.name})")
        fit_members(required, zoo, task, splits, train_config, done, out_dir=folder(required.name),
                    resume=resume, eval_batch_size=eval_batch_size)
    fits = fit_members(spec, zoo, task, splits, train_config, done, members=[member or 0], options=options,
                       source_data=source_data, out_dir=None if root is None else (lambda _m: root / "train"),
                       resume=resume, eval_batch_size=eval_batch_size)
    return fits[0][1], done


__all__ = ["Fitted", "FittedSet", "SCREEN_FRACTION", "SCREEN_MIN_STEPS", "fit_members", "fit_method", "fit_with_requirements",
           "screening_epochs"]
