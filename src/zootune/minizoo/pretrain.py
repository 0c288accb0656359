"""Pretraining one backbone on one member's pretext task (reusable for any architecture)."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import nn

from zootune.engine.threads import forward_macs, thread_rule
from zootune.errors import ZootuneError
from zootune.minizoo.members import MEMBERS, MemberSpec
from zootune.minizoo.objectives import Objective


def get_member(name_or_spec: str | MemberSpec) -> MemberSpec:
    if isinstance(name_or_spec, MemberSpec):
        return name_or_spec
    for spec in MEMBERS:
        if spec.name == name_or_spec:
            return spec
    raise ZootuneError(f"unknown MiniZoo member {name_or_spec!r}; known: {', '.join(m.name for m in MEMBERS)}")


def _train(model: nn.Module, head: nn.Module, objective: Objective, spec: MemberSpec, x_train: torch.Tensor,
           y_train: torch.Tensor, seed: int, progress: bool) -> float:
    """``spec.steps`` Adam steps (lr cosine-decayed to 0) on batches drawn with a generator seeded by
    ``seed``; returns the last step's loss."""
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=spec.lr, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, spec.steps) / spec.steps))
    )
    batches = torch.Generator().manual_seed(seed)
    steps = range(spec.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"pretrain {spec.name}", unit="step", leave=False)
    model.train()
    head.train()
    loss_value = float("nan")
    # Tiny models on a shared machine: intra-op threads cost far more than they give (measured in
    # docs/dev-notes/engine.md); the engine's rule picks the count, so the weights do not depend on
    # how many cores the machine happens to have.
    with thread_rule(None, torch.device("cpu"), lambda: forward_macs(model, (x_train[: spec.batch_size],))):
        for _ in steps:
            idx = torch.randint(0, x_train.shape[0], (spec.batch_size,), generator=batches)
            loss = objective.loss(model, head, objective.augment(x_train[idx]), y_train[idx])
            if not torch.isfinite(loss):
                raise ZootuneError(f"pretraining {spec.name} diverged (loss {loss.item()}); try another seed")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_value = loss.item()
    return loss_value


def pretrain(
    model: nn.Module | Callable[[], nn.Module],
    member: str | MemberSpec,
    seed: int = 0,
    progress: bool = False,
) -> tuple[nn.Module, dict]:
    """Pretrain ``model`` (or ``model()`` for a builder) on ``member``'s pretext task.

    The pretext head reads the backbone through :mod:`zootune.minizoo.features` (pooled features or a
    feature map), so any architecture exposing those can be pretrained -- e.g. a ViT for the Hub.
    Training: Adam, lr cosine-decayed from ``spec.lr`` to 0 over ``spec.steps`` steps of
    ``spec.batch_size``, batches drawn with a seeded generator; ``torch.manual_seed(seed)`` fixes the
    initialisation and augmentations, so the same seed gives the same weights (on the same torch build;
    the thread count is the engine's rule for the model's size, not the machine's core count).

    Returns the trained backbone (in eval mode; the pretext head is discarded) and a summary dict:
    task, data, algorithm, metric name and held-out value, steps, seconds, seed.
    """
    spec = get_member(member)
    torch.manual_seed(seed)
    if not isinstance(model, nn.Module):
        model = model()
    start = time.perf_counter()
    cpu_start = time.process_time()
    x_train, y_train, x_held, y_held = spec.make_data(seed, spec.num_images)
    objective = spec.make_objective()
    head = objective.build_head(model, x_train[: spec.batch_size])
    loss_value = _train(model, head, objective, spec, x_train, y_train, seed, progress)
    model.eval()
    head.eval()
    metric = objective.metric(model, head, x_held, y_held)
    summary = {
        "member": spec.name,
        "task": spec.task,
        "data": spec.data,
        "algorithm": spec.algorithm,
        "metric_name": objective.metric_name,
        "metric": round(float(metric), 3),
        "final_loss": round(float(loss_value), 5),
        "steps": spec.steps,
        "batch_size": spec.batch_size,
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 1),
        # CPU time of this process (all threads): on a shared machine wall time mostly measures the
        # other jobs, this measures the member's own cost
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
    }
    return model, summary
