"""One training step's micro-batches through pipeline stages: megatron-core's non-interleaved 1F1B schedule
(PipeDream-flush) over torch point-to-point operations, on gloo or NCCL.

Stage s of P first runs min(P − s − 1, K) forwards (warmup), then alternates one forward and one backward, then runs
the backwards left (cooldown): stage s works on micro-batch k while stage s+1 works on an earlier one, and a stage
keeps at most P − s micro-batches' activations. Where a stage sends to a neighbour and receives from it at the same
point of the schedule, the two are posted together (``batch_isend_irecv``), so both sides' operations match in order
(under NCCL each pair's operations run in order on one stream: two sends facing each other would wait forever).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class StageLinks:
    """This rank's peers in the neighbouring stages (global ranks; None at the ends of the pipeline)."""

    prev: Optional[int]
    next: Optional[int]


def exchange(send: Optional[torch.Tensor], to: Optional[int], receive: Optional[torch.Tensor],
             source: Optional[int]) -> Optional[torch.Tensor]:
    """Send ``send`` to ``to`` and receive into ``receive`` from ``source``, posted together; either may be None.
    Returns ``receive`` once both are done."""
    ops = []
    if send is not None:
        ops.append(dist.P2POp(dist.isend, send.detach().contiguous(), to))
    if receive is not None:
        ops.append(dist.P2POp(dist.irecv, receive, source))
    for work in dist.batch_isend_irecv(ops) if ops else []:
        work.wait()
    return receive


def one_f_one_b(num_microbatches: int, stage: int, stages: int, links: StageLinks,
                forward: Callable[[int, Optional[torch.Tensor]], tuple[torch.Tensor, Any]],
                backward: Callable[[torch.Tensor, Any, Optional[torch.Tensor]], None],
                empty_activation: Callable[[int], torch.Tensor]) -> None:
    """Run the step's forwards and backwards on this stage, in 1F1B order (every rank of a stage runs the same
    schedule, so the TP collectives inside forward and backward stay in order).
    forward(k, x) → (out, saved): micro-batch k on this stage from its input ``x`` ([s, b, h] received from the
        previous stage, a leaf that requires grad; None on the first stage). ``out`` is sent to the next stage; on
        the last stage it is the loss to run backward from, and is not sent.
    backward(out, saved, grad): backward from ``out`` (``grad``: its gradient received from the next stage; None on
        the last stage, whose ``out`` is its loss).
    empty_activation(k): an empty tensor shaped as micro-batch k's activation between stages (its input, and its
        output's gradient), on this rank's device."""
    first, last = stage == 0, stage == stages - 1
    warmup = min(stages - stage - 1, num_microbatches)
    held: deque = deque()  # (x, out, saved) of the micro-batches whose backward has not run, oldest first
    forwarded = backwarded = 0

    def receive_forward(k: int) -> Optional[torch.Tensor]:
        return None if first else exchange(None, None, empty_activation(k), links.prev)

    def run_forward(x: Optional[torch.Tensor]) -> torch.Tensor:
        nonlocal forwarded
        if x is not None:
            x.requires_grad_()
        out, saved = forward(forwarded, x)
        held.append((x, out, saved))
        forwarded += 1
        return out

    def run_backward(grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        nonlocal backwarded
        x, out, saved = held.popleft()
        backward(out, saved, grad)
        backwarded += 1
        return None if x is None else x.grad

    def send_backward(x_grad: Optional[torch.Tensor]) -> None:
        if not first:
            exchange(x_grad, links.prev, None, None)

    for _ in range(warmup):
        x = receive_forward(forwarded)
        out = run_forward(x)
        exchange(out, links.next, None, None)
    steady = num_microbatches - warmup
    x = receive_forward(forwarded) if steady else None
    for i in range(steady):
        out = run_forward(x)
        grad = None if last else exchange(out, links.next, empty_activation(backwarded), links.next)
        x_grad = run_backward(grad)
        if i == steady - 1 or first:
            x = None
            send_backward(x_grad)
        else:
            x = exchange(x_grad, links.prev, empty_activation(forwarded), links.prev)
    for _ in range(warmup):
        grad = None if last else exchange(None, None, empty_activation(backwarded), links.next)
        send_backward(run_backward(grad))


__all__ = ["StageLinks", "exchange", "one_f_one_b"]
