"""Dry run of a recipe config at cluster scale, on a laptop: the model is built on the meta device from its
config.json (no weights), the KaSA plan applied to it, and what a run would do is printed:

    python tools/dry_run.py --config configs/llama3_70b_kasa.yaml --world-size 64

adapted layers and experts, parameter counts, the distributed-truncation schedule
(kasa_ds.comm.schedule.assign_owners: owner per matrix or range of experts, rounds, per-rank SVD cost), and the
per-GPU bytes that follow exactly from ZeRO-3 partitioning: frozen base weights, adapter parameters, gradients and
fp32 AdamW states. Activation memory depends on sequence length, batch and
checkpointing and is left to the memory planner.

A ``backend: megatron`` config is checked as the Megatron road will check it at load (every setting it would
compute differently, TP against the heads and key/value groups, stages against the layers), its world split into
TP × PP × DP, its truncation scheduled within one stage's ranks, and its memory planned per GPU (TP- and
stage-split).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from kasa_ds.cli import bad_input_fails
from kasa_ds.comm.schedule import assign_owners
from kasa_ds.inject import find_expert_targets, find_targets
from kasa_ds.io.megatron_checkpoint import family_of
from kasa_ds.placements.scheduled import expert_range_jobs, work_items
from kasa_ds.training.config import load_train_config
from kasa_ds.training.megatron_model import check_supported
from kasa_ds.training.memory_plan import format_plan, offload_of, plan, recipe_run, shape_of
from kasa_ds.training.models import model_dir

GiB = 1 << 30
CHECKOUT = Path(__file__).resolve().parents[1]  # relative paths in the shipped configs are taken from here too


def meta_model(cfg):
    """The recipe's model built on the meta device from its config.json alone (no weights read)."""
    hf_config = AutoConfig.from_pretrained(model_dir(cfg.model))
    dtype = getattr(torch, cfg.model.dtype)
    with torch.device("meta"):
        if cfg.model.task == "seq_cls":
            hf_config.num_labels = cfg.model.num_labels
            return AutoModelForSequenceClassification.from_config(hf_config, dtype=dtype), hf_config
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype), hf_config


def truncation_schedule(targets, experts, world: int, max_gather_mb: int) -> dict:
    """The owner schedule of the distributed truncation: rounds, matrices per rank, the largest per-rank load. An
    experts module's parameters are cut into ranges of experts (kasa_ds.placements.scheduled.expert_range_jobs)."""
    items = work_items(targets) + [job.item for job in expert_range_jobs(experts, world, max_gather_mb << 20)]
    assignments = assign_owners(items, world, max_gather_mb << 20)
    cost, count = [0.0] * world, [0] * world
    for a in assignments:
        cost[a.owner] += items[a.index].cost
        count[a.owner] += items[a.index].count
    return {"svd_rounds": 1 + max(a.round for a in assignments), "svd_matrices_per_rank": (min(count), max(count)),
            "svd_load_imbalance": max(cost) / (sum(cost) / world)}


def dry_run(config_path: str, world: int, overrides: list[str] = (), gpu_gib: float = 80.0) -> dict:
    tic = time.perf_counter()
    cfg = load_train_config(config_path, list(overrides), base_dirs=[str(CHECKOUT)])
    model, hf_config = meta_model(cfg)
    kasa = cfg.kasa_config()
    targets, experts = find_targets(model, kasa), find_expert_targets(model, kasa)
    megatron = cfg.backend == "megatron"
    tp, pp = cfg.tensor_parallel, cfg.pipeline_parallel
    if megatron:  # what loading would refuse, refused now
        check_supported(hf_config, family_of(hf_config), tp, pp)
        if world % (tp * pp):
            raise ValueError(f"--world-size {world}: a multiple of tensor_parallel × pipeline_parallel = {tp * pp}")
    total = sum(p.numel() for p in model.parameters())
    expert_shapes = [(t.layout.shape(p), t.layout.num_experts) for t in experts for p in t.projections]
    adapter = sum(kasa.r * (t.shape[0] + t.shape[1]) + kasa.r for t in targets)
    adapter += sum(count * (kasa.r * (m + n) + kasa.r) for (m, n), count in expert_shapes)
    saved = sum(p.numel() for n, p in model.named_parameters() if kasa.in_module_to_save(n, include_self=False))
    trainable = adapter + saved
    out = {"model": type(model).__name__, "total_params": total, "adapted_layers": len(targets),
           "adapted_experts_modules": len(experts), "adapted_expert_matrices": sum(c for _, c in expert_shapes),
           "adapter_params": adapter, "modules_to_save_params": saved, "world_size": world,
           # the Megatron road truncates within each stage over its TP × DP ranks (the first stage's layers here),
           # each weight's Gram reduced over its TP group to its owner: nothing is gathered, so no cap and one round
           **(truncation_schedule(targets[: len(targets) // pp], [], world // pp, 1 << 42) if megatron
              else truncation_schedule(targets, experts, world, cfg.kasa.max_gather_mb)),
           "per_gpu_bytes": {"base_weights": total * torch.finfo(getattr(torch, cfg.model.dtype)).bits // 8 / world,
                             "adapters_fp32": trainable * 4 / world, "gradients_fp32": trainable * 4 / world,
                             "adamw_states_fp32": trainable * 8 / world}}
    print(f"{out['model']} from {model_dir(cfg.model)}/config.json: {total:,} parameters ({total / 1e9:.2f} B)")
    if experts:
        print(f"experts: {len(experts)} experts modules of {experts[0].layout.num_experts} experts, "
              f"{', '.join(experts[0].projections)} adapted: {out['adapted_expert_matrices']:,} expert matrices, "
              "each truncated by its own tail")
    print(f"KaSA r={kasa.r}: {len(targets)} adapted layers, {adapter:,} adapter parameters "
          f"({100 * adapter / total:.3f}%), {saved:,} in modules_to_save")
    spread = (f"{out['svd_matrices_per_rank'][0]}–{out['svd_matrices_per_rank'][1]} matrices per rank; largest "
              f"per-rank SVD cost {out['svd_load_imbalance']:.3f}× the mean")
    if megatron:
        out["megatron"] = {"tp": tp, "pp": pp, "dp": world // (tp * pp)}
        del out["per_gpu_bytes"]  # ZeRO-3's: the planner's TP- and stage-split plan replaces it
        print(f"megatron-core: {world} ranks = TP {tp} × PP {pp} × DP {world // (tp * pp)}; each rank reads its "
              f"stage's {hf_config.num_hidden_layers // pp} layers' TP slices only")
        print(f"distributed truncation within each stage's {world // pp} ranks: each weight's Gram reduced over its "
              f"TP group to one owner, solved there, its basis broadcast; {spread}")
    else:
        print(f"distributed truncation on {world} ranks: {out['svd_rounds']} round(s) of at most "
              f"{cfg.kasa.max_gather_mb} MB gathered per rank; {spread}")
    if cfg.model.task != "causal_lm":
        print(f"per GPU under ZeRO-3 ({cfg.model.dtype} base): " + ", ".join(
            f"{k} {v / GiB:.2f} GiB" for k, v in out["per_gpu_bytes"].items()) + " (+ activations)")
    else:  # the memory planner models decoder LMs
        out["memory_plan"] = print_memory_plan(cfg, model, hf_config, targets, experts, world, gpu_gib)
    out["seconds"] = time.perf_counter() - tic
    print(f"dry run took {out['seconds']:.1f}s")
    return out


def print_memory_plan(cfg, model, hf_config, targets, experts, world: int, gpu_gib: float) -> dict:
    names = {t.name.rsplit(".", 1)[-1] for t in targets} | {p for t in experts for p in t.projections}
    base = (f"{cfg.model.quantize.upper()} 4-bit base" if cfg.model.quantize
            else f"{ {'bfloat16': 'bf16', 'float16': 'fp16'}.get(cfg.model.dtype, cfg.model.dtype)} base")
    if cfg.backend == "megatron":
        run = recipe_run(cfg, names, deepspeed=False, megatron=True, tp=cfg.tensor_parallel,
                         pp=cfg.pipeline_parallel, gpus=world, sequence_parallel=cfg.sequence_parallel)
        placement = f"megatron-core TP {run.tp} × PP {run.pp}{' with SP' if run.sequence_parallel else ''}, {base}"
    else:
        ds = json.loads(Path(cfg.ds_config).read_text()) if cfg.ds_config else None
        run = recipe_run(cfg, names, deepspeed=True, zero=3, gpus=world, offload=offload_of(ds))
        placement = f"ZeRO-3, {base}, offload {run.offload}"
    result = plan(shape_of(model, hf_config, names), run, gpu_gib)
    print(f"memory plan per GPU (tools/plan_memory.py; {placement}, seq {run.seq_len} "
          f"× micro batch {run.micro_batch}, checkpointing {'on' if run.checkpointing else 'off'}):")
    print(format_plan(result))
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU in GiB, for the fits verdict")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    a = p.parse_args()
    with bad_input_fails():
        dry_run(a.config, a.world_size, a.overrides, a.gpu_gib)
