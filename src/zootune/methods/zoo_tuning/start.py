"""Ranking a zoo's members on a target before Zoo-Tuning: where the robust variant starts.

The robust variant of :class:`~zootune.methods.zoo_tuning.ZooTuning` starts with its gates on the
member ranked first (``member_scores``), so step 0 computes (nearly) that member's function and the
others are mixed in only as far as training finds them useful. This module computes the scores from
(zoo, task, training data, validation data):

``"probe"`` (default) -- a short fine-tune of every member with the engine and the caller's optimiser
    settings (``probe_epochs`` epochs, the learning-rate schedule compressed into them); the score is
    the best validation metric (negated when lower is better, so higher is always better). It measures
    what the robust start actually does next -- fine-tuning -- including a member that is hard to
    optimise at these settings, which a frozen-feature score cannot see. Cost: ``m * probe_epochs``
    epochs of one model.
``"logme"`` -- LogME of each member's frozen pooled features on the training images (You et al.,
    ICML 2021; :mod:`zootune.methods.logme`): one forward pass per member, no training.
``"probe+logme"`` -- both, each min-max normalised over the members, averaged (:func:`combine`):

        score_i = ( (p_i - min p) / (max p - min p) + (l_i - min l) / (max l - min l) ) / 2

    The probe sees optimisation (a member with good features that does not train at these
    settings) but after 2 epochs it is noisy where a member's advantage shows late; LogME is
    deterministic but blind to optimisation. On polygons seed 5 the probe ranked the counting member
    0.3 points above the segmentation member (which fine-tunes 20 points better) and LogME had them
    the right way round; the average keeps a clear probe ranking and breaks its near-ties by LogME.

Which one picks the best member more reliably, and at what cost, is measured in docs/robustness.md.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from zootune.errors import ZootuneError

SCORE_METHODS = ("probe+logme", "probe", "logme")
DEFAULT_PROBE_EPOCHS = 2


def score_members(
    zoo: Sequence[nn.Module],
    task,
    train_dataset,
    val_dataset=None,
    *,
    method: str = "probe+logme",
    train_config=None,
    probe_epochs: int = DEFAULT_PROBE_EPOCHS,
    batch_size: int = 256,
) -> list[float]:
    """One score per zoo member, higher = expected to transfer better (see the module docstring).

    ``train_config``: a :class:`zootune.engine.TrainConfig` whose optimiser settings and seed the
    probe uses (default: ``zootune run``'s: SGD lr 0.1, batch 64, cosine); its ``epochs`` is replaced
    by ``probe_epochs``. ``val_dataset`` is required by the probe (and so by the default).
    torch's random state is left as it was found: a method that ranks its zoo inside ``build``
    initialises its new parameters exactly as it would from scores given to it.
    """
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        return _score_members(zoo, task, train_dataset, val_dataset, method=method, train_config=train_config,
                              probe_epochs=probe_epochs, batch_size=batch_size)


def _score_members(zoo, task, train_dataset, val_dataset, *, method, train_config, probe_epochs, batch_size):
    members = list(zoo)
    if not members:
        raise ZootuneError("cannot score an empty zoo")
    if method == "probe+logme":
        kwargs = dict(train_config=train_config, probe_epochs=probe_epochs, batch_size=batch_size)
        return combine(_score_members(members, task, train_dataset, val_dataset, method="probe", **kwargs),
                       _score_members(members, task, train_dataset, val_dataset, method="logme", **kwargs))
    if method == "logme":
        from zootune.methods.logme import rank_zoo

        data = train_dataset.with_transform(None) if hasattr(train_dataset, "with_transform") else train_dataset
        names = [f"m{i}" for i in range(len(members))]
        ranked = dict(rank_zoo(members, data, batch_size=batch_size, names=names))
        return [float(ranked[name]) for name in names]
    if method != "probe":
        raise ZootuneError(f"score method must be one of {SCORE_METHODS}, got {method!r}")
    if val_dataset is None:
        raise ZootuneError("the probe scores members on a validation split: pass val_dataset")
    if probe_epochs < 1:
        raise ZootuneError(f"probe_epochs must be >= 1, got {probe_epochs}")
    from zootune.engine import TrainConfig
    from zootune.methods.finetune import probe_fine_tune

    config = train_config if train_config is not None else TrainConfig(
        epochs=probe_epochs, batch_size=64, optimizer="sgd", lr=0.1, weight_decay=5e-4, schedule="cosine")
    sign = 1.0 if task.higher_is_better else -1.0
    return [sign * probe_fine_tune(member, task, train_dataset, val_dataset, config, probe_epochs)
            for member in members]


def rank_if_robust(ctx, options):
    """``options`` (a dict, or an options dataclass) with ``member_scores`` when the robust variant
    has no start yet (no ``member_scores``/``start_member``) and the zoo has more than one member:
    the caller's ranking ``ctx.member_scores`` when given (e.g. the RL sources' zero-shot returns),
    else :func:`score_members` on the target's data when it is there. The scores are also recorded
    in ``ctx.resolved`` so that a saved model is rebuilt on the same start without data. Otherwise
    ``options`` as given."""
    import dataclasses

    get = options.get if isinstance(options, dict) else (lambda key, default=None: getattr(options, key, default))
    if (get("variant", "robust") != "robust" or get("member_scores") is not None
            or get("start_member") is not None or len(ctx.zoo) < 2 or ctx.rebuilding):
        return options
    if ctx.member_scores is not None:
        scores = [float(v) for v in ctx.member_scores]
    elif ctx.data is not None:
        scores = score_members(ctx.zoo, ctx.task, ctx.data.train, ctx.data.val, train_config=ctx.train_config)
    else:
        return options
    ctx.resolved["member_scores"] = scores
    if isinstance(options, dict):
        return {**options, "member_scores": scores}
    return dataclasses.replace(options, member_scores=scores)


def combine(*score_lists: Sequence[float]) -> list[float]:
    """The mean over ``score_lists`` of each list min-max normalised over the members (a constant
    list counts 0 for everyone)."""
    if not score_lists or len({len(scores) for scores in score_lists}) != 1:
        raise ZootuneError("combine needs score lists of one length")
    total = [0.0] * len(score_lists[0])
    for scores in score_lists:
        low, high = min(scores), max(scores)
        for i, value in enumerate(scores):
            total[i] += (value - low) / (high - low) if high > low else 0.0
    return [value / len(score_lists) for value in total]


def rank(scores: Sequence[float]) -> list[int]:
    """Member indices, best score first (ties: lower index first)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))
