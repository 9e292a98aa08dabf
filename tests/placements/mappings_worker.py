"""torchrun worker (2 ranks, gloo): kasa_ds.comm.mappings and the KaSAParallelLinear paths that use them (with and
without sequence parallelism), checked against what one process computes. Every rank builds the same full tensors from the same seed; writes max errors."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


from kasa_ds.core.layer import KaSALinear  # noqa: E402
from kasa_ds.comm.mappings import (copy_to_tp_region, gather_first_dim, gather_last_dim, local_slice,  # noqa: E402
                                   reduce_from_tp_region, reduce_scatter_first_dim, split_last_dim)
from kasa_ds.placements.tp.layer import KaSAParallelLinear  # noqa: E402
from kasa_ds.placements.tp.spec import ShardSpec, split_factor  # noqa: E402


def err(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def mappings(rank: int, world: int, sizes) -> dict:
    g = torch.Generator().manual_seed(0)
    full = torch.randn(4, sum(sizes), generator=g)
    upstream = [torch.randn(4, sum(sizes), generator=g) for _ in range(world)]  # one per rank
    mine = local_slice(sizes, None)
    out = {}
    # gather: forward cat of the shards; backward keeps my slice of the (identical) upstream gradient
    x = full[:, mine].clone().requires_grad_()
    y = gather_last_dim(x, sizes, None)
    y.backward(upstream[0])
    out["gather_fwd"], out["gather_bwd"] = err(y, full), err(x.grad, upstream[0][:, mine])
    # split: forward my slice; backward all-gathers every rank's upstream slice
    x = full.clone().requires_grad_()
    y = split_last_dim(x, sizes, None)
    y.backward(upstream[rank][:, mine])
    expect = torch.cat([upstream[r][:, local_slice(sizes, None) if r == rank else
                                    slice(sum(sizes[:r]), sum(sizes[:r + 1]))] for r in range(world)], dim=-1)
    out["split_fwd"], out["split_bwd"] = err(y, full[:, mine]), err(x.grad, expect)
    # copy: identity forward; backward sums every rank's gradient
    x = full.clone().requires_grad_()
    y = copy_to_tp_region(x, None)
    y.backward(upstream[rank])
    out["copy_fwd"], out["copy_bwd"] = err(y, full), err(x.grad, sum(upstream))
    # reduce: forward sums every rank's partial; backward identity
    x = (full * (rank + 1)).requires_grad_()
    y = reduce_from_tp_region(x, None)
    y.backward(upstream[0])
    out["reduce_fwd"] = err(y, full * sum(r + 1 for r in range(world)))
    out["reduce_bwd"] = err(x.grad, upstream[0])
    # the sequence-parallel pair, on a first dimension of 2 rows per rank
    seq = torch.randn(2 * world, 3, 5, generator=g)
    seq_up = [torch.randn(2 * world, 3, 5, generator=g) for _ in range(world)]
    mine_rows = slice(2 * rank, 2 * rank + 2)
    x = seq[mine_rows].clone().requires_grad_()
    y = gather_first_dim(x, None)
    y.backward(seq_up[rank])
    out["gather_first_fwd"], out["gather_first_bwd"] = err(y, seq), err(x.grad, sum(seq_up)[mine_rows])
    x = (seq * (rank + 1)).requires_grad_()
    y = reduce_scatter_first_dim(x, None)
    y.backward(seq_up[rank][mine_rows])
    out["reduce_scatter_first_fwd"] = err(y, (seq * sum(r + 1 for r in range(world)))[mine_rows])
    out["reduce_scatter_first_bwd"] = err(x.grad, torch.cat([seq_up[r][2 * r: 2 * r + 2] for r in range(world)]))
    return out


class ColumnBase(nn.Module):
    """A column-parallel base with gather_output (megatron's: copy the input in, all-gather the output)."""

    def __init__(self, shard, sizes):
        super().__init__()
        self.weight, self.sizes = nn.Parameter(shard, requires_grad=False), sizes

    def forward(self, x):
        return gather_last_dim(F.linear(copy_to_tp_region(x, None), self.weight), self.sizes, None)


class RowBase(nn.Module):
    """A row-parallel base fed the whole input (input_is_parallel=False: split it, then all-reduce the partials)."""

    def __init__(self, shard, sizes):
        super().__init__()
        self.weight, self.sizes = nn.Parameter(shard, requires_grad=False), sizes

    def forward(self, x):
        return reduce_from_tp_region(F.linear(split_last_dim(x, self.sizes, None), self.weight), None)


def layer_paths(rank: int, sizes) -> dict:
    """KaSAParallelLinear with gathered output (column) and scattered input (row) vs a one-process KaSALinear."""
    out = {}
    for dim in (0, 1):
        m, n = (sum(sizes), 6) if dim == 0 else (6, sum(sizes))
        g = torch.Generator().manual_seed(1 + dim)
        w = torch.randn(m, n, generator=g)
        x = torch.randn(3, n, generator=g)
        upstream = torch.randn(3, m, generator=g)
        ref = KaSALinear(nn.Linear(n, m, bias=False), n, m, r=2, alpha=4.0)
        ref.base_layer.weight.data.copy_(w)
        ref.reset_adapter(torch.Generator().manual_seed(7))
        b = torch.randn(m, 2, generator=g)
        ref.lora_B.weight.data.copy_(b)
        spec = ShardSpec(dim, (m, n), tuple(sizes), None, input_is_parallel=False, gather_output=True)
        shard = w[spec.local_slice()] if dim == 0 else w[:, spec.local_slice()]
        base = ColumnBase(shard, sizes) if dim == 0 else RowBase(shard, sizes)
        tp = KaSAParallelLinear(base, spec, r=2, alpha=4.0)
        tp.reset_adapter(torch.Generator().manual_seed(7))
        tp.lora_B.weight.data.copy_(split_factor(b, spec, rank) if dim == 0 else b)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        y_ref, y_tp = ref(xs[0]), tp(xs[1])
        y_ref.backward(upstream)
        y_tp.backward(upstream)
        kind = "column_gather_output" if dim == 0 else "row_scatter_input"
        out[f"{kind}_fwd"] = err(y_tp, y_ref)
        out[f"{kind}_grad_x"] = err(xs[1].grad, xs[0].grad)
        out[f"{kind}_grad_diag"] = err(tp.lora_diag.grad, ref.lora_diag.grad)
        sharded = "lora_B" if dim == 0 else "lora_A"
        for name in ("lora_A", "lora_B"):
            got = getattr(tp, name).weight.grad
            want = getattr(ref, name).weight.grad
            if name == sharded:
                want = split_factor(want, spec, rank)
            out[f"{kind}_grad_{name}"] = err(got, want)
    return out


class SequenceColumnBase(nn.Module):
    """megatron's column-parallel base under sequence parallelism: all-gather the token-split input, multiply."""

    def __init__(self, shard):
        super().__init__()
        self.weight = nn.Parameter(shard, requires_grad=False)

    def forward(self, x):
        return F.linear(gather_first_dim(x, None), self.weight)


class SequenceRowBase(nn.Module):
    """megatron's row-parallel base under sequence parallelism: multiply, reduce-scatter the partials over tokens."""

    def __init__(self, shard):
        super().__init__()
        self.weight = nn.Parameter(shard, requires_grad=False)

    def forward(self, x):
        return reduce_scatter_first_dim(F.linear(x, self.weight), None)


def sequence_parallel_paths(rank: int, world: int, sizes) -> dict:
    """KaSAParallelLinear under sequence parallelism (tokens split on the first dimension: the column layer's input,
    the row layer's output) vs a one-process KaSALinear on all tokens."""
    out = {}
    s = 2 * world
    mine_tokens = slice(2 * rank, 2 * rank + 2)
    for dim in (0, 1):
        m, n = (sum(sizes), 6) if dim == 0 else (6, sum(sizes))
        g = torch.Generator().manual_seed(11 + dim)
        w = torch.randn(m, n, generator=g)
        x = torch.randn(s, 2, n, generator=g)
        upstream = torch.randn(s, 2, m, generator=g)
        ref = KaSALinear(nn.Linear(n, m, bias=False), n, m, r=2, alpha=4.0)
        ref.base_layer.weight.data.copy_(w)
        ref.reset_adapter(torch.Generator().manual_seed(7))
        b = torch.randn(m, 2, generator=g)
        ref.lora_B.weight.data.copy_(b)
        spec = ShardSpec(dim, (m, n), tuple(sizes), None, sequence_parallel=True)
        cut = spec.local_slice()
        base = SequenceColumnBase(w[cut]) if dim == 0 else SequenceRowBase(w[:, cut])
        tp = KaSAParallelLinear(base, spec, r=2, alpha=4.0)
        tp.reset_adapter(torch.Generator().manual_seed(7))
        tp.lora_B.weight.data.copy_(split_factor(b, spec, rank) if dim == 0 else b)
        x_ref = x.clone().requires_grad_()
        x_tp = (x[mine_tokens] if dim == 0 else x[..., cut]).clone().requires_grad_()
        y_ref, y_tp = ref(x_ref), tp(x_tp)
        y_ref.backward(upstream)
        y_tp.backward(upstream[..., cut] if dim == 0 else upstream[mine_tokens])
        kind = "sequence_column" if dim == 0 else "sequence_row"
        out[f"{kind}_fwd"] = err(y_tp, y_ref[..., cut] if dim == 0 else y_ref[mine_tokens])
        out[f"{kind}_grad_x"] = err(x_tp.grad, x_ref.grad[mine_tokens] if dim == 0 else x_ref.grad[..., cut])
        out[f"{kind}_grad_diag"] = err(tp.lora_diag.grad, ref.lora_diag.grad)
        sharded = "lora_B" if dim == 0 else "lora_A"
        for name in ("lora_A", "lora_B"):
            want = getattr(ref, name).weight.grad
            out[f"{kind}_grad_{name}"] = err(getattr(tp, name).weight.grad,
                                             split_factor(want, spec, rank) if name == sharded else want)
    return out


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = (3, 5)[:world]  # uneven shards
    result = mappings(rank, world, sizes) | layer_paths(rank, sizes) | sequence_parallel_paths(rank, world, sizes)
    Path(sys.argv[1]).joinpath(f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
