"""Worker for tests/comm/test_collectives.py: kasa_ds.comm.collectives.all_reduce_mean on 2 gloo ranks.

    torchrun --nproc_per_node 2 tests/comm/collectives_worker.py OUT_DIR

Tensors of several shapes (one larger than the bucket) hold rank-dependent values; after the call each must equal
the mean over the ranks, computed here from the same seeds. Writes OUT_DIR/rank<R>.json: the largest error.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from kasa_ds.comm.collectives import all_reduce_mean

SHAPES = [(3, 4), (5,), (40, 2), (1,), (2, 3, 2)]  # 48 B, 20 B, 320 B (> the 100 B bucket), 4 B, 48 B


def values(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(shape, generator=g) for shape in SHAPES]


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = values(rank)
    all_reduce_mean(mine, bucket_bytes=100)
    want = [sum(parts) / world for parts in zip(*(values(r) for r in range(world)))]
    error = max((a - b).abs().max().item() for a, b in zip(mine, want))
    shapes_kept = [tuple(t.shape) for t in mine] == SHAPES
    (out / f"rank{rank}.json").write_text(json.dumps({"error": error, "shapes_kept": shapes_kept}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
