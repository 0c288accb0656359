"""Choosing each aggregation layer's formulation: one explicit step before training.

The aggregation layers (:mod:`zootune.layers.aggregate`) compute the same output in several exact
ways whose speed depends on the shape (batch, channels, pixels, kernel), the dtype, the memory
format, the device and whether a backward pass follows. :func:`tune` runs once, outside any
forward (before the first step: :func:`prepare_for_training`, the layers' preparation hook that the
engine calls, :mod:`zootune.engine.hooks`)::

    report = tune(model, example_batch, mode="time")    # layer.formulation_choice = {"train": name}

It runs the model once on the example batch (under ``no_grad``, every buffer and random generator
restored afterwards) to see the shape, dtype and memory format of each layer's input, then, per
layer and phase, times every candidate on a random input of that kind -- forward and backward for "train", forward without gradients
for "eval" -- with device synchronisation (CUDA events on a GPU, ``time.perf_counter`` on the CPU),
and stores the fastest on the layer (``layer.formulation_choice``). Forward then runs that one
formulation; it never measures anything and never starts a backward pass, so it is safe inside
``DistributedDataParallel`` and under ``torch.compile``.

``mode="macs"`` stores nothing: a layer without a stored choice takes, per call, the candidate with
the fewest multiply-adds for the input's shape (ties: the candidates' order), which is the same on
every machine and every run (``zootune run`` uses it so that one command gives one set of numbers).

Before training only the training phase is tuned: in eval mode an untuned layer takes the fewest
multiply-adds, so a trained model evaluates to the same numbers in every process (during training,
after loading it elsewhere, after an export) whatever the machine's timing said. Tune the eval phase
(``training=False``) for a model that is only deployed.

Measuring is kept cheap: candidates whose multiply-add count is more than ``PRUNE_FACTOR`` times the
cheapest one's are not timed at all, each survivor runs once to warm up and then ``MEASURE_REPEATS``
times (the minimum is kept). Timed choices depend on the machine and its load; each layer's
``training_state()`` is its choice, which the engine stores in its checkpoint and gives back on
resume, so that a resumed run computes exactly what the interrupted one did
(:func:`formulation_choices` / :func:`load_formulation_choices` do the same for a whole model).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, MutableMapping, Sequence

import torch
from torch import nn

from zootune.layers import formulation_cache

log = logging.getLogger(__name__)

PRUNE_FACTOR = 3.0
MEASURE_REPEATS = 2
MODES = ("time", "macs")
PHASES = ("train", "eval")


class TunableLayer:
    """A layer whose formulation is chosen here: :class:`~zootune.layers.AggregatedLayer` (the
    functions below read its ``formulation`` -- "auto" or a fixed name --, ``formulation_choice``
    ({phase: name}), ``candidate_formulations(phase)``, ``timing_runners(x, phase)`` and, for
    :func:`choice_key`, its shape). This base gives it the engine's preparation hook
    (:mod:`zootune.engine.hooks`)."""

    def prepare_for_training(self, context) -> None:
        """Choose the training formulation before the first step, or read it back from the
        checkpoint (:func:`prepare_for_training`)."""
        prepare_for_training(self, context)

    def training_state(self) -> dict[str, str]:
        """The formulation choice, for the engine's checkpoint: a resumed run computes exactly what
        the interrupted one did, instead of timing again (the choice might differ)."""
        return dict(self.formulation_choice)


@dataclass
class LayerChoice:
    """What :func:`tune` decided for one layer in one phase: the formulation, the seconds of each
    timed candidate (empty in "macs" mode or with one candidate) and each candidate's multiply-adds."""

    chosen: str
    seconds: dict[str, float] = field(default_factory=dict)
    macs: dict[str, float] = field(default_factory=dict)


def aggregated_layers(model: nn.Module) -> dict[str, TunableLayer]:
    """Every aggregation layer of ``model`` by its dotted name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, TunableLayer)}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(run: Callable[[], None], device: torch.device) -> float:
    """Seconds of one ``run()``, the device's queued work included."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _synchronize(device)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    _synchronize(device)
    started = time.perf_counter()
    run()
    _synchronize(device)
    return time.perf_counter() - started


def measure(candidates: Mapping[str, Callable[[], None]], macs: Mapping[str, float],
            device: torch.device | str = "cpu", repeats: int = MEASURE_REPEATS) -> LayerChoice:
    """The fastest of ``candidates`` ({name: run once}) by measurement (one warm-up run, then the
    minimum of ``repeats`` runs); ``macs[name]`` (the multiply-add estimate) only prunes candidates
    costing more than ``PRUNE_FACTOR`` x the cheapest."""
    device = torch.device(device)
    cheapest = min(macs[name] for name in candidates)
    survivors = [name for name in candidates if macs[name] <= PRUNE_FACTOR * cheapest]
    if len(survivors) == 1:  # nothing to compare: no need to run anything
        return LayerChoice(survivors[0], {}, dict(macs))
    seconds: dict[str, float] = {}
    for name in survivors:
        run = candidates[name]
        run()  # warm-up: allocator, one-time kernel selection
        seconds[name] = min(_time_once(run, device) for _ in range(repeats))
    return LayerChoice(min(seconds, key=seconds.__getitem__), seconds, dict(macs))


def by_fewest_macs(names: Sequence[str], macs: Mapping[str, float]) -> str:
    """The first of the cheapest candidates by multiply-adds (the untuned forward's rule)."""
    return min(names, key=lambda name: macs[name])


@contextlib.contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Undo a forward's side effects: training flags, buffers (BatchNorm statistics, Lite's gate
    ensemble), gradients and the random generators."""
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(m, name, buf, buf.detach().clone()) for m in model.modules()
               for name, buf in m._buffers.items() if buf is not None]
    grads = [(p, p.grad) for p in model.parameters()]
    devices = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for m, name, buf, saved in buffers:
                m._buffers[name] = buf
                buf.copy_(saved)
        for p, grad in grads:
            p.grad = grad


@dataclass(frozen=True)
class _InputSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    channels_last: bool

    @classmethod
    def of(cls, x: torch.Tensor) -> _InputSpec:
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return cls(tuple(x.shape), x.dtype, x.device, channels_last)

    def make(self) -> torch.Tensor:
        """A standard-normal tensor of this shape, dtype, device and memory format, from a private
        generator (the global random streams are not touched)."""
        generator = torch.Generator(device=self.device).manual_seed(0)
        x = torch.randn(self.shape, generator=generator, device=self.device, dtype=torch.float32).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def _layer_inputs(model: nn.Module, layers: dict[str, TunableLayer], example: Sequence) -> dict[str, _InputSpec]:
    """The shape, dtype and memory format of each layer's input in one training-mode forward of
    ``model(*example)`` without gradients (the inputs themselves are not kept: all of a large
    model's activations at once would not fit where training fits)."""
    seen: dict[str, _InputSpec] = {}
    handles = []
    for name, layer in layers.items():
        def hook(_module, args, name=name):
            seen.setdefault(name, _InputSpec.of(args[0]))
        handles.append(layer.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model.train()
            model(*example)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def choice_key(layer: TunableLayer, spec: _InputSpec, phase: str, candidates: Sequence[str]) -> str:
    """What a timed choice depends on besides the machine: the layer's computation (kind, sources,
    channels, kernel, stride, padding, groups, variant), its input's shape, dtype, memory format and
    device, the phase and the candidates compared."""
    device = spec.device.type
    if spec.device.type == "cuda":
        device = f"cuda:{torch.cuda.get_device_name(spec.device)}"
    geometry = [getattr(layer, name, None) for name in ("stride", "padding", "dilation", "groups", "padding_mode")]
    return "|".join(str(part) for part in (
        type(layer).__name__, layer.extra_repr(), tuple(layer.bank.shape), geometry, layer.variant,
        spec.shape, spec.dtype, "channels_last" if spec.channels_last else "contiguous", device, phase,
        ",".join(sorted(candidates))))


def resolve_mode(mode: str | None) -> str:
    """``mode``, or for ``None`` the default: "time"."""
    mode = mode if mode is not None else "time"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def tune(model: nn.Module, example_batch, *, mode: str | None = "time", training: bool = True,
         phases: Sequence[str] | None = None, repeats: int = MEASURE_REPEATS,
         known: MutableMapping[str, str] | None = None) -> dict[str, dict[str, LayerChoice]]:
    """Choose and store the formulation of every ``formulation="auto"`` aggregation layer of ``model``.

    Args:
        model: any module containing :class:`~zootune.layers.AggregatedLayer` s (left unchanged
            apart from ``layer.formulation_choice``).
        example_batch: an input batch (a tensor, or a tuple of positional inputs) of the size and
            memory format training will use; run under the autocast context training will use.
        mode: ``"time"`` (measure, store the fastest) or ``"macs"`` (store nothing: every call
            takes the fewest multiply-adds for its shape, deterministic).
        training: tune the training phase (forward + backward, the layer in training mode);
            ``False``: the eval phase (forward without gradients) instead.
        phases: override ``training``: the phases to tune, from ("train", "eval").
        repeats: timed runs per candidate after its warm-up run (the minimum counts).
        known: earlier timed choices by :func:`choice_key` (e.g. this machine's, from a cache file):
            a layer whose key is there takes that choice without timing; a timed choice is added.
            Timing differs from run to run, and each formulation sums in another order, so reusing
            the choice is what makes the same command give bit-identical weights on one machine.

    Returns ``{layer name: {phase: LayerChoice}}`` (what was chosen, and the measurements). Under
    ``torch.distributed`` every process must call it (a Lite layer averages its gate over
    processes in the training-mode forward it runs); ranks may choose differently -- the engine
    uses rank 0's choices everywhere.
    """
    mode = resolve_mode(mode)
    phases = tuple(phases) if phases is not None else (("train",) if training else ("eval",))
    if any(p not in PHASES for p in phases):
        raise ValueError(f"phases must be from {PHASES}, got {phases}")
    layers = {name: layer for name, layer in aggregated_layers(model).items() if layer.formulation == "auto"}
    if not layers:
        return {}
    example = tuple(example_batch) if isinstance(example_batch, (tuple, list)) else (example_batch,)
    report: dict[str, dict[str, LayerChoice]] = {}
    with _preserved(model):
        inputs = _layer_inputs(model, layers, example)
        for name, layer in layers.items():
            if name not in inputs:  # not reached by this input (e.g. an unused branch)
                continue
            layer.formulation_choice = {}
            report[name] = {}
            for phase in phases:
                layer.train(phase == "train")
                x = inputs[name].make()
                runners, macs = layer.timing_runners(x, phase)
                if mode == "macs":
                    report[name][phase] = LayerChoice(by_fewest_macs(list(runners), macs), {}, macs)
                    continue
                key = choice_key(layer, inputs[name], phase, list(runners))
                if known is not None and known.get(key) in runners:
                    choice = LayerChoice(known[key], {}, macs)
                else:
                    choice = measure(runners, macs, x.device, repeats)
                    if known is not None:
                        known[key] = choice.chosen
                layer.formulation_choice[phase] = choice.chosen
                report[name][phase] = choice
    return report


def formulation_choices(model: nn.Module) -> dict[str, dict[str, str]]:
    """``{layer name: {phase: formulation}}`` of the layers that hold a tuned choice (for a
    checkpoint: plain strings, loadable with ``weights_only=True``)."""
    return {name: dict(layer.formulation_choice) for name, layer in aggregated_layers(model).items()
            if layer.formulation_choice}


def load_formulation_choices(model: nn.Module, choices: Mapping[str, Mapping[str, str]]) -> None:
    """Put choices from :func:`formulation_choices` back on ``model``'s layers (others untuned).

    Raises ``ValueError`` when a name is not an aggregation layer of ``model`` or a formulation does
    not apply to that layer (a checkpoint of another model or method).
    """
    layers = aggregated_layers(model)
    unknown = sorted(set(choices) - set(layers))
    if unknown:
        raise ValueError(f"formulation choices for layers this model does not have: {', '.join(unknown[:5])}")
    checked = {name: _checked_choice(layers[name], name, per_phase) for name, per_phase in choices.items()}
    for name, layer in layers.items():
        layer.formulation_choice = checked.get(name, {})


def _checked_choice(layer: TunableLayer, name: str, per_phase: Mapping[str, str]) -> dict[str, str]:
    """``per_phase`` as a layer's choice; ``ValueError`` when a formulation does not apply to it."""
    for phase, chosen in per_phase.items():
        if phase not in PHASES or chosen not in layer.candidate_formulations(phase):
            raise ValueError(f"formulation {chosen!r} ({phase}) does not apply to layer {name}")
    return dict(per_phase)


def clear_choices(model: nn.Module) -> None:
    """Forget every layer's tuned choice (forward falls back to the fewest multiply-adds)."""
    for layer in aggregated_layers(model).values():
        layer.formulation_choice = {}


def prepare_for_training(layer: TunableLayer, context) -> None:
    """An aggregation layer's step before training (its ``prepare_for_training``, the engine's hook:
    ``context`` is a :class:`zootune.engine.hooks.PreparationContext`).

    A layer with a fixed formulation has nothing to choose. Otherwise its training formulation is read
    back from the checkpoint when resuming; else, with ``exact_choices="macs"``, nothing is stored
    (every call takes the fewest multiply-adds for its shape); else ("time") the first such layer of
    the model chooses for all of them at once (:func:`tune`, one pass over the example batch).
    Evaluation keeps the fewest-multiply-adds rule, so the trained model's numbers do not depend on
    where it is evaluated.
    """
    if layer.formulation != "auto":
        return
    if context.saved_state is not None:
        layer.formulation_choice = _checked_choice(layer, context.name, context.saved_state)
        return
    if resolve_mode(context.config.exact_choices) == "macs":
        layer.formulation_choice = {}  # nothing to measure: every call takes the fewest multiply-adds
        return
    tuned = [other for other in aggregated_layers(context.model).values() if other.formulation == "auto"]
    if layer is tuned[0]:
        _choose_by_timing(context)


def _choose_by_timing(context) -> None:
    """Every aggregation layer's training formulation, timed on the example batch, timing only what this
    machine's cache of earlier choices (:mod:`zootune.layers.formulation_cache`) does not hold -- so the
    same command trains the same model bit for bit; under several processes every rank takes rank 0's
    choices (the ranks' timings may differ, and every rank must compute the same)."""
    model = context.model
    example = context.example_batch()
    cached = formulation_cache.machine_choices(context.cache_dir) if context.is_main else contextlib.nullcontext(None)
    with cached as known, context.autocast():
        report = tune(model, example, mode="time", training=True, known=known)
    chosen = formulation_choices(model)
    agreed = context.agree(chosen)
    if agreed != chosen:
        load_formulation_choices(model, agreed)
    if context.is_main and report:
        names = [choice.chosen for per_phase in report.values() for choice in per_phase.values()]
        log.info("aggregation formulations chosen by timing: %s", {name: names.count(name) for name in sorted(set(names))})
