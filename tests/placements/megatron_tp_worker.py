"""Worker for tests/placements/test_tensor_parallel.py: KaSA on real megatron-core TP layers vs one process with nn.Linear.

    torchrun --nproc_per_node N tests/placements/megatron_tp_worker.py --tp T --out DIR

A block with all four shard paths (T-way TP, N/T data-parallel replicas):
    up    ColumnParallelLinear 48→128            rows split, Gram path (unsplit 48 ≤ split 128)
    down  RowParallelLinear    128→48 (input split)   columns split, Gram path
    k     ColumnParallelLinear 48→16                   rows split, gather path (48² > 16·48)
    o     RowParallelLinear    16→48 (input split)     columns split, gather path
(megatron's gather_output/scatter mappings allocate on CUDA, so on CPU the block keeps activations split.)
Every rank builds the same full weights, copies its shards in, applies KaSA, and compares with the single-process
reference: truncated shards, logits, gradients, regularizer, and the losses of a few AdamW steps (gradients averaged
over data-parallel replicas, each replica its own half of the global batch). Writes <out>/rank<R>.json.
"""

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


from kasa_ds import KaSAConfig, apply_kasa, kasa_layers, kasa_regularization  # noqa: E402
from kasa_ds.io.adapter import PREFIX, load_adapter_state  # noqa: E402
from kasa_ds.io.adapter import gathered_adapter_state  # noqa: E402
from kasa_ds.core.types import Target
from kasa_ds.formats.dense import DENSE
from kasa_ds.placements.tp import TP, tp_layers  # noqa: E402
from kasa_ds.placements.tp.spec import split_factor  # noqa: E402

H, F, K = 48, 128, 16
CONFIG = dict(r=4, alpha=8, dropout=0.0, target_modules=["up", "down", "k", "o"], beta=1e-2, gamma=1e-2, init_seed=3)


class Block(nn.Module):
    def __init__(self, up, down, k, o, megatron: bool):
        super().__init__()
        self.up, self.down, self.k, self.o, self.megatron = up, down, k, o, megatron

    def forward(self, x):
        call = (lambda layer, v: layer(v)[0]) if self.megatron else (lambda layer, v: layer(v))
        h = torch.relu(call(self.up, x))
        return call(self.down, h) + call(self.o, torch.tanh(call(self.k, x)))


def full_weights():
    g = torch.Generator().manual_seed(11)
    return {"up": torch.randn(F, H, generator=g) / H ** 0.5, "down": torch.randn(H, F, generator=g) / F ** 0.5,
            "k": torch.randn(K, H, generator=g) / H ** 0.5, "o": torch.randn(H, K, generator=g) / K ** 0.5}


def reference_block(weights):
    layers = {}
    for name, w in weights.items():
        layers[name] = nn.Linear(w.shape[1], w.shape[0], bias=False)
        layers[name].weight.data.copy_(w)
    return Block(**layers, megatron=False)


def megatron_block(weights, tp):
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    cfg = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                              params_dtype=torch.float32, perform_initialization=False)
    kw = dict(config=cfg, init_method=nn.init.zeros_, bias=False)
    up = ColumnParallelLinear(H, F, gather_output=False, **kw)
    down = RowParallelLinear(F, H, input_is_parallel=True, skip_bias_add=False, **kw)
    k = ColumnParallelLinear(H, K, gather_output=False, **kw)
    o = RowParallelLinear(K, H, input_is_parallel=True, skip_bias_add=False, **kw)
    rank = dist.get_rank(up.tp_group)
    with torch.no_grad():
        for layer, name, dim in ((up, "up", 0), (down, "down", 1), (k, "k", 0), (o, "o", 1)):
            layer.weight.copy_(weights[name].chunk(tp, dim=dim)[rank])
    return Block(up, down, k, o, megatron=True)


def randomize(model, seed=5):
    """Same non-zero full adapter on both models (so ΔW ≠ 0), cut to this rank's shards on the TP model."""
    g = torch.Generator().manual_seed(seed)
    full = {}
    for name, layer in kasa_layers(model):
        for pname, p in layer.adapter_parameters():
            full[PREFIX + f"{name}.{pname}"] = torch.randn(_full_shape(layer, pname), generator=g) * 0.3
    return full


def _full_shape(layer, pname):
    spec = getattr(layer, "spec", None)
    p = layer.get_parameter(pname)
    if spec is None or spec.tp_size == 1:
        return tuple(p.shape)
    if pname == "lora_B.weight" and spec.dim == 0:
        return (spec.full_shape[0], layer.r)
    if pname == "lora_A.weight" and spec.dim == 1:
        return (layer.r, spec.full_shape[1])
    return tuple(p.shape)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    dist.init_process_group("gloo")
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=a.tp)
    world, rank = dist.get_world_size(), dist.get_rank()
    dp, dp_rank = world // a.tp, parallel_state.get_data_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    weights = full_weights()
    ref, tp = reference_block(weights), megatron_block(weights, a.tp)
    apply_kasa(ref, KaSAConfig(**CONFIG), show_progress=False)
    report = apply_kasa(tp, KaSAConfig(**CONFIG), show_progress=rank == 0)
    out = {"rank": rank, "tp_rank": tp_rank, "dp_rank": dp_rank, "types": {}}
    ref_layers = dict(kasa_layers(ref))

    # 1. truncated shards and adapter init = the one-process ones, split
    out["truncation"] = max(rel(layer.base_layer.weight.detach(),
                                split_factor(ref_layers[name].base_layer.weight.detach(), layer.spec, tp_rank))
                            for name, layer in tp_layers(tp))
    out["init"] = max(rel(t, split_factor(ref_layers[name].lora_A.weight, layer.spec, tp_rank)
                          if layer.spec.dim == 1 else ref_layers[name].lora_A.weight)
                      for name, layer in tp_layers(tp) for t in [layer.lora_A.weight.detach()])
    out["types"] = {name: type(layer.base_layer).__name__ for name, layer in tp_layers(tp)}
    # the placement brings a TP weight whole to an owner (TP rank 0), in the unsplit layout ([gate; up] included)
    whole = {name: TP.read_on_owner(Target(name, layer.base_layer, DENSE, TP, layer.spec.full_shape, layer.spec), 0)
             for name, layer in tp_layers(tp)}
    out["read_on_owner"] = max(rel(w, ref_layers[name].base_layer.weight.detach()) for name, w in whole.items()) \
        if tp_rank == 0 else None
    out["read_on_owner_elsewhere"] = [name for name, w in whole.items() if w is not None and tp_rank != 0]
    out["tail_energy"] = [lr.tail_energy for lr in report.layers]

    # 2. forward, regularizer, grads with a non-zero adapter
    full = randomize(ref)
    load_adapter_state(ref, full)
    load_adapter_state(tp, full)  # full tensors: cut to this rank's shards
    x = torch.randn(6, 2, H, generator=torch.Generator().manual_seed(2))
    for model in (ref, tp):
        model.train()
        loss = model(x).square().mean() + kasa_regularization(model)
        loss.backward()
    out["reg"] = rel(kasa_regularization(tp).detach(), kasa_regularization(ref).detach())
    out["logits"] = rel(tp(x).detach(), ref(x).detach())
    grads = []
    for name, layer in tp_layers(tp):
        for pname, param in layer.adapter_parameters():
            ref_grad = ref_layers[name].get_parameter(pname).grad
            if ref_grad.shape != param.grad.shape:
                ref_grad = split_factor(ref_grad, layer.spec, tp_rank)
            grads.append(rel(param.grad, ref_grad))
    out["grads"] = max(grads)

    # 3. a few AdamW steps: TP × DP vs one process on the global batch
    load_adapter_state(ref, full)
    load_adapter_state(tp, full)
    losses = {"ref": [], "tp": []}
    opts = {m: torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
            for m, model in (("ref", ref), ("tp", tp))}
    g = torch.Generator().manual_seed(9)
    for step in range(4):
        batch = torch.randn(6, 2 * dp, H, generator=g)
        target = torch.randn(6, 2 * dp, H, generator=g)
        for m, model in (("ref", ref), ("tp", tp)):
            xb, yb = (batch, target) if m == "ref" else (batch[:, 2 * dp_rank:2 * dp_rank + 2],
                                                         target[:, 2 * dp_rank:2 * dp_rank + 2])
            loss = (model(xb) - yb).square().mean() + kasa_regularization(model)
            opts[m].zero_grad()
            loss.backward()
            if m == "tp" and dp > 1:
                for q in model.parameters():
                    if q.grad is not None:
                        dist.all_reduce(q.grad, group=parallel_state.get_data_parallel_group())
                        q.grad /= dp
                value = loss.detach().clone()
                dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
                loss = value / dp
            opts[m].step()
            losses[m].append(loss.item())
    out["losses"] = losses

    # 4. the gathered adapter is the one-process adapter
    gathered = gathered_adapter_state(tp)
    reference_state = {PREFIX + f"{n}.{pn}": t.detach()
                       for n, m in kasa_layers(ref) for pn, t in m.adapter_parameters()}
    out["gathered"] = max(rel(gathered[k], reference_state[k]) for k in reference_state)
    out["gathered_shapes_ok"] = all(gathered[k].shape == reference_state[k].shape for k in reference_state)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"rank{rank}.json").write_text(json.dumps(out, indent=1))
    if rank == 0:
        torch.save(gathered, Path(a.out) / "adapter.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
