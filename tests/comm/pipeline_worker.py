"""Worker for tests/comm/test_pipeline.py: kasa_ds.comm.pipeline.one_f_one_b on P gloo ranks, one stage each.

    torchrun --nproc_per_node P tests/comm/pipeline_worker.py OUT_DIR K

Stage s is tanh(W_s x) (h = 8); the last stage's loss for micro-batch k is c_k · Σ y². Micro-batch k has its own
sequence length (3 + k), so every received tensor's shape comes from its own micro-batch. Every rank also runs the
whole chain in one process on the same micro-batches (the reference). Writes OUT_DIR/rank<R>.json: this stage's
gradient error against the reference's (max |Δ| / max |g|), and the order of its forwards and backwards.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from kasa_ds.comm.pipeline import StageLinks, one_f_one_b

H = 8


def main() -> None:
    out, k_total = Path(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("gloo")
    rank, stages = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    weights = [torch.randn(H, H) / H ** 0.5 for _ in range(stages)]
    inputs = [torch.randn(3 + k, 2, H) for k in range(k_total)]
    scales = [1.0 + 0.5 * k for k in range(k_total)]

    reference = [w.clone().requires_grad_() for w in weights]  # the whole chain, one process
    for x, c in zip(inputs, scales):
        for w in reference:
            x = torch.tanh(x @ w.T)
        (c * x.square().sum()).backward()

    w = weights[rank].clone().requires_grad_()
    events = []

    def forward(k, x):
        events.append(("F", k))
        y = torch.tanh((inputs[k] if x is None else x) @ w.T)
        return (scales[k] * y.square().sum(), None) if rank == stages - 1 else (y, None)

    def backward(out, saved, grad):
        events.append(("B", len([e for e in events if e[0] == "B"])))
        torch.autograd.backward([out], [grad])

    links = StageLinks(rank - 1 if rank > 0 else None, rank + 1 if rank < stages - 1 else None)
    one_f_one_b(k_total, rank, stages, links, forward, backward, lambda k: torch.empty(3 + k, 2, H))
    want = reference[rank].grad
    error = ((w.grad - want).abs().max() / want.abs().max()).item()
    (out / f"rank{rank}.json").write_text(json.dumps({"error": error, "events": events}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
