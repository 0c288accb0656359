"""Hub-Pathway: transfer from a hub of pretrained models of *different* architectures.

Shu, Cao, Zhang, Wang, Long, "Hub-Pathway: Transfer Learning from A Hub of Pre-trained Models",
NeurIPS 2022 (arXiv 2206.03726). No public code is known; the paper's text fixes the structure
(data-dependent pathway weights, input-level routing, output-level aggregation, a noisy generator,
an exploration loss, exploitation by the data that activate each model) and leaves the details
open. What we chose is marked **Choice** below.

With a hub of m models f_1..f_m (any architectures and feature sizes), per input x::

    g(x)      = W_g φ(x)                                     pathway logits, φ = small conv net on x
    h(x)      = g(x) + ε ⊙ softplus(W_noise φ(x)),  ε~N(0,I)  in training; h = g at inference
    S(x)      = topk(h(x), k)                                the models x is routed to
    w_i(x)    = softmax_{j∈S(x)}(h_j(x))_i  for i∈S(x), else 0
    ŷ(x)      = Σ_{i∈S(x)} w_i(x) · head_i(f_i(x))            output-level aggregation

    L = L_task(ŷ, y) + λ_explore · (CV²(Importance) + CV²(Load)) + λ_exploit · L_exploit

    Importance_i = Σ_b w_i(x_b)                              (over the batch)
    Load_i       = Σ_b P(i ∈ S(x_b))                          smooth, differentiable estimate
    L_exploit    = mean over routed pairs (b, i) of L_task(head_i(f_i(x_b)), y_b)
    CV²(v)       = Var(v) / (Mean(v)² + 1e-10)                (population variance; 0 iff uniform)

**Routing is executed, not masked**: for each model the samples routed to it are gathered, the model
runs once on them, and the weighted outputs are scattered back (``index_add``). A model that no
sample selects does not run, so FLOPs are those of the selected models plus the generator: at
inference about k/m of an ensemble of the same hub.

Choices (the paper's text leaves them open):

- **Generator** φ: conv3x3(C→w, stride 2)-BN-ReLU-conv3x3(w→2w, stride 2)-BN-ReLU-global average
  pool, on the input average-pooled down to at most ``generator_input_size`` pixels a side (so its
  cost does not grow with the resolution). ``W_noise`` and the biases are zero-initialised and
  ``W_g`` ~ N(0, ``GATE_INIT_STD``²) with a small std, so every model starts equally likely on
  average. Shazeer et al. 2017 zero-initialise W_g too; but then every clean logit is exactly 0, the
  noise-free routing of evaluation is one tie for every input, and top-k breaks ties by index: every
  image went to the same two models. The small random W_g breaks the ties differently per input
  (the routing of an untrained generator is spread over the hub), while in training the noise
  (σ = softplus(0) ≈ 0.69 at the start) still dominates it.
- **Noise**: noisy top-k gating of Shazeer et al., "Outrageously Large Neural Networks", ICLR 2017;
  the softmax is over the kept *noisy* logits, as there. Off in ``eval()``.
- **k** = 2 by default; any 1 ≤ k ≤ m.
- **Load** in training is Shazeer's smooth estimate P(i∈S(x)) = Φ((g_i(x) − θ_i(x)) / σ_i(x)), where
  σ_i = softplus(W_noise φ(x))_i and θ_i is the k-th largest noisy logit among the *other* models;
  it gives gradient to the generator. Without noise (eval, or ``noisy=False``) Load is the
  non-differentiable count of routed samples.
- **Heads**: each model gets its own new head ``task.make_head(d_i)`` on its own features, so feature
  sizes may differ; the members' original heads are not used (their parameters are frozen, see
  below).
- **Exploitation**: each routed (sample, model) pair adds the task loss of that model's own head
  on that sample. ``exploit_weighting="none"`` (default) counts every routed pair equally;
  ``"gate"`` weights pair (b, i) by the detached gate w_i(x_b) (so that exploitation never moves
  the router) and averages over samples. Measured in docs/hub-pathway.md.
- **Defaults**: λ_explore = 0.01 per term (after Shazeer's 0.1 with their much larger batches, scaled
  down because at small batches CV² is noisy), λ_exploit = 1.
- Members are **deep-copied** by default (``copy_members=True``) so one hub can seed several runs.
- Member parameters that do not influence the features (an original head, layers after a
  module-input entry point) are set to ``requires_grad=False`` at construction, found by one
  probe forward/backward on a dummy input of ``input_shape``.
- Under DistributedDataParallel some members receive no samples in a step: wrap with
  ``find_unused_parameters=True``.

Variants (ours; measured in docs/robustness.md). ``variant="paper"`` is the method above.
``variant="robust"`` (the default) differs only when given ``member_scores`` (one per hub model,
higher = better, e.g. :func:`zootune.methods.zoo_tuning.start.score_members` on the hub):

    g(x) = W_g φ(x) + p,     p_i = route_prior (3) for the route_prior_top (default k) best-ranked
                             models, 0 for the others                      (p: fixed, not trained)
    L_explore = CV²(Importance / q) + CV²(Load / q),     q = softmax(p)

so routing starts on the k best-ranked models (with the zero-initialised W_g every input takes them,
equally weighted) and exploration is measured against the prior's shares q instead of uniform use:
it does not push the generator towards the models the ranking put last. From a uniform start the
router follows whichever models' new heads learn fastest in the first steps, not the models that
transfer best, and the models it leaves get no data (measured: on ``polygons`` a prior on the best
model alone, at logit 3, was abandoned within an epoch for two weak models).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zootune.errors import ZootuneError
from zootune.methods.registry import BuildContext, MethodSpec, register_method
from zootune.options import parse_config, require
from zootune.zoo.hub import Hub, as_hub
from zootune.tasks import ClassificationTask, Task

GATE_INIT_STD = 0.01  # small next to the initial noise std softplus(0) ~ 0.69 (tie-breaking only)


VARIANTS = ("paper", "robust")
EXPLORE_TARGETS = ("uniform", "prior")
EXPLOIT_WEIGHTINGS = ("none", "gate")
# The robust variant's logit bonus for the member ranked first (chosen by measurement: docs/robustness.md)
ROBUST_ROUTE_PRIOR = 3.0
ROBUST_GENERATOR_LR_MULT = 1.0


def cv_squared(values: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation Var(v) / (Mean(v)² + eps); 0 exactly when v is uniform."""
    if values.numel() <= 1:
        return values.new_zeros(())
    return values.var(unbiased=False) / (values.mean() ** 2 + eps)


def balance_loss(importance: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """Exploration loss CV²(Importance) + CV²(Load) over the hub's models (minimal, 0, when uniform)."""
    return cv_squared(importance) + cv_squared(load)


def smooth_load(
    clean_logits: torch.Tensor, noisy_logits: torch.Tensor, noise_std: torch.Tensor, k: int
) -> torch.Tensor:
    """Σ_b P(i ∈ topk(noisy logits of x_b)) under fresh noise on logit i alone (Shazeer et al. 2017).

    P = Φ((g_i − θ_i) / σ_i), θ_i the k-th largest noisy logit among the other models: the (k+1)-th
    largest overall if i is currently in the top k, else the k-th.
    """
    m = clean_logits.shape[1]
    if k >= m:  # every model is always selected
        return clean_logits.new_full((m,), float(clean_logits.shape[0]))
    top_values = noisy_logits.topk(k + 1, dim=1).values  # (B, k+1)
    kth, kth_plus_one = top_values[:, k - 1 : k], top_values[:, k : k + 1]
    in_top = noisy_logits >= kth
    threshold = torch.where(in_top, kth_plus_one, kth)
    normal = torch.distributions.Normal(clean_logits.new_zeros(()), clean_logits.new_ones(()))
    return normal.cdf((clean_logits - threshold) / noise_std).sum(dim=0)


class PathwayGenerator(nn.Module):
    """Pathway logits g(x) = W_g φ(x) and noise scale σ(x) = softplus(W_noise φ(x)).

    φ = conv3x3(stride 2)-BN-ReLU-conv3x3(stride 2)-BN-ReLU-global average pool on ``x``
    average-pooled to at most ``input_size`` pixels a side.
    """

    def __init__(self, in_chans: int, num_paths: int, width: int = 16, input_size: int = 32):
        super().__init__()
        self.input_size = input_size
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.gate = nn.Linear(2 * width, num_paths)
        self.noise = nn.Linear(2 * width, num_paths)
        for linear in (self.gate, self.noise):  # no model is favoured at the start
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        # ...but no exact ties either: evaluation's noise-free top-k would send every input to the
        # same lowest-index models (see the module docstring)
        nn.init.normal_(self.gate.weight, 0.0, GATE_INIT_STD)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] > self.input_size or x.shape[-2] > self.input_size:
            x = F.adaptive_avg_pool2d(x, (min(x.shape[-2], self.input_size), min(x.shape[-1], self.input_size)))
        h = self.body(x)
        return self.gate(h), F.softplus(self.noise(h))


@dataclass
class Route:
    """The samples ``rows`` routed to model ``index`` (in top-k slot ``slots``) and its head's outputs."""

    index: int
    rows: torch.Tensor
    slots: torch.Tensor
    outputs: torch.Tensor


def _per_sample_losses(task: Task, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if isinstance(task, ClassificationTask):
        return F.cross_entropy(outputs, targets, reduction="none")
    # Task only promises a batch mean; one call per sample is exact for any task.
    return torch.stack([task.loss(outputs[j : j + 1], targets[j : j + 1]) for j in range(len(targets))])


@dataclass
class HubPathwayOptions:
    """What a user chooses for :class:`HubPathway` (the ``hub-pathway`` method's options), checked
    once, here (:class:`zootune.errors.OptionError`); the meaning of each field is on
    :class:`HubPathway`. What depends on the hub itself (``k`` and ``route_prior_top`` at most its
    size, one score per model, a ``route_prior`` only with scores) is checked by the constructor."""

    k: int = 2
    explore_weight: float = 0.01
    exploit_weight: float = 1.0
    exploit_weighting: str = "none"
    noisy: bool = True
    generator_width: int = 16
    generator_input_size: int = 32
    input_shape: Sequence[int] = (3, 32, 32)
    backbone_lr_mult: float = 1.0
    copy_members: bool = True
    variant: str = "robust"
    member_scores: Sequence[float] | None = None
    route_prior: float | None = None
    route_prior_top: int | None = None
    explore: str | None = None
    generator_lr_mult: float | None = None

    def __post_init__(self):
        require(self.k >= 1, f"k must be >= 1, got {self.k}")
        require(self.exploit_weighting in EXPLOIT_WEIGHTINGS,
                f"exploit_weighting must be 'none' or 'gate', got {self.exploit_weighting!r}")
        require(self.variant in VARIANTS, f"variant must be one of {VARIANTS}, got {self.variant!r}")
        require(not self.explore or self.explore in EXPLORE_TARGETS,  # None (or ""): the variant's
                f"explore must be one of {EXPLORE_TARGETS}, got {self.explore!r}")
        require(self.route_prior_top is None or self.route_prior_top >= 1,
                f"route_prior_top must be >= 1, got {self.route_prior_top}")
        require(self.generator_lr_mult is None or self.generator_lr_mult > 0,
                f"generator_lr_mult must be positive, got {self.generator_lr_mult}")
        require(self.member_scores is None or all(math.isfinite(float(v)) for v in self.member_scores),
                f"member_scores must be finite numbers, got {self.member_scores}")


def routing_prior(options: HubPathwayOptions, m: int) -> torch.Tensor:
    """The fixed logits p added to the generator's (see the module docstring): ``route_prior`` for the
    ``route_prior_top`` best-ranked of the hub's ``m`` models in the robust variant with
    ``member_scores``, else 0. Checks what depends on the hub's size."""
    if not 1 <= options.k <= m:
        raise ZootuneError(f"k must be between 1 and the hub size {m}, got {options.k}")
    prior = torch.zeros(m)
    if options.member_scores is None:
        if options.route_prior is not None:
            raise ZootuneError("route_prior needs member_scores (which member to prefer)")
        return prior
    scores = [float(v) for v in options.member_scores]
    if len(scores) != m or not all(math.isfinite(v) for v in scores):
        raise ZootuneError(f"member_scores must be {m} finite numbers (one per hub model), got {options.member_scores}")
    if options.variant == "robust":
        strength = ROBUST_ROUTE_PRIOR if options.route_prior is None else float(options.route_prior)
        top = options.k if options.route_prior_top is None else int(options.route_prior_top)
        if not 1 <= top <= m:
            raise ZootuneError(f"route_prior_top must be between 1 and the hub size {m}, got {top}")
        ranked = sorted(range(m), key=lambda i: (-scores[i], i))  # ties: lower index first
        prior[ranked[:top]] = strength
    return prior


class HubPathway(nn.Module):
    """Hub-Pathway on a :class:`Hub` (or any sequence of models); see the module docstring.

    Args:
        hub: the pretrained models (a :class:`Hub` for custom feature entry points).
        task_or_num_outputs: a :class:`zootune.tasks.Task`, or a number of classes.
        k: the option ``k``, which may be given as the third positional argument.
        options: a :class:`HubPathwayOptions`; or, instead, its fields as keyword arguments.

    The options (fields of :class:`HubPathwayOptions`):
        k: models activated per input (1 ≤ k ≤ m; default 2).
        explore_weight: λ_explore, weight of CV²(Importance) + CV²(Load).
        exploit_weight: λ_exploit, weight of the per-model exploitation loss.
        exploit_weighting: ``"none"`` (every routed pair counts equally) or ``"gate"`` (weighted by
            the detached pathway weight).
        noisy: add the learned Gaussian noise to the logits in training.
        generator_width: channels of the generator's first conv (the second has twice as many).
        generator_input_size: the generator sees the input average-pooled to at most this side.
        input_shape: (C, H, W) of one input, for the construction-time probe that finds feature
            sizes and unused member parameters (any size the members accept).
        backbone_lr_mult: the members' learning rate is ``base_lr * backbone_lr_mult`` in
            :meth:`param_groups`; heads and the generator use ``base_lr``.
        copy_members: deep-copy the hub's models instead of training them in place.
        variant: ``"robust"`` (default) or ``"paper"``; see the module docstring.
        member_scores: one score per hub model (higher = better): the robust variant's routing prior.
        route_prior: the prior's logit for the preferred models (default ``ROBUST_ROUTE_PRIOR``).
        route_prior_top: how many best-ranked models get it (default k).
        explore: ``"prior"`` (robust default) or ``"uniform"`` (paper): what exploration balances towards.
        generator_lr_mult: the generator's learning rate is ``base_lr * generator_lr_mult``.
    """

    def __init__(self, hub: Hub | Sequence[nn.Module], task_or_num_outputs: Task | int, k: int | None = None, *,
                 options: HubPathwayOptions | None = None, **option_values):
        super().__init__()
        if k is not None:
            option_values["k"] = k
        options = _options(options, option_values)
        hub = as_hub(hub)
        prior = routing_prior(options, len(hub))
        self.options = options
        self._set_choices(options, prior)
        self.task = ClassificationTask(task_or_num_outputs) if isinstance(task_or_num_outputs, int) else task_or_num_outputs
        self._add_pathways(hub, options)
        # The initial routing preference, added to the generator's logits (kept out of the generator,
        # whose own initialisation is not ours to change, and out of weight decay): rebuilt from the
        # options, so not saved in the state_dict.
        self.register_buffer("route_prior", prior, persistent=False)
        self.has_route_prior = bool(prior.any())
        self._last: dict | None = None

    def _set_choices(self, options: HubPathwayOptions, prior: torch.Tensor) -> None:
        """The options as attributes, with the variant's defaults resolved (``explore``, ``generator_lr_mult``)."""
        self.variant = options.variant
        self.explore = options.explore or ("prior" if options.variant == "robust" else "uniform")
        generator_lr_mult = options.generator_lr_mult
        if generator_lr_mult is None:
            generator_lr_mult = ROBUST_GENERATOR_LR_MULT if (options.variant == "robust" and prior.any()) else 1.0
        self.generator_lr_mult = float(generator_lr_mult)
        self.member_scores = None if options.member_scores is None else [float(v) for v in options.member_scores]
        self.k = options.k
        self.explore_weight = options.explore_weight
        self.exploit_weight = options.exploit_weight
        self.exploit_weighting = options.exploit_weighting
        self.noisy = options.noisy
        self.backbone_lr_mult = options.backbone_lr_mult

    def _add_pathways(self, hub: Hub, options: HubPathwayOptions) -> None:
        """The members (copied unless ``copy_members=False``), a new head on each one's features
        (sizes found by a probe input) and the pathway generator."""
        input_shape = tuple(options.input_shape)
        self.names = list(hub.names)
        self.extractors = list(hub.extractors)
        self.members = nn.ModuleList(copy.deepcopy(model) if options.copy_members else model for model in hub)
        dims = [self._probe_member(i, input_shape) for i in range(len(hub))]
        self.feature_dims = dims
        self.heads = nn.ModuleList(self.task.make_head(d) for d in dims)
        self.generator = PathwayGenerator(input_shape[0], len(hub), options.generator_width,
                                          options.generator_input_size)

    def _probe_member(self, index: int, input_shape: tuple[int, ...]) -> int:
        """Feature size of member ``index``; freezes its parameters that do not reach the features."""
        member = self.members[index]
        was_training = member.training
        member.eval()  # batch statistics of a dummy input must not touch BN running stats
        try:
            first = next(member.parameters(), None)
            device = first.device if first is not None else None
            features = self.extractors[index](member, torch.zeros(2, *input_shape, device=device))
        except ZootuneError:
            raise
        except Exception as error:  # a wrong input_shape or entry point: say which member failed
            raise ZootuneError(
                f"hub member {self.names[index]!r} failed on a probe input of shape {input_shape} "
                f"({type(error).__name__}: {error}); pass input_shape=... or fix its feature entry point"
            ) from error
        finally:
            member.train(was_training)
        params = [p for p in member.parameters() if p.requires_grad]
        if features.requires_grad and params:
            grads = torch.autograd.grad(features.sum(), params, allow_unused=True)
            for param, grad in zip(params, grads):
                if grad is None:
                    param.requires_grad_(False)
        return features.shape[1]

    def routing(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pathway of each input: ``clean`` and ``noisy`` logits and ``noise_std`` (B, m), the
        selected models ``top_index`` (B, k) and their weights ``top_weight`` (B, k)."""
        clean, noise_std = self.generator(x)
        if self.has_route_prior:
            clean = clean + self.route_prior
        noisy = clean + torch.randn_like(clean) * noise_std if (self.training and self.noisy) else clean
        top_logits, top_index = noisy.topk(self.k, dim=1)
        return {
            "clean": clean, "noise_std": noise_std, "noisy": noisy,
            "top_index": top_index, "top_weight": top_logits.softmax(dim=1),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pathway = self.routing(x)
        top_index, top_weight = pathway["top_index"], pathway["top_weight"]
        outputs: torch.Tensor | None = None
        routes: list[Route] = []
        for i, (member, extractor, head) in enumerate(zip(self.members, self.extractors, self.heads)):
            rows, slots = (top_index == i).nonzero(as_tuple=True)  # top-k indices are distinct per row
            if rows.numel() == 0:
                continue  # nobody chose model i: it does not run
            member_outputs = head(extractor(member, x[rows]))
            weight = top_weight[rows, slots].view(-1, *([1] * (member_outputs.dim() - 1)))
            if outputs is None:
                outputs = member_outputs.new_zeros((x.shape[0], *member_outputs.shape[1:]))
            outputs = outputs.index_add(0, rows, weight * member_outputs)
            routes.append(Route(i, rows, slots, member_outputs))
        if outputs is None:
            raise ZootuneError("Hub-Pathway got an empty batch")
        self._last = {**pathway, "routes": routes}  # for auxiliary_loss, called after this forward
        return outputs

    # -- losses -----------------------------------------------------------------------------------

    def importance_and_load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Importance (Σ_b w_i) and Load (smooth in noisy training, else counts) of the last forward."""
        last = self._require_last()
        m = len(self.members)
        gates = torch.zeros_like(last["clean"]).scatter(1, last["top_index"], last["top_weight"])
        importance = gates.sum(dim=0)
        if self.training and self.noisy:
            load = smooth_load(last["clean"], last["noisy"], last["noise_std"], self.k)
        else:
            load = torch.bincount(last["top_index"].flatten(), minlength=m).to(gates.dtype)
        return importance, load

    def exploration_loss(self) -> torch.Tensor:
        """CV²(Importance) + CV²(Load); with ``explore="prior"`` both are first divided by the share
        q_i = softmax(route_prior)_i the prior gives each model, so the loss is 0 when the routing
        follows the prior's proportions rather than when every model is used equally (uniform
        exploration would push harmful members into use against a prior that ranked them low)."""
        importance, load = self.importance_and_load()
        if self.explore == "prior" and self.has_route_prior:
            share = self.route_prior.softmax(0).to(importance.dtype)
            importance, load = importance / share, load / share
        return balance_loss(importance, load)

    def exploitation_loss(self, targets: torch.Tensor) -> torch.Tensor:
        """Task loss of each routed model's own head on the samples routed to it."""
        last = self._require_last()
        total = None
        for route in last["routes"]:
            route_targets = targets[route.rows]
            if self.exploit_weighting == "none":
                # loss is a batch mean: times n gives the sum over the routed samples
                term = self.task.loss(route.outputs, route_targets) * route.rows.numel()
            else:
                weight = last["top_weight"][route.rows, route.slots].detach()
                term = (weight * _per_sample_losses(self.task, route.outputs, route_targets)).sum()
            total = term if total is None else total + term
        batch = last["top_index"].shape[0]
        denominator = batch * self.k if self.exploit_weighting == "none" else batch
        return total / denominator

    def auxiliary_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """λ_explore · (CV²(Importance) + CV²(Load)) + λ_exploit · L_exploit (engine hook)."""
        loss = outputs.new_zeros(())
        if self.explore_weight:
            loss = loss + self.explore_weight * self.exploration_loss()
        if self.exploit_weight:
            loss = loss + self.exploit_weight * self.exploitation_loss(targets)
        return loss

    def _require_last(self) -> dict:
        if self._last is None:
            raise ZootuneError("Hub-Pathway losses need a forward pass first")
        return self._last

    # -- engine hooks and diagnostics -------------------------------------------------------------

    def param_groups(self, base_lr: float) -> list[dict]:
        members = [p for p in self.members.parameters() if p.requires_grad]
        heads = [p for p in self.heads.parameters() if p.requires_grad]
        generator = [p for p in self.generator.parameters() if p.requires_grad]
        if self.generator_lr_mult == 1.0:
            groups = [{"params": heads + generator, "lr": base_lr}]
        else:
            groups = [{"params": heads, "lr": base_lr},
                      {"params": generator, "lr": base_lr * self.generator_lr_mult}]
        if members:
            groups.append({"params": members, "lr": base_lr * self.backbone_lr_mult})
        return groups

    def finalize(self) -> nn.Module:
        return self

    @torch.no_grad()
    def route_counts(self, x: torch.Tensor) -> torch.Tensor:
        """How many samples of ``x`` each model receives (deterministic routing, no model runs)."""
        was_training = self.training
        self.eval()
        try:
            top_index = self.routing(x)["top_index"]
        finally:
            self.train(was_training)
        return torch.bincount(top_index.flatten(), minlength=len(self.members))


def _options(options: HubPathwayOptions | None, values: dict) -> HubPathwayOptions:
    """``options``, or the keyword ``values`` checked into a :class:`HubPathwayOptions` (not both)."""
    if options is None:
        return parse_config(HubPathwayOptions, values, what="hub-pathway")
    if values:
        raise ZootuneError(f"give HubPathway either options= or keyword options, not both ({sorted(values)})")
    return options


def _build(ctx: BuildContext) -> nn.Module:
    from zootune.methods.zoo_tuning.start import rank_if_robust

    return HubPathway(as_hub(ctx.zoo), ctx.task, options=rank_if_robust(ctx, ctx.config or HubPathwayOptions()))


register_method(
    MethodSpec(
        name="hub-pathway",
        help="Hub-Pathway (NeurIPS 2022): route each input to k of a hub's models of any architectures",
        build=_build,
        hub=True,
        config=HubPathwayOptions,
    )
)

__all__ = ["HubPathway", "HubPathwayOptions", "PathwayGenerator", "Route", "balance_loss", "cv_squared", "smooth_load"]
