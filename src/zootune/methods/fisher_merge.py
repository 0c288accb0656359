"""Fisher-weighted merging of the zoo, then fine-tuning.

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022 (arXiv 2111.09832).
For members theta_1..theta_m of one architecture with diagonal Fisher information F_i, every
parameter is merged on its own::

    theta*_j = sum_i (F_ij + eps) theta_ij / sum_i (F_ij + eps)

(equal Fishers give the uniform soup; eps makes a parameter whose Fisher is zero in every member
fall back to the plain average). The Fisher of member i at theta_i on target inputs x_1..x_N::

    F_ij = (1/N) sum_n (d log p_theta_i(y_n | x_n) / d theta_ij)^2

computed from per-example gradients (never from squared batch gradients), with y_n the label
(``fisher="empirical"``) or drawn from the model's own prediction (``fisher="sampled"``, one draw
per example: the "true" Fisher's Monte-Carlo estimate). Both were found to work in the paper.

Choices of ours for a zoo (the paper merges models fine-tuned on tasks whose data it has):

- The Fisher is measured on the *target's* training images, through a linear probe fitted on the
  member's frozen features (multinomial logistic regression, L-BFGS): it asks which of the member's
  parameters matter for this target, at the cost of one forward pass for the features plus
  ``num_examples`` per-example backward passes per member. Members run in eval mode (their own
  BatchNorm statistics) while the Fisher is measured.
- The head is not merged: the merged body gets the task's new head, like every method here.
- Normalisation layers: affine parameters are merged like any other parameter (with their Fisher);
  running statistics are re-estimated on the target training images after merging (one pass in
  train mode with a cumulative average), because the merged weights do not produce the members'
  statistics.
- After merging, the model is fine-tuned like ``finetune`` (same engine and budget).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zootune.errors import ZootuneError
from zootune.methods.finetune import FineTune, FineTuneConfig, check_member_index, fine_tune
from zootune.methods.registry import BuildContext, MethodSpec, register_method
from zootune.models.features import feature_extractor
from zootune.models.heads import find_head_name, set_submodule
from zootune.options import require


@dataclass
class FisherMergeConfig(FineTuneConfig):
    fisher: Literal["empirical", "sampled"] = "empirical"  # y: the label, or a draw from the model
    num_examples: int = 256  # target training images the Fisher is estimated on
    epsilon: float = 1e-8  # added to every Fisher entry (zero Fisher everywhere -> plain average)
    probe_l2: float = 1e-3  # L2 penalty of the linear probe the Fisher is measured through

    def __post_init__(self):
        super().__post_init__()
        require(self.num_examples >= 1, f"num_examples must be >= 1, got {self.num_examples}")
        require(self.epsilon >= 0, f"epsilon must be >= 0, got {self.epsilon}")
        require(self.probe_l2 >= 0, f"probe_l2 must be >= 0, got {self.probe_l2}")


def _head_parameter_names(model: nn.Module, head_name: str) -> set[str]:
    return {f"{head_name}.{n}" for n, _ in model.get_submodule(head_name).named_parameters()}


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     l2: float = 1e-3, steps: int = 100) -> nn.Linear:
    """Multinomial logistic regression on frozen ``features`` (N, D): minimises
    mean cross-entropy + ``l2`` * ||W||^2 by L-BFGS from zero."""
    probe = nn.Linear(features.shape[1], num_classes).to(features.dtype)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(features), labels) + l2 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe.requires_grad_(False)


def diagonal_fisher(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor | None = None, *,
                    skip: set[str] = frozenset(), batch_size: int = 32,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Mean over the examples of the squared per-example gradient of log p(y | x) for every
    parameter of ``model`` (eval mode) not in ``skip``. ``labels=None``: y drawn from the model's
    predictive distribution (``generator``); else y = the labels."""
    from torch.func import functional_call, grad, vmap

    was_training = model.training
    model.eval()
    params = {n: p.detach() for n, p in model.named_parameters() if n not in skip}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n in skip}
    buffers = {n: b for n, b in model.named_buffers()}

    def log_likelihood(trainable, x, y):
        logits = functional_call(model, (trainable, frozen, buffers), (x.unsqueeze(0),))
        return F.log_softmax(logits, dim=-1)[0].gather(0, y.reshape(1)).squeeze(0)

    per_example = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    try:
        for start in range(0, inputs.shape[0], batch_size):
            x = inputs[start:start + batch_size]
            if labels is None:
                with torch.no_grad():
                    probs = F.softmax(model(x), dim=-1)
                y = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                y = labels[start:start + batch_size]
            grads = per_example(params, x, y)
            for n, g in grads.items():
                sums[n] += g.square().sum(0)
    finally:
        model.train(was_training)
    return {n: s / inputs.shape[0] for n, s in sums.items()}


@torch.no_grad()
def fisher_weighted_average(members: Sequence[nn.Module], fishers: Sequence[Mapping[str, torch.Tensor]],
                            epsilon: float = 1e-8) -> nn.Module:
    """A copy of ``members[0]`` whose parameters named in the Fishers are
    sum_i (F_i + eps) theta_i / sum_i (F_i + eps); every other tensor is member 0's."""
    if len(members) != len(fishers) or not members:
        raise ZootuneError("need one Fisher per member and at least one member")
    merged = copy.deepcopy(members[0])
    params = [dict(m.named_parameters()) for m in members]
    for name, target in merged.named_parameters():
        if name not in fishers[0]:
            continue
        weights = torch.stack([f[name].to(torch.float64) + epsilon for f in fishers])
        values = torch.stack([p[name].detach().to(torch.float64) for p in params])
        denominator = weights.sum(0)
        if not bool((denominator > 0).all()):
            raise ZootuneError(f"the Fishers of {name} are zero in every member; use epsilon > 0")
        target.copy_(((weights * values).sum(0) / denominator).to(target.dtype))
    return merged


@torch.no_grad()
def reestimate_norm_statistics(model: nn.Module, inputs: torch.Tensor, batch_size: int = 64) -> None:
    """BatchNorm running statistics := the cumulative average over ``inputs`` (train-mode forwards)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
    model.train()
    try:
        for start in range(0, inputs.shape[0], batch_size):
            batch = inputs[start:start + batch_size]
            if batch.shape[0] > 1:
                model(batch)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


def _target_examples(data, num_examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    train = data.train.with_transform(None) if hasattr(data.train, "with_transform") else data.train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:num_examples]
    pairs = [train[int(i)] for i in order]
    return torch.stack([x for x, _ in pairs]), torch.as_tensor([int(y) for _, y in pairs])


def build(ctx: BuildContext) -> FineTune:
    config = ctx.config or FisherMergeConfig()
    if ctx.rebuilding:  # a saved model: only the structure (the merged weights are in the file)
        return fine_tune(ctx.zoo[check_member_index(ctx.zoo, 0)], ctx.task, config)
    num_classes = getattr(ctx.task, "num_classes", None)
    if num_classes is None:
        raise ZootuneError("fisher-merge measures the Fisher of a classifier's log-likelihood: classification only")
    inputs, labels = _target_examples(ctx.require_data("the Fisher is measured on it"), config.num_examples, ctx.seed)
    generator = torch.Generator().manual_seed(ctx.seed)
    probed, fishers = [], []
    for member in ctx.zoo:
        model = copy.deepcopy(member).eval()
        head_name = find_head_name(model, config.head_name)
        with torch.no_grad():
            # the head's own input: the probe then sits exactly where the head was
            features = feature_extractor(model, module_input=head_name)(model, inputs).flatten(1)
        set_submodule(model, head_name, fit_linear_probe(features, labels, num_classes, l2=config.probe_l2))
        skip = _head_parameter_names(model, head_name)
        fishers.append(diagonal_fisher(model, inputs, None if config.fisher == "sampled" else labels,
                                       skip=skip, generator=generator))
        probed.append(model)
    merged = fisher_weighted_average(probed, fishers, config.epsilon)
    reestimate_norm_statistics(merged, inputs)
    return fine_tune(merged, ctx.task, config)


register_method(
    MethodSpec(
        name="fisher-merge",
        help="Fisher-weighted average of the members (Fisher on the target, through a linear probe), "
             "then fine-tune (NeurIPS 2022)",
        build=build,
        plain_model=True,
        config=FisherMergeConfig,
    )
)

__all__ = ["FisherMergeConfig", "diagonal_fisher", "fisher_weighted_average", "fit_linear_probe",
           "reestimate_norm_statistics"]
