"""Analyses a comparison run declares (``RunConfig.analyses``): steps that read the zoo and the run's
results per target, beside the methods' trainings, and add one section to ``results.json``.

An analysis is a class with a ``name`` (its key in ``results.json`` and in ``RunConfig.analyses``)
and three steps, called by :func:`zootune.experiment.run_experiment`:

- ``before_target(zoo, splits, task, batch_size, log)``: what it measures before training (e.g.
  LogME scores of the frozen members), kept on the instance;
- ``after_target(records, task, log)``: the target's cell from the run's records
  (:class:`zootune.experiment.MethodResult`: method, member, test and validation metric per seed),
  or None when there is nothing to say;
- ``summary(cells)``: the section of ``results.json`` from the cells of every target.

One instance serves one run; the run calls the steps target by target, in order.
"""

from __future__ import annotations

import math
from typing import Callable

from zootune.errors import ZootuneError


def member_names(zoo) -> list[str]:
    """``zoo.names`` for a :class:`zootune.Zoo`, else ``member0, member1, ...`` for a plain list."""
    names = getattr(zoo, "names", None)
    return list(names) if names is not None else [f"member{i}" for i in range(len(zoo))]


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


class LogMERanking:
    """LogME (You et al., ICML 2021) of every zoo member's frozen features on the target's training
    images, against the test metric the members reached when each was trained on their own: Kendall's
    tau between the two rankings (:func:`logme_vs_members`), i.e. how well ranking without training
    would have picked the member. The members' results are the rows of the first method in the run
    that trained the zoo's members one by one (its records name a zoo member)."""

    name = "logme"

    def __init__(self) -> None:
        self.scores: dict[str, float] | None = None

    def before_target(self, zoo, splits, task, batch_size: int, log: Callable[[str], None]) -> None:
        from zootune.methods.logme import rank_zoo

        dataset = splits.train
        if hasattr(dataset, "with_transform"):
            dataset = dataset.with_transform(None)  # score the images themselves, not random crops of them
        try:
            self.scores = dict(rank_zoo(zoo, dataset, batch_size=batch_size, names=member_names(zoo)))
        except ZootuneError as error:
            self.scores = None
            log(f"LogME ranking skipped ({error})")

    def after_target(self, records, task, log: Callable[[str], None]) -> dict | None:
        if self.scores is None:
            return None
        members = [r for r in records if r.member in self.scores]
        if not members:
            return None
        method = members[0].method
        tests: dict[str, list[float]] = {}
        for record in members:
            if record.method == method:
                tests.setdefault(record.member, []).append(record.test)
        cell = logme_vs_members(self.scores, {m: sum(v) / len(v) for m, v in tests.items()}, task.higher_is_better)
        tau = cell["kendall_tau"]
        log(f"LogME ranking {', '.join(sorted(self.scores, key=self.scores.get, reverse=True))}"
            f"; Kendall tau vs {method} test {task.metric_name}: {'-' if tau is None else f'{tau:.2f}'}")
        return cell

    @staticmethod
    def summary(cells: dict[str, dict]) -> dict:
        """``{"targets": {target: cell}, "mean_kendall_tau"}`` (mean over the targets where tau is
        defined; None if none is)."""
        taus = [cell["kendall_tau"] for cell in cells.values() if cell["kendall_tau"] is not None]
        return {"targets": cells, "mean_kendall_tau": sum(taus) / len(taus) if taus else None}


ANALYSES: dict[str, type] = {LogMERanking.name: LogMERanking}


def make_analyses(names) -> list:
    """Fresh instances of the named analyses; an unknown name raises :class:`ZootuneError`."""
    unknown = [n for n in names if n not in ANALYSES]
    if unknown:
        raise ZootuneError(f"unknown analysis {unknown[0]!r}; known: {', '.join(ANALYSES)}")
    return [ANALYSES[n]() for n in names]


__all__ = ["ANALYSES", "LogMERanking", "logme_vs_members", "make_analyses", "member_names"]
