"""Shared pieces of the PAC-Net benchmarks: models, a plain training loop, the three transfer methods.

Every benchmark starts from one source-trained model and compares, on the same target samples and
with the same optimiser (Adam) and number of target steps:

- ``finetune``: all weights trained on the target;
- ``l2-sp``: fine-tuning plus ``λ Σ ||w − w_src||²`` over every weight reused from the source model
  (Li et al., 2018; the new classification head, when there is one, is not penalised);
- ``pac-net``: :class:`zootune.PACNet` -- Prune, Allocate (source re-training, pruned entries at 0),
  Calibrate (only pruned entries + target head, penalty λ·||w − w_S||² on the pruned entries).

Source retention is the source-test metric after transfer: for fine-tuning and L2-SP the transferred
body with the *original* source head (what forgetting costs the source task); for PAC-Net its
source route (essential weights + source head).
"""

from __future__ import annotations

import copy
import math
import statistics
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from zootune import PACNet

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mlp(in_dim: int, hidden: int = 64, out: int = 1, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), act(), nn.Linear(hidden, hidden), act(), nn.Linear(hidden, out))


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    penalty: Callable[[], torch.Tensor] | None = None,
) -> nn.Module:
    """Adam on random mini-batches; calls the zootune method hooks the engine calls."""
    gen = torch.Generator().manual_seed(seed)
    aux = getattr(model, "auxiliary_loss", None)
    after = getattr(model, "after_optimizer_step", None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    n = x.shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        out = model(x[idx])
        loss = loss_fn(out, y[idx])
        if aux is not None:
            loss = loss + aux(out, y[idx])
        if penalty is not None:
            loss = loss + penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after is not None:
            after()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def l2sp_penalty(model: nn.Module, reference: nn.Module, lam: float, skip: str | None = None):
    """``λ Σ ||w − w_src||²`` over the parameters of ``model`` that ``reference`` also has."""
    ref = {k: v.detach().clone() for k, v in reference.named_parameters()}
    pairs = [(p, ref[k]) for k, p in model.named_parameters() if k in ref and not (skip and k.startswith(skip))]
    return lambda: lam * sum((p - r).pow(2).sum() for p, r in pairs)


@dataclass
class Problem:
    """A transfer problem: source-trained model, data, loss and metric (lower or higher is better)."""

    source_model: nn.Module
    source_train: tuple[torch.Tensor, torch.Tensor]
    source_test: tuple[torch.Tensor, torch.Tensor]
    target_train: tuple[torch.Tensor, torch.Tensor]
    target_test: tuple[torch.Tensor, torch.Tensor]
    loss: LossFn
    metric: Callable[[torch.Tensor, torch.Tensor], float]
    new_head: Callable[[], nn.Module] | None = None  # None: the target reuses the source head
    head_name: str = "fc"


@dataclass
class Budget:
    target_steps: int
    target_lr: float
    allocate_steps: int
    allocate_lr: float
    batch_size: int
    l2_lambda: float = 0.01


def _with_head(model: nn.Module, head_name: str, head: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    parent, _, child = head_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, head)
    return model


def run_methods(problem: Problem, budget: Budget, seed: int, prune_fractions=(0.8,)) -> dict[str, dict[str, float]]:
    """Target and source test metrics of each method, from the same source model and target data."""
    p, b = problem, budget
    results: dict[str, dict[str, float]] = {}
    source_metric = p.metric(predict(p.source_model, p.source_test[0]), p.source_test[1])
    results["source model"] = {
        "target": p.metric(predict(p.source_model, p.target_test[0]), p.target_test[1]) if p.new_head is None else math.nan,
        "source": source_metric,
    }
    source_head = p.source_model.get_submodule(p.head_name)

    for name, lam in (("finetune", 0.0), ("l2-sp", b.l2_lambda)):
        torch.manual_seed(seed)
        model = copy.deepcopy(p.source_model) if p.new_head is None else _with_head(p.source_model, p.head_name, p.new_head())
        penalty = l2sp_penalty(model, p.source_model, lam, skip=p.head_name if p.new_head else None) if lam else None
        train(model, *p.target_train, p.loss, steps=b.target_steps, lr=b.target_lr, batch_size=b.batch_size,
              seed=seed, penalty=penalty)
        on_source = model if p.new_head is None else _with_head(model, p.head_name, copy.deepcopy(source_head))
        results[name] = {
            "target": p.metric(predict(model, p.target_test[0]), p.target_test[1]),
            "source": p.metric(predict(on_source, p.source_test[0]), p.source_test[1]),
        }

    for fraction in prune_fractions:
        net, pruned_source, allocated_source = _allocated(p, b, seed, fraction)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the prune-calibrate row below warns by design
            net.begin_calibrate()
        train(net, *p.target_train, p.loss, steps=b.target_steps, lr=b.target_lr, batch_size=b.batch_size, seed=seed)
        target_metric = p.metric(predict(net, p.target_test[0]), p.target_test[1])
        net.task = "source"
        results[f"pac-net (prune {fraction})"] = {
            "target": target_metric,
            "source": p.metric(predict(net, p.source_test[0]), p.source_test[1]),
            "source_after_prune": pruned_source,
            "source_after_allocate": allocated_source,
        }
    return results


_ALLOCATED: dict[tuple, tuple[PACNet, float, float]] = {}


def _allocated(p: Problem, b: Budget, seed: int, fraction: float) -> tuple[PACNet, float, float]:
    """Prune + Allocate depend only on the source: done once per (source model, fraction, seed) and
    copied for every target set; also returns the source metric after Prune and after Allocate."""
    key = (id(p.source_model), fraction, seed, b.allocate_steps, b.l2_lambda)
    if key not in _ALLOCATED:
        torch.manual_seed(seed)
        net = PACNet(copy.deepcopy(p.source_model), head_name=p.head_name, prune_fraction=fraction,
                     l2_lambda=b.l2_lambda, target_head=p.new_head() if p.new_head else None)
        net.task = "source"
        pruned = p.metric(predict(net, p.source_test[0]), p.source_test[1])
        train(net, *p.source_train, p.loss, steps=b.allocate_steps, lr=b.allocate_lr, batch_size=b.batch_size, seed=seed)
        _ALLOCATED[key] = (net, pruned, p.metric(predict(net, p.source_test[0]), p.source_test[1]))
    net, pruned, allocated = _ALLOCATED[key]
    return copy.deepcopy(net), pruned, allocated


def rmse(pred: torch.Tensor, target: torch.Tensor) -> float:
    return (pred.reshape(-1) - target.reshape(-1)).pow(2).mean().sqrt().item()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def summarize(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, tuple[float, float]]]:
    """mean and sample std over seeds of every (method, metric)."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for method in runs[0]:
        out[method] = {}
        for key in runs[0][method]:
            values = [r[method][key] for r in runs]
            if any(math.isnan(v) for v in values):  # e.g. the source model on a new label space
                out[method][key] = (math.nan, math.nan)
                continue
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            out[method][key] = (statistics.fmean(values), std)
    return out


def table(title: str, summary, metric_name: str, digits: int = 3) -> str:
    keys = ["target", "source", "source_after_allocate"]
    heads = [f"target {metric_name}", f"source {metric_name} after transfer", f"source {metric_name} after Allocate"]
    lines = [f"### {title}", "", "| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for method, vals in summary.items():
        cells = []
        for k in keys:
            if k in vals and not math.isnan(vals[k][0]):
                cells.append(f"{vals[k][0]:.{digits}f} ± {vals[k][1]:.{digits}f}")
            else:
                cells.append("–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
