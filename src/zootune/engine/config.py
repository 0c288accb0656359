"""The training configuration: one small dataclass, saved as JSON in every checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from zootune.errors import ZootuneError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
EXACT_CHOICE_MODES = ("time", "macs")
# Options renamed since older checkpoints and config files were written: {old name: new name}.
_RENAMED_OPTIONS = {"formulations": "exact_choices"}


# The default training budget (``zootune fit`` without --epochs): enough optimizer steps for a small
# folder, at least the epochs a large one needs (docs/dev-notes/cli-and-run.md has the curve).
BUDGET_MIN_EPOCHS = 10
BUDGET_MIN_STEPS = 1000
BUDGET_MAX_EPOCHS = 300
# The default warm-up (``zootune fit`` without --warmup-epochs): the rate rises linearly over the first
# 5 % of the steps (Goyal et al., 2017). A new head's first gradients at the full rate can knock a
# pretrained body into a plateau at chance (docs/dev-notes/cli-and-run.md: polygons seed 1).
WARMUP_FRACTION = 0.05


def budget_epochs(num_samples: int, batch_size: int) -> tuple[int, str]:
    """(epochs, the rule in words): max(10 epochs, 1000 steps), at most 300 epochs,

        epochs = min(300, max(10, ceil(1000 / ceil(num_samples / batch_size))))."""
    steps_per_epoch = max(1, math.ceil(num_samples / batch_size))
    epochs = min(BUDGET_MAX_EPOCHS, max(BUDGET_MIN_EPOCHS, math.ceil(BUDGET_MIN_STEPS / steps_per_epoch)))
    return epochs, (f"{epochs} epochs x {steps_per_epoch} steps = {epochs * steps_per_epoch} steps "
                    f"(rule: at least {BUDGET_MIN_EPOCHS} epochs and {BUDGET_MIN_STEPS} steps, at most "
                    f"{BUDGET_MAX_EPOCHS} epochs; --epochs N overrides)")


def warmup_epochs_for(epochs: int, steps_per_epoch: int) -> tuple[float, str]:
    """(warm-up epochs, the rule in words): ``WARMUP_FRACTION`` of the run, ``0.05 * epochs``."""
    warmup = WARMUP_FRACTION * epochs
    return warmup, (f"{warmup:g} epochs = {round(warmup * steps_per_epoch)} steps, the rate rising linearly "
                    f"(rule: the first {WARMUP_FRACTION:.0%} of the steps; --warmup-epochs N overrides)")


@dataclass
class TrainConfig:
    """How the engine trains a model; every method uses the same fields.

    ``batch_size`` is the *global* batch: under ``torchrun`` each of ``W`` processes gets a slice of
    every global batch, so the gradient and the learning rate mean the same whatever ``W`` is.

    The learning rate is set every step to ``lr_g * f(step)`` for each parameter group ``g``
    (``lr_g`` is the group's own rate, e.g. a lower backbone rate from ``param_groups``):

    - warm-up (``warmup_epochs`` > 0): ``f = (step + 1) / warmup_steps`` for the first steps;
    - ``cosine``: ``f = (1 + cos(pi * t)) / 2`` with ``t`` the fraction of the post-warm-up steps done;
    - ``step``: ``f = gamma ** (epoch // step_size)`` (``step_size`` defaults to a third of the epochs);
    - ``constant``: ``f = 1``.

    Speed (none of these changes what is computed beyond floating-point rounding):

    - ``precision``: ``"fp32"``, or ``"bf16"`` / ``"fp16"``: forward and loss under
      ``torch.autocast`` on the device (validation too); fp16 adds a ``GradScaler`` (saved in the
      checkpoint). bf16 works on the CPU as well.
    - ``channels_last``: convolutional models and their 4-D inputs in channels-last memory format;
      ``None``: on for CUDA models with 2-d convolutions, off on the CPU (measured no faster there:
      docs/dev-notes/engine.md). The returned model is contiguous again.
    - ``threads``: intra-op threads on the CPU; ``None``: 1 for small models or a busy machine, else
      torch's default (:mod:`zootune.engine.threads`).
    - ``exact_choices``: how a method chooses among exact, equivalent ways of computing the same
      thing (they differ in speed, and in the order of their sums: in the last bits), once before
      training (:mod:`zootune.engine.hooks`): ``"time"`` (the fastest measured on this machine,
      kept in the checkpoint so that resuming is exact) or ``"macs"`` (the fewest multiply-adds,
      the same on every machine); ``None``: "time".

    Several processes (``torchrun``): ``sync_bn`` makes BatchNorm layers normalise over the global
    batch (:mod:`zootune.engine.sync_bn`) instead of each process's slice.

    Divergence (:mod:`zootune.engine.guard`): a non-finite loss or weights, or a validation loss
    above ``divergence_factor`` x its value before training, rolls the epoch back and halves the
    learning rate, at most ``max_rollbacks`` times.
    """

    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9  # SGD only
    nesterov: bool = True  # SGD only (ignored when momentum is 0)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam / AdamW only
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    step_size: int | None = None  # epochs between decays of the "step" schedule
    gamma: float = 0.1  # decay factor of the "step" schedule
    warmup_epochs: float = 0.0
    seed: int = 0
    num_workers: int = 0
    eval_every: int = 1  # validate every N epochs (and always after the last one)
    max_steps_per_epoch: int | None = None  # cap on optimisation steps per epoch (quick runs)
    drop_last: bool = False  # skip each epoch's final partial batch
    progress: bool = True  # tqdm bar on rank 0 when stderr is a terminal; the time-left line (zootune.progress log)
    grad_clip: float | None = None  # max global gradient norm
    eval_batch_size: int | None = None  # defaults to batch_size
    device: str | None = None  # None: "cuda" (the local rank's GPU) when available, else "cpu"
    # DDP must know when some parameters get no gradient in a step (a method that routes each input
    # through some of its branches only); the extra graph walk is cheap next to a forward pass.
    find_unused_parameters: bool = True
    precision: str = "fp32"
    channels_last: bool | None = None
    threads: int | None = None
    exact_choices: str | None = None
    sync_bn: bool = False
    stop_after: int | None = None  # end this call after this many epochs (the schedule spans `epochs`)
    divergence_factor: float | None = 10.0  # the divergence guard (zootune.engine.guard); None: no val check
    max_rollbacks: int = 3  # 0: no guard (a non-finite loss stops training at once)

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # JSON gives a list back
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1 (got {self.epochs})")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1 (got {self.batch_size})")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r})")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
        # inf and nan pass a plain comparison (or fail it with a misleading message) and would
        # surface only later, blamed on divergence
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be > 0 and finite (got {self.lr})")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"weight_decay must be >= 0 and finite (got {self.weight_decay})")
        if self.step_size is not None and self.step_size < 1:
            problems.append(f"step_size must be >= 1 (got {self.step_size})")
        if self.warmup_epochs < 0:
            problems.append(f"warmup_epochs must be >= 0 (got {self.warmup_epochs})")
        if self.num_workers < 0:
            problems.append(f"num_workers must be >= 0 (got {self.num_workers})")
        if self.eval_every < 1:
            problems.append(f"eval_every must be >= 1 (got {self.eval_every})")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            problems.append(f"max_steps_per_epoch must be >= 1 (got {self.max_steps_per_epoch})")
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"grad_clip must be > 0 (got {self.grad_clip})")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            problems.append(f"eval_batch_size must be >= 1 (got {self.eval_batch_size})")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads must be >= 1 (got {self.threads})")
        if self.exact_choices is not None and self.exact_choices not in EXACT_CHOICE_MODES:
            problems.append(f"exact_choices must be one of {', '.join(EXACT_CHOICE_MODES)} "
                            f"(got {self.exact_choices!r})")
        if self.divergence_factor is not None and not (math.isfinite(self.divergence_factor)
                                                        and self.divergence_factor > 1):
            problems.append(f"divergence_factor must be > 1 and finite, or None (got {self.divergence_factor})")
        if self.stop_after is not None and self.stop_after < 1:
            problems.append(f"stop_after must be >= 1 (got {self.stop_after})")
        if self.max_rollbacks < 0:
            problems.append(f"max_rollbacks must be >= 0 (got {self.max_rollbacks})")
        if len(self.betas) != 2:
            problems.append(f"betas must be two numbers (got {self.betas})")
        if problems:
            raise ZootuneError("invalid training config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @staticmethod
    def with_current_names(values: dict[str, Any]) -> dict[str, Any]:
        """``values`` (a config as a dict, e.g. from an older checkpoint) with renamed options under
        their current names."""
        return {_RENAMED_OPTIONS.get(key, key): value for key, value in values.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """A config from :meth:`to_dict`'s output, also an older zootune's (renamed options read)."""
        values = cls.with_current_names(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ZootuneError(
                f"unknown training option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ZootuneError(f"training config is not valid JSON: {err}") from None
        if not isinstance(values, dict):
            raise ZootuneError("training config JSON must be an object of option: value")
        return cls.from_dict(values)


def check_device(device: str | None) -> None:
    """Refuse a ``TrainConfig.device`` that cannot be used here, in one line (:class:`ZootuneError`).

    Usable: ``None`` (chosen at training time), ``cpu``, or a torch device string (``cuda``,
    ``cuda:N``, ``mps``, ``xpu``) whose backend this torch build has and this machine makes
    available, with an index below the number of such devices.
    """
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ZootuneError(f"unknown device {device!r}; use cpu, cuda or cuda:N (or another torch device "
                           "such as mps or xpu)") from None
    if parsed.type == "cpu":
        return
    backend = getattr(torch, parsed.type, None)
    if not callable(getattr(backend, "is_available", None)):
        raise ZootuneError(f"device {device!r}: zootune cannot train on {parsed.type!r} devices; use cpu or cuda")
    if parsed.type == "cuda" and torch.version.cuda is None and torch.version.hip is None:
        raise ZootuneError(f"device {device!r}: CUDA is not available in this torch build (torch {torch.__version__} "
                           "was built without CUDA); use cpu, or install a CUDA build of torch")
    if not backend.is_available():
        raise ZootuneError(f"device {device!r}: no {parsed.type} device is available on this machine; use cpu")
    count = backend.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise ZootuneError(f"device {device!r}: this machine has {count} {parsed.type} device(s) "
                           f"({parsed.type}:0 to {parsed.type}:{count - 1})")
