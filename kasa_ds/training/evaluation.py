"""Evaluation over a whole eval set, data-parallel: loss (and accuracy for classification, perplexity for LMs)."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .data import IGNORE_INDEX, to_device


class TrainingDiverged(RuntimeError):
    """A NaN/inf loss, gradient or eval output: the run stops without writing anything non-finite."""


def evaluate(forward: Callable, dataset, batch_of: Callable, batch_size: int, device: torch.device, rank: int,
             world: int, task: str, check_stop: Optional[Callable[[], None]] = None) -> dict:
    """Each rank takes a strided share of ``dataset``; sums are all-reduced, so every rank returns the same metrics.

    Every rank runs the same number of forwards (ZeRO-3 forwards are collectives): a rank whose share has run out
    evaluates example 0 with weight 0. ``check_stop`` is called before each batch (a preemption raises there).
    """
    model = getattr(forward, "module", forward)
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss·weight, weight, correct (NCCL: on the GPU)
    idx = list(range(rank, len(dataset), world))
    n_batches = math.ceil(math.ceil(len(dataset) / world) / batch_size)
    with torch.no_grad():
        for b in range(n_batches):
            if check_stop is not None:
                check_stop()
            ids = idx[b * batch_size:(b + 1) * batch_size]
            weight = 1.0 if ids else 0.0
            batch = to_device(batch_of([dataset[i] for i in (ids or [0])]), device)
            out = forward(**batch)
            if task == "seq_cls":
                n = batch["labels"].numel() * weight
                correct = (out.logits.argmax(-1) == batch["labels"]).sum().item() * weight
            else:
                n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item() * weight  # tokens with loss after the shift
                correct = 0.0
            totals += torch.tensor([out.loss.item() * n, n, correct], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    loss = (totals[0] / totals[1]).item()
    if not math.isfinite(loss):
        raise TrainingDiverged(f"the eval loss is {loss}: the model's outputs are NaN/inf (a diverged run or a "
                               "corrupted base); no accuracy is reported from them")
    if task == "seq_cls":
        return {"loss": loss, "accuracy": (totals[2] / totals[1]).item()}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def fmt(metrics: dict) -> str:
    return " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())
