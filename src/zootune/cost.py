"""Parameters and FLOPs of a model for training and for inference.

FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode`, which looks at the aten
operations a real forward (and backward) runs, so any model -- a zoo-tuned network with grouped
per-sample convolutions, an ensemble, a student next to frozen teachers -- is counted as it executes.

Conventions (stated once, used by every report):

* ``count_flops`` returns FLOPs as FlopCounterMode counts them: a multiply-add is **2** FLOPs. Only
  matrix products and convolutions (and attention) are counted; BatchNorm, activations, pooling
  and elementwise arithmetic are not (they are a few percent of a CNN's work).
* The papers' "GFLOPs" are multiply-accumulates: ResNet-50 at 224x224 is "4.12 GFLOPs" (Zoo-Tuning,
  Table 1), i.e. 4.1 G MACs. :class:`Cost` therefore reports **GMACs per sample** in its ``*_gflops``
  fields: ``macs = flops / 2``.
* Parameter counts include every parameter of the module, trainable or frozen (the paper counts
  Distill's 5 frozen teachers + student as 142.28M = 6 x 23.71M; 23.71M is a ResNet-50 backbone
  plus a 100-way head).

FlopCounterMode's formula for ``convolution_backward`` ignores ``groups`` in the weight gradient and
so over-counts it ``groups``-fold; that matters for the grouped convolutions that compute per-sample
kernels (groups = batch size). :func:`conv_backward_flop` replaces it: the weight gradient of a
convolution costs exactly its forward.

Measuring never changes a model: train/eval flags of every submodule, buffers (BatchNorm running
statistics, Lite Zoo-Tuning's temporal gate average), ``.grad`` of every parameter and the random
number generators are restored afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from zootune.errors import ZootuneError
from zootune.engine.distributed import unwrap

__all__ = [
    "Cost", "conv_backward_flop", "count_cost", "count_flops", "count_macs", "count_params",
    "measure_cost", "preserved_state",
]

Inputs = torch.Tensor | Sequence[torch.Tensor]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters once); with ``trainable_only`` only ``requires_grad`` ones."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                       transposed, _output_padding, _groups, output_mask, out_shape, **_) -> int:
    """FLOPs of ``aten.convolution_backward``, correct for grouped convolutions.

    grad_input is a (transposed) convolution of grad_output with the same weight: the forward's
    cost, computed from the real weight shape (C_out, C_in/groups, k...). grad_weight pairs every
    output position with every weight element once, again the forward's cost: 2·B·|out|·C_out·(C_in/g)·k².
    """
    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:
        flops += conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return flops


_CUSTOM_FLOPS = {torch.ops.aten.convolution_backward: conv_backward_flop}


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Run a block on ``model`` and undo its side effects on the model.

    Restores every submodule's ``training`` flag, every buffer (object and values: a forward in
    train mode updates BatchNorm statistics in place or may rebind a buffer), every parameter's
    ``.grad`` (the block sees ``None``), and the CPU/CUDA random generators (dropout draws).
    """
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(m, name, buf, None if buf is None else buf.detach().clone())
               for m in model.modules() for name, buf in m._buffers.items()]
    params = list(model.parameters())
    grads = [p.grad for p in params]
    devices = sorted({t.device.index or 0 for t in [*params, *(b for *_, b, _ in buffers if b is not None)]
                      if t.device.type == "cuda"})
    for p in params:
        p.grad = None
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for p, grad in zip(params, grads):
            p.grad = grad
        with torch.no_grad():
            for module, name, buf, saved in buffers:
                if buf is not None:
                    buf.copy_(saved)
                module._buffers[name] = buf
        for module, training in flags:
            module.training = training


def _as_args(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    args = tuple(inputs)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise ZootuneError("example input must be a tensor or a sequence of tensors")
    return args


def _differentiable_sum(outputs: Any) -> torch.Tensor | None:
    """A scalar that depends on every floating output that requires grad (None if none does)."""
    if isinstance(outputs, torch.Tensor):
        leaves = [outputs]
    elif isinstance(outputs, dict):
        leaves = list(outputs.values())
    elif isinstance(outputs, (list, tuple)):
        leaves = list(outputs)
    else:
        leaves = []
    terms = [t.float().sum() for t in leaves
             if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    return torch.stack(terms).sum() if terms else None


def count_flops(model: nn.Module, inputs: Inputs, backward: bool = False, train_mode: bool | None = None) -> int:
    """Total FLOPs (multiply-add = 2) of ``model(*inputs)`` for the whole given batch.

    Args:
        model: any module; it is left exactly as it was (see :func:`preserved_state`).
        inputs: a batch tensor, or a sequence of tensors passed as positional arguments.
        backward: also count the backward pass of ``sum(outputs)`` (the gradients a training step
            computes: weight gradients of trainable parameters, activation gradients where needed;
            frozen parts that nothing trainable depends on cost forward only).
        train_mode: run in ``model.train()`` (True) or ``model.eval()`` (False); ``None`` keeps the
            current mode. Train mode matters for methods that compute differently while training
            (Lite Zoo-Tuning's batch-shared gate).
    """
    args = _as_args(inputs)
    with preserved_state(model):
        if train_mode is not None:
            model.train(train_mode)
        # One uncounted pass first: work a module does once per new input shape (Zoo-Tuning's
        # autotuner timing its candidate formulations, cached kernels) is not its steady-state cost.
        with torch.set_grad_enabled(backward):
            warm = model(*args)
            if backward and (loss := _differentiable_sum(warm)) is not None:
                loss.backward()
        del warm
        counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS)
        with counter, torch.set_grad_enabled(backward):
            outputs = model(*args)
            if backward:
                loss = _differentiable_sum(outputs)
                if loss is not None:
                    loss.backward()
    return int(counter.get_total_flops())


def count_macs(model: nn.Module, inputs: Inputs, backward: bool = False, train_mode: bool | None = None) -> int:
    """Multiply-accumulates (the papers' "FLOPs"): ``count_flops(...) // 2``."""
    return count_flops(model, inputs, backward=backward, train_mode=train_mode) // 2


@dataclasses.dataclass(frozen=True)
class Cost:
    """Per-sample compute and size of a method, in the Zoo-Tuning paper's Table 1 convention.

    ``*_gflops`` fields are **G multiply-accumulates per sample** (ResNet-50 at 224: ~4.1).

    Attributes:
        train_gflops: forward of the training-time model in train mode (Table 1's "train GFLOPs";
            Distill = teachers + student).
        train_step_gflops: forward + backward of the training-time model (about 3x the forward for
            a fully trained network).
        train_params: all parameters of the training-time model, frozen ones included.
        infer_gflops: forward of the inference model in eval mode.
        infer_params: parameters of the inference model.
        input_shape: shape of one example (batch dimension dropped).
    """

    train_gflops: float
    train_step_gflops: float
    train_params: int
    infer_gflops: float
    infer_params: int
    input_shape: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["input_shape"] = list(self.input_shape)
        return out

    def __str__(self) -> str:
        return (f"train {self.train_gflops:.3g} GFLOPs (step {self.train_step_gflops:.3g}), "
                f"{self.train_params / 1e6:.2f}M params; infer {self.infer_gflops:.3g} GFLOPs, "
                f"{self.infer_params / 1e6:.2f}M params")


def measure_cost(train_model: nn.Module, infer_model: nn.Module, example_input: Inputs) -> Cost:
    """Measure a method's training-time and inference-time cost per sample.

    ``example_input`` is a batch (e.g. ``torch.randn(2, 3, 224, 224)``); FLOPs are divided by its
    batch size. Use a batch of at least 2 when the model has BatchNorm on 1x1 feature maps (train
    mode needs more than one value per channel). Neither model is changed.
    """
    args = _as_args(example_input)
    # Count the module itself: a DDP wrapper's forward would start collective communication.
    train_model, infer_model = unwrap(train_model), unwrap(infer_model)
    batch = args[0].shape[0] if args[0].dim() > 0 else 1
    if batch < 1:
        raise ZootuneError("example input has an empty batch")
    per_sample_g = 2 * batch * 1e9  # FLOPs -> G multiply-accumulates per sample
    return Cost(
        train_gflops=count_flops(train_model, args, backward=False, train_mode=True) / per_sample_g,
        train_step_gflops=count_flops(train_model, args, backward=True, train_mode=True) / per_sample_g,
        train_params=count_params(train_model),
        infer_gflops=count_flops(infer_model, args, backward=False, train_mode=False) / per_sample_g,
        infer_params=count_params(infer_model),
        input_shape=tuple(args[0].shape[1:]),
    )


def count_cost(model: nn.Module, example_input: Inputs) -> Cost:
    """:func:`measure_cost` for a model that is trained and deployed as it is (fine-tuning)."""
    return measure_cost(model, model, example_input)
