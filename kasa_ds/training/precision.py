"""Optimizer, learning-rate schedule, mixed precision and memory guard of the plain (non-DeepSpeed) loop.

DeepSpeed runs get the optimizer states, precision and clipping from their DeepSpeed config instead (the recipe
refuses the overlap); the schedule (:func:`lr_factor`) is shared by both.

- ``train.optimizer``: adamw (torch) | adamw8bit | paged_adamw8bit (bitsandbytes: 8-bit states, 2 B per parameter
  instead of 8; paged ones are evicted to CPU memory under GPU memory pressure). bitsandbytes 0.50 runs both on CPU.
- ``train.autocast``: bfloat16 | float16 | null. float16 scales the loss (torch.amp.GradScaler, CUDA or CPU).
- ``train.max_memory_gib``: before the model is loaded the planner's estimate must fit (causal LMs); while training,
  CUDA allocations are capped at the limit (an overrun is an error naming the knobs), and on CPU the process' peak
  resident memory is checked after each step.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys

import torch

GiB = 1 << 30


def build_optimizer(params, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise SystemExit(f"error: train.optimizer={name} needs bitsandbytes: pip install -e .[quant]") from None
    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=lr, weight_decay=weight_decay)


def lr_factor(step: int, cfg) -> float:
    """Multiplier of train.lr at ``step`` (a TrainSection): linear warm-up, then cosine, linear or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.lr_schedule == "constant":
        return 1.0
    done = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.lr_schedule == "linear":
        return max(0.0, 1.0 - done)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


def autocast(device: torch.device, dtype_name):
    """The forward's autocast context (a no-op for null)."""
    if dtype_name is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype_name))


def grad_scaler(device: torch.device, dtype_name):
    """A GradScaler for float16 autocast (CUDA or CPU), else None (bfloat16 keeps float32's range)."""
    if dtype_name == "float16":
        return torch.amp.GradScaler(device.type)
    return None


class MemoryGuard:
    """Caps this process at ``limit_gib`` (None: no cap). Call :meth:`check` after each step."""

    def __init__(self, limit_gib, device: torch.device):
        self.limit_gib, self.device = limit_gib, device
        if limit_gib is not None and device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, limit_gib * GiB / total), device)

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / GiB
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
        return kib * (1 if sys.platform == "darwin" else 1024) / GiB

    def check(self, step: int) -> None:
        if self.limit_gib is None:
            return
        peak = self.peak_gib()
        if peak > self.limit_gib:
            what = "GPU memory allocated" if self.device.type == "cuda" else "resident memory of this process"
            raise MemoryError(f"train.max_memory_gib={self.limit_gib:g} exceeded at step {step}: peak {what} "
                              f"{peak:.2f} GiB; lower train.micro_batch_size or model.max_length, set "
                              "model.gradient_checkpointing: true, or train.optimizer: paged_adamw8bit")

    @contextlib.contextmanager
    def around_step(self, step: int):
        try:
            yield
        except torch.OutOfMemoryError as e:
            raise MemoryError(f"out of memory at step {step} (train.max_memory_gib={self.limit_gib}): lower "
                              "train.micro_batch_size or model.max_length, or enable gradient checkpointing") from e
        self.check(step)
