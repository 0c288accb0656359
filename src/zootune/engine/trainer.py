"""The one training loop every method goes through.

Per step (the contract in :mod:`zootune.methods.base`)::

    module.set_training_progress(step / total_steps)          # if defined
    outputs = model(inputs)                                    # DistributedDataParallel when W > 1
    loss = task.loss(outputs, targets) + module.auxiliary_loss(outputs, targets)   # if defined
    (w_r * loss).backward()                                    # w_r = n_r W / N, 1 for one process
    optimizer.step(); module.after_optimizer_step()            # if defined

The forward and the loss run under ``torch.autocast`` when ``precision`` is bf16/fp16 (fp16 scales the
loss with a ``GradScaler``). Before the first step (once per process, outside any forward) the engine
sets the intra-op thread count (:mod:`zootune.engine.threads`), converts BatchNorm layers for
``sync_bn``, moves convolutional models to channels-last, and calls every module's
``prepare_for_training`` (:mod:`zootune.engine.hooks`) with the first batch -- and, when resuming,
the state the module kept in the checkpoint.

After each epoch: validation (metric sums over all processes), best-on-validation state kept, an
atomic checkpoint with every RNG state and the modules' ``training_state()``, ``metrics.jsonl`` /
``metrics.csv``. At the end the best state is loaded and ``module.finalize()`` (if defined) gives the
model that is returned. Under ``torchrun`` only rank 0 writes files and logs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
import time
import warnings
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from zootune.data.cache import user_cache_dir
from zootune.data.loading import one_line_worker_errors
from zootune.engine import distributed
from zootune.engine.checkpoint import (
    CHECKPOINT_NAME,
    FORMAT_VERSION,
    atomic_torch_save,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    seed_everything,
)
from zootune.engine.config import TrainConfig, check_device
from zootune.engine.distributed import unwrap
from zootune.engine.evaluation import _model_device, evaluation_sums, sums_to_metrics
from zootune.engine.guard import Diverged, DivergenceGuard
from zootune.engine.hooks import (
    TRAINING_STATES_KEY,
    PreparationContext,
    optional_method,
    prepare_for_training,
    saved_training_states,
    training_states,
)
from zootune.engine.metric_log import MetricLog
from zootune.engine.optim import LRSchedule, build_optimizer
from zootune.engine.sampler import GlobalBatchSampler, epoch_seed, rank_loss_weight
from zootune.engine.sync_bn import convert_sync_batchnorm, revert_sync_batchnorm
from zootune.engine.threads import choose_threads, forward_macs
from zootune.errors import CheckpointError, DataError, NonFiniteLossError, ZootuneError
from zootune.tasks import Task

log = logging.getLogger(__name__)
# What a user watching a run wants to know (the time left); the command line prints it.
progress_log = logging.getLogger("zootune.progress")

# Config fields that may change between a run and its resumption without changing its numbers.
_RESUME_FREE_FIELDS = {"epochs", "stop_after", "progress", "num_workers", "eval_every", "device", "eval_batch_size"}
# Optimizer-group settings taken from the resuming run's config, not from the checkpoint.
_RESUMED_HYPERPARAMETERS = ("initial_lr", "lr", "weight_decay", "momentum", "nesterov", "betas")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns.

    ``model`` is the finalized best-on-validation model (the last epoch's without validation data);
    ``final_metrics`` are its validation metrics (``val_loss``, ``val_<metric>``), or the last
    epoch's training metrics without validation data.
    """

    model: nn.Module
    history: list[dict[str, float]]
    best_epoch: int
    best_val_metric: float | None
    final_metrics: dict[str, float]
    checkpoint_path: Path | None
    seconds: float
    rollbacks: list[dict] = dataclasses.field(default_factory=list)  # the divergence guard's (engine.guard)


class _StepHooks(NamedTuple):
    """The module's optional per-step hooks (:mod:`zootune.methods.base`), looked up once per epoch."""

    set_progress: Callable[[float], None] | None
    auxiliary_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    after_step: Callable[[], None] | None

    @classmethod
    def of(cls, module: nn.Module) -> "_StepHooks":
        return cls(optional_method(module, "set_training_progress"), optional_method(module, "auxiliary_loss"),
                   optional_method(module, "after_optimizer_step"))


class _Batch(NamedTuple):
    """This process's slice of one global batch: its inputs and targets as the loader gives them, the
    global batch's size (the loss weight's denominator) and its index in the epoch."""

    inputs: torch.Tensor
    targets: torch.Tensor
    global_size: int
    index: int


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _has_conv2d(module: nn.Module) -> bool:
    """Whether a module runs 2-d convolutions: an ``nn.Conv2d``, or one that says so
    (``convolves_2d``, :mod:`zootune.engine.hooks`)."""
    return any(isinstance(m, nn.Conv2d) or getattr(m, "convolves_2d", False) for m in module.modules())


@torch.no_grad()
def _four_d_layout(module: nn.Module, memory_format: torch.memory_format) -> None:
    """Every 4-d parameter and buffer (convolution kernels) in ``memory_format``, in place (the same
    Parameter objects). ``module.to(memory_format=...)`` would refuse parameters of other
    dimensions (e.g. a 5-d stack of 2-d kernels, from which a module builds its kernel each step: that
    kernel follows the input's layout in the convolution)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.dim() == 4:
            tensor.data = tensor.data.contiguous(memory_format=memory_format)


def _say_time_left(seconds: float, epoch: int, end: int, epochs: int) -> None:
    """One line after the first epoch a training call runs: the time it took (validation and the
    checkpoint included) and the estimate for the epochs this call has left."""
    stopping = f" (of {epochs}; this call stops after {end})" if end < epochs else ""
    progress_log.info("training: epoch %d/%d%s took %.1f s; about %s for the remaining %d",
                      epoch, end, stopping, seconds, _duration(seconds * (end - epoch)), end - epoch)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _is_better(value: float, best: float | None, higher_is_better: bool) -> bool:
    if best is None:
        return True
    return value > best if higher_is_better else value < best


class Trainer:
    """Train ``model`` for ``task`` on ``train_dataset``; validate on ``val_dataset`` each epoch.

    Datasets yield ``(input tensor, target)`` pairs. ``out_dir`` (optional) receives
    ``checkpoint.pt`` every epoch plus ``metrics.jsonl``/``metrics.csv``; ``resume=True`` continues
    from its checkpoint to the same numbers an uninterrupted run gives. ``callbacks``: objects with
    optional ``on_epoch_end(trainer, record)`` and ``on_fit_end(trainer, result)``, called on every
    process (``trainer.dist.is_main`` tells rank 0). ``example_input``: the batch (a tensor of the
    training batch's shape) that modules preparing for training see (:mod:`zootune.engine.hooks`) and
    on which the engine chooses the thread count; default: the first training batch (read once more,
    every random stream restored).
    ``data_fingerprint``: what identifies the training data (e.g.
    :func:`zootune.data.image_folder.folder_fingerprint`); stored in the checkpoint, and resuming
    from a checkpoint of other data is refused.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train_dataset: Dataset,
        val_dataset: Dataset | None = None,
        config: TrainConfig | dict | None = None,
        out_dir: str | Path | None = None,
        resume: bool = False,
        callbacks: Sequence[Any] | None = None,
        example_input: torch.Tensor | None = None,
        data_fingerprint: str | None = None,
    ):
        if config is None:
            config = TrainConfig()
        elif isinstance(config, dict):
            config = TrainConfig.from_dict(config)
        if resume and out_dir is None:
            raise ZootuneError("resume=True needs out_dir (the folder holding checkpoint.pt)")
        self.module = unwrap(model)
        self.task = task
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.config = config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.resume = resume
        self.callbacks = list(callbacks or [])
        self.dist = distributed.DistInfo()
        self.history: list[dict[str, float]] = []
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps taken
        self.best_epoch = 0
        self.best_val_metric: float | None = None
        self._best_state: dict[str, torch.Tensor] | None = None
        self.example_input = example_input
        self.data_fingerprint = data_fingerprint
        self._saved_training_states: dict | None = None
        self._scaler: torch.amp.GradScaler | None = None
        self._channels_last = False
        self.guard = DivergenceGuard(factor=config.divergence_factor, max_rollbacks=config.max_rollbacks)

    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / CHECKPOINT_NAME if self.out_dir is not None else None

    # ------------------------------------------------------------------ set-up
    def _device(self) -> torch.device:
        if self.config.device is not None:
            return torch.device(self.config.device)
        if torch.cuda.is_available():
            return torch.device("cuda", self.dist.local_rank)
        return torch.device("cpu")

    def _check_datasets(self) -> None:
        if len(self.train_dataset) == 0:
            raise DataError("the training dataset is empty")
        if self.val_dataset is not None and len(self.val_dataset) == 0:
            raise DataError("the validation dataset is empty (pass val_dataset=None to train without one)")

    def _restore(self, optimizer: torch.optim.Optimizer) -> None:
        path = self.checkpoint_path
        if not path.is_file():
            if self.dist.is_main:
                log.warning("resume: no checkpoint at %s, starting afresh", path)
            return
        ckpt = load_checkpoint(path)
        self._check_same_data(ckpt, path)
        try:
            self.module.load_state_dict(ckpt["model"])
        except RuntimeError as err:
            raise CheckpointError(
                f"{path} does not fit this model ({str(err).splitlines()[0]}); was it written by another method "
                "or architecture?"
            ) from None
        self._restore_optimizer(ckpt["optimizer"], optimizer, path)
        self.guard.load_state_dict(ckpt.get("guard"), optimizer)
        if self.dist.is_main:
            self._warn_about_changed_config(ckpt)
        self.epoch = int(ckpt["epoch"])
        self.step = int(ckpt["step"])
        self.history = list(ckpt["history"])
        self.best_epoch = int(ckpt["best_epoch"])
        self.best_val_metric = ckpt["best_val_metric"]
        self._best_state = ckpt["best_state"]
        self._saved_training_states = saved_training_states(ckpt)
        if self._scaler is not None and ckpt.get("grad_scaler"):
            self._scaler.load_state_dict(ckpt["grad_scaler"])
        rng_states = ckpt["rng"]
        if self.dist.rank < len(rng_states):
            restore_rng_state(rng_states[self.dist.rank])
        else:  # more processes than when it was written: fresh, distinct streams for the new ranks
            seed_everything(epoch_seed(self.config.seed, self.epoch, stream=1000 + self.dist.rank))
        if self.dist.is_main:
            log.info("resumed from %s after epoch %d", path, self.epoch)

    @staticmethod
    def _restore_optimizer(saved: dict, optimizer: torch.optim.Optimizer, path: Path) -> None:
        # The optimizer's saved groups carry the old run's rates and weight decay: the ones this run was
        # configured with take effect from the next step instead (lr(step) = new initial_lr * f(step)).
        configured = [{k: g[k] for k in _RESUMED_HYPERPARAMETERS if k in g} for g in optimizer.param_groups]
        try:
            optimizer.load_state_dict(saved)
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: optimizer state does not fit this model's parameters ({err})") from None
        for group, values in zip(optimizer.param_groups, configured):
            group.update(values)

    def _warn_about_changed_config(self, ckpt: dict) -> None:
        """Say which settings differ from the checkpoint's (options renamed since it was written are
        compared under their current names)."""
        old = TrainConfig.with_current_names(ckpt["config"])
        changed = sorted(
            k
            for k, v in self.config.to_dict().items()
            if k not in _RESUME_FREE_FIELDS and old.get(k) != v
        )
        if changed:
            log.warning(
                "resume: %s changed (%s); from step %d on the new values apply: lr(step) = lr * f(step) with the "
                "schedule f of the new settings, so the run will not match an uninterrupted one",
                ", ".join(changed), ", ".join(f"{k} {old.get(k)} -> {getattr(self.config, k)}" for k in changed),
                int(ckpt["step"]) + 1,
            )
        if old.get("epochs") != self.config.epochs:
            log.warning(
                "resume: epochs changed from %s to %s; a schedule that depends on the total changes",
                old.get("epochs"),
                self.config.epochs,
            )

    def _check_same_data(self, ckpt: dict, path: Path) -> None:
        """Continuing on other data than the checkpoint was trained on would silently give a model of
        neither (and replace the run's model): refused. A checkpoint of an older zootune, which
        records no fingerprint, is resumed with a warning."""
        if self.data_fingerprint is None:
            return
        recorded = ckpt.get("data_fingerprint")
        if recorded is None:
            if self.dist.is_main:
                warnings.warn(f"{path} records no fingerprint of its training data (written by an older zootune): "
                              "resuming without checking that the data is the same", stacklevel=2)
            return
        if recorded != self.data_fingerprint:
            raise DataError(
                f"the training data changed since {path} was written (class folders, files or file sizes differ): "
                "resume with the data it was trained on, or start over with --overwrite")

    def _save_checkpoint(self, optimizer: torch.optim.Optimizer) -> None:
        # Every rank's RNG state (all must call the gather), written by rank 0.
        rng_states = distributed.all_gather_objects(capture_rng_state())
        if not self.dist.is_main or self.out_dir is None:
            return
        atomic_torch_save(
            {
                "format_version": FORMAT_VERSION,
                "model": self.module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": self.epoch,
                "step": self.step,
                "best_epoch": self.best_epoch,
                "best_val_metric": self.best_val_metric,
                "best_state": self._best_state,
                "history": self.history,
                "config": self.config.to_dict(),
                "data_fingerprint": self.data_fingerprint,
                "rng": rng_states,
                "sampler": {"seed": self.config.seed, "epoch": self.epoch},
                # What modules chose before training (e.g. by timing): a resumed run computes what
                # this one did, bit for bit, instead of choosing again.
                TRAINING_STATES_KEY: training_states(self.module),
                "grad_scaler": self._scaler.state_dict() if self._scaler is not None else None,
                "guard": self.guard.state_dict(),
            },
            self.checkpoint_path,
        )

    # ------------------------------------------------------------------ loop
    def fit(self) -> FitResult:
        started = time.perf_counter()
        cfg = self.config
        module, device = self._join_and_place()
        sampler = self._sampler(module)
        threads_before = torch.get_num_threads()
        converted_bn = self._apply_speed_settings(module, sampler, device)
        self._scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
        optimizer = build_optimizer(module, cfg)
        schedule = LRSchedule(cfg, len(sampler))
        if self.resume:
            self._restore(optimizer)
        self._prepare_modules(module, sampler, device)
        model = self._distributed(module, device)
        metric_log = MetricLog(self.out_dir) if self.out_dir is not None and self.dist.is_main else None
        if self.val_dataset is not None and self.guard.factor is not None and self.guard.reference_val_loss is None:
            self.guard.reference_val_loss = sums_to_metrics(self._val_sums(module), self.task)["loss"]
        try:
            self._train_epochs(model, module, optimizer, schedule, sampler, device, metric_log)
            self._undo_speed_settings(module, converted_bn)
            result = self._finish(module, started)
        finally:
            if metric_log is not None:
                metric_log.close()
            self._undo_speed_settings(module, converted_bn)
            torch.set_num_threads(threads_before)
        for cb in self.callbacks:
            if optional_method(cb, "on_fit_end"):
                cb.on_fit_end(self, result)
        return result

    def _join_and_place(self) -> tuple[nn.Module, torch.device]:
        """Join the process group (under ``torchrun``), check the data, put the module on this
        process's device and seed its random streams: (module, device)."""
        cfg = self.config
        check_device(cfg.device)
        # A CPU run uses gloo even on a machine with GPUs (NCCL only reduces GPU tensors).
        on_cpu = cfg.device is not None and torch.device(cfg.device).type == "cpu"
        self.dist = distributed.init_from_env(backend="gloo" if on_cpu else None)
        self._check_datasets()
        device = self._device()
        module = self.module.to(device)
        # Distinct streams per rank (dropout, augmentation), the same streams on every run.
        seed_everything(cfg.seed + self.dist.rank)
        return module, device

    def _sampler(self, module: nn.Module) -> GlobalBatchSampler:
        """This process's slices of the global batches, every epoch; refuses data that gives no batch."""
        cfg = self.config
        sampler = GlobalBatchSampler(
            len(self.train_dataset),
            cfg.batch_size,
            seed=cfg.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            max_batches=cfg.max_steps_per_epoch,
            # BatchNorm cannot normalise one sample in training mode: drop a final batch that would
            # leave a process a single sample rather than crash at the end of the epoch.
            min_per_rank=2 if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()) else 1,
            drop_last=cfg.drop_last,
            # (index, seed) keys: per-sample augmentation independent of workers and resumes
            sample_seeds=bool(getattr(self.train_dataset, "accepts_sample_seeds", False)),
        )
        if len(sampler) == 0:
            raise DataError(
                f"the training dataset ({len(self.train_dataset)} samples) gives no batch to train on with "
                f"batch_size={cfg.batch_size}, drop_last={cfg.drop_last} and {self.dist.world_size} process(es)"
            )
        return sampler

    def _distributed(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` wrapped for DistributedDataParallel under several processes, else itself."""
        if not self.dist.enabled:
            return module
        return nn.parallel.DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=self.config.find_unused_parameters,
        )

    def _train_epochs(self, model, module, optimizer, schedule, sampler, device, metric_log) -> None:
        """The epochs left (up to ``stop_after``), each logged and reported to the callbacks."""
        cfg = self.config
        end = min(cfg.epochs, cfg.stop_after or cfg.epochs)
        first_of_call = True
        while self.epoch < end:
            started = time.perf_counter()
            if not self._guarded_epoch(model, module, optimizer, schedule, sampler, device):
                continue
            if first_of_call and cfg.progress and self.dist.is_main and self.epoch < end:
                _say_time_left(time.perf_counter() - started, self.epoch, end, cfg.epochs)
            first_of_call = False
            record = self.history[-1]
            if metric_log is not None:
                metric_log.write(self.history)
            for cb in self.callbacks:
                if optional_method(cb, "on_epoch_end"):
                    cb.on_epoch_end(self, record)

    # ------------------------------------------------------------------ before the first step
    def _apply_speed_settings(self, module: nn.Module, sampler: GlobalBatchSampler, device: torch.device) -> list:
        """The thread count, SyncBatchNorm and channels-last (undone by :meth:`_undo_speed_settings`);
        returns the converted BatchNorm layers."""
        cfg = self.config
        threads = choose_threads(cfg.threads, device, lambda: forward_macs(module, (self._example(sampler, device),)))
        if threads is not None:
            torch.set_num_threads(threads)
        converted_bn = convert_sync_batchnorm(module, device) if cfg.sync_bn and self.dist.enabled else []
        self._channels_last = cfg.channels_last if cfg.channels_last is not None else (
            device.type == "cuda" and _has_conv2d(module))
        if self._channels_last:
            _four_d_layout(module, torch.channels_last)
        return converted_bn
    def _undo_speed_settings(self, module: nn.Module, converted_bn) -> None:
        """The architecture's own BatchNorm classes and a contiguous layout again (for the caller,
        finalize() and saving: safetensors stores contiguous tensors only). Idempotent."""
        revert_sync_batchnorm(converted_bn)
        if self._channels_last:
            _four_d_layout(module, torch.contiguous_format)
            self._channels_last = False

    def _autocast(self, device: torch.device):
        """The autocast context of the forward passes (a no-op for fp32)."""
        dtype = _AUTOCAST_DTYPES.get(self.config.precision)
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def _to_device(self, inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self._channels_last and inputs.dim() == 4:
            return inputs.to(device, non_blocking=True, memory_format=torch.channels_last)
        return inputs.to(device, non_blocking=True)

    def _example(self, sampler: GlobalBatchSampler, device: torch.device) -> torch.Tensor:
        """``example_input``, or this rank's first batch of the current epoch, read once more with
        every random stream restored afterwards (datasets that augment draw from them)."""
        if self.example_input is not None:
            return self._to_device(self.example_input, device)
        sampler.set_epoch(self.epoch)
        indices = next(iter(sampler))
        state = capture_rng_state()
        try:
            inputs = default_collate([self.train_dataset[i] for i in indices])[0]
        finally:
            restore_rng_state(state)
        return self._to_device(inputs, device)

    def _prepare_modules(self, module: nn.Module, sampler: GlobalBatchSampler, device: torch.device) -> None:
        """Every module's ``prepare_for_training`` (:mod:`zootune.engine.hooks`), with the state it kept
        in the checkpoint when resuming. The example batch is read only if a module asks for it."""
        context = PreparationContext(
            model=module, name="", device=device, config=self.config, saved_state=None,
            is_main=self.dist.is_main, cache_dir=user_cache_dir(),
            example_batch=functools.cache(lambda: self._example(sampler, device)),
            agree=lambda value: distributed.all_gather_objects(value)[0],
            autocast=lambda: self._autocast(device),
        )
        prepare_for_training(module, context, self._saved_training_states, self.checkpoint_path)

    def _guarded_epoch(self, model, module, optimizer, schedule, sampler, device) -> bool:
        """One epoch and its validation; False when the divergence guard rolled it back."""
        self.guard.remember(module, optimizer)
        step = self.step
        try:
            record = self._train_epoch(model, module, optimizer, schedule, sampler, device)
            self._after_epoch(module, optimizer, record)
        except Diverged as problem:
            self.step = step
            self.guard.roll_back(module, optimizer, self.epoch + 1, str(problem))
            return False
        return True

    def _train_epoch(self, model, module, optimizer, schedule: LRSchedule, sampler: GlobalBatchSampler, device):
        """One pass over this process's slices of the epoch's global batches; the epoch's training
        metrics over all processes."""
        cfg, epoch = self.config, self.epoch
        sampler.set_epoch(epoch)
        global_sizes = [len(b) for b in sampler.global_batches()]
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=sampler,
            num_workers=cfg.num_workers,
            # Worker seeds come from this generator: fixed per (seed, epoch, rank), so resuming needs
            # no loader state and workers draw the same augmentations every run.
            generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, stream=1 + self.dist.rank)),
            pin_memory=device.type == "cuda",
        )
        hooks = _StepHooks.of(module)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        show = cfg.progress and self.dist.is_main and sys.stderr.isatty()
        bar = tqdm(total=len(sampler), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show, leave=False)
        sums = torch.zeros(4, dtype=torch.float64)  # loss * n, metric sum, metric count, n (this rank)
        model.train()
        t0 = time.perf_counter()
        for i, (inputs, targets) in enumerate(one_line_worker_errors(loader)):
            batch = _Batch(inputs, targets, global_sizes[i], i)
            outputs, targets, loss_value = self._train_step(model, hooks, optimizer, schedule, params, batch, device)
            n = targets.shape[0]
            metric_sum, metric_count = self.task.metric_sums(outputs.detach(), targets)
            sums += torch.tensor([loss_value * n, metric_sum, metric_count, n], dtype=torch.float64)
            if show:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{sums[0] / sums[3]:.4f}",
                    **{self.task.metric_name: f"{sums[1] / max(sums[2], 1):.2f}"},
                    img_s=f"{self.dist.world_size * sums[3] / (time.perf_counter() - t0):.0f}",
                )
        bar.close()
        return self._epoch_record(optimizer, sums, time.perf_counter() - t0)

    def _train_step(self, model, hooks: _StepHooks, optimizer, schedule: LRSchedule, params, batch: _Batch, device):
        """One optimisation step on this process's slice of a global batch (the contract in the module
        docstring): (outputs, targets on the device, the loss's value)."""
        world = self.dist.world_size
        self._check_targets(batch.targets)
        if hooks.set_progress is not None:
            hooks.set_progress(self.step / schedule.total_steps)
        schedule.apply(optimizer, self.step)
        inputs, targets = self._to_device(batch.inputs, device), batch.targets.to(device, non_blocking=True)
        with self._autocast(device):
            outputs = model(inputs)
            loss = self.task.loss(outputs, targets)
            if hooks.auxiliary_loss is not None:
                loss = loss + hooks.auxiliary_loss(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        weight = rank_loss_weight(targets.shape[0], batch.global_size, world) if world > 1 else 1.0
        weighted = loss * weight if weight != 1.0 else loss
        (self._scaler.scale(weighted) if self._scaler is not None else weighted).backward()
        loss_value = float(loss.detach())
        self._check_finite(loss_value, self.epoch, batch.index)  # before the step: the weights stay good
        self._optimizer_step(optimizer, params)
        if hooks.after_step is not None:
            hooks.after_step()
        self.step += 1
        return outputs, targets, loss_value

    def _optimizer_step(self, optimizer, params) -> None:
        """The update from the gradients: unscaled (fp16), clipped (``grad_clip``), then stepped."""
        if self._scaler is not None:
            self._scaler.unscale_(optimizer)  # clip (and step) on the true gradients
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        if self._scaler is not None:
            self._scaler.step(optimizer)  # skipped when a gradient overflowed fp16
            self._scaler.update()
        else:
            optimizer.step()

    def _epoch_record(self, optimizer, sums: torch.Tensor, seconds: float) -> dict[str, float]:
        """The epoch's training metrics from this process's ``sums`` (loss * n, metric sum, metric
        count, n), summed over all processes."""
        sums = distributed.all_reduce_sum(sums)
        return {
            "epoch": self.epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": sums[0].item() / sums[3].item(),
            f"train_{self.task.metric_name}": sums[1].item() / max(sums[2].item(), 1),
            "seconds": seconds,
            "images_per_s": sums[3].item() / max(seconds, 1e-9),
        }

    def _check_targets(self, targets: torch.Tensor) -> None:
        """``task.check_targets`` on every batch; with several processes a bad batch on one rank stops
        all of them (a rank that raised alone would leave the others waiting in a collective)."""
        problem = None
        try:
            self.task.check_targets(targets)
        except DataError as err:
            problem = err
        if self.dist.enabled:
            flags = distributed.all_reduce_sum(torch.tensor([float(problem is not None)]))
            if problem is None and flags.item() > 0:
                raise DataError("bad targets in a batch of another process (see that rank's error)")
        if problem is not None:
            raise DataError(f"epoch {self.epoch + 1}: {problem}") from None

    def _check_finite(self, loss_value: float, epoch: int, batch_index: int) -> None:
        bad = not math.isfinite(loss_value)
        if self.dist.enabled:  # every rank must agree before any of them steps
            bad = distributed.all_reduce_sum(torch.tensor([float(bad)])).item() > 0
        if not bad:
            return
        if self.guard.can_roll_back:
            raise Diverged(f"non-finite training loss ({loss_value}) at step {batch_index + 1}")
        checkpoint = self.checkpoint_path if self.checkpoint_path is not None and self.checkpoint_path.is_file() else None
        kept = (f"the last good checkpoint ({checkpoint}, after epoch {self.epoch}) is kept" if checkpoint is not None
                else "no checkpoint had been written yet")
        raise NonFiniteLossError(
            f"non-finite loss ({loss_value}) at epoch {epoch + 1}, step {batch_index + 1} "
            f"(optimizer step {self.step + 1}); training stopped and {kept}",
            checkpoint=checkpoint,
            advice=f"try a lower learning rate (lr={self.config.lr:g}), warmup_epochs or grad_clip",
        )

    def _after_epoch(self, module: nn.Module, optimizer, record: dict) -> None:
        cfg = self.config
        epoch = self.epoch + 1
        last = epoch == cfg.epochs
        self._check_finite_weights(module, epoch)
        val = None
        if self.val_dataset is not None and (epoch % cfg.eval_every == 0 or last):
            val = sums_to_metrics(self._val_sums(module), self.task)
            problem = self.guard.val_problem(val["loss"])
            if problem is not None:
                raise Diverged(problem)
            record.update({f"val_{k}": v for k, v in val.items()})
        self.epoch = epoch
        if val is not None:
            metric = val[self.task.metric_name]
            if _is_better(metric, self.best_val_metric, self.task.higher_is_better):
                self.best_val_metric, self.best_epoch = metric, self.epoch
                self._best_state = _cpu_state(module)
        elif self.val_dataset is None:
            self.best_epoch = self.epoch
        if self.guard.events:
            record["lr_factor"] = self.guard.lr_factor
        self.history.append(record)
        if self.dist.is_main:
            log.info("epoch %d/%d %s", self.epoch, cfg.epochs, {k: round(v, 4) for k, v in record.items() if k != "epoch"})
        self._save_checkpoint(optimizer)

    def _check_finite_weights(self, module: nn.Module, epoch: int) -> None:
        cfg = self.config
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                if self.guard.can_roll_back:
                    raise Diverged(f"{name} became non-finite")
                checkpoint = self.checkpoint_path if self.checkpoint_path is not None and self.checkpoint_path.is_file() else None
                raise NonFiniteLossError(
                    f"{name} became non-finite during epoch {epoch} although the loss stayed finite; "
                    "training stopped before saving" + (f" and the last good checkpoint ({checkpoint}) is kept"
                                                        if checkpoint is not None else ""),
                    checkpoint=checkpoint,
                    advice=f"try a lower learning rate (lr={cfg.lr:g}) or grad_clip",
                )

    def _val_sums(self, module: nn.Module) -> torch.Tensor:
        cfg = self.config
        with self._autocast(_model_device(module)):
            return evaluation_sums(
                module,
                self.task,
                self.val_dataset,
                batch_size=cfg.eval_batch_size or cfg.batch_size,
                num_workers=cfg.num_workers,
                shard=True,
            )

    def _finish(self, module: nn.Module, started: float) -> FitResult:
        if self._best_state is not None:
            module.load_state_dict(self._best_state)
        finalize = optional_method(module, "finalize")
        final_model = finalize() if finalize is not None else module
        if self.val_dataset is not None:
            final = sums_to_metrics(self._val_sums(final_model), self.task)
            final_metrics = {f"val_{k}": v for k, v in final.items()}
        else:
            last = self.history[-1] if self.history else {}
            final_metrics = {k: v for k, v in last.items() if k.startswith("train_")}
        return FitResult(
            model=final_model,
            history=list(self.history),
            best_epoch=self.best_epoch,
            best_val_metric=self.best_val_metric,
            final_metrics=final_metrics,
            checkpoint_path=self.checkpoint_path if self.out_dir is not None and self.dist.is_main else None,
            seconds=time.perf_counter() - started,
            rollbacks=list(self.guard.events),
        )
