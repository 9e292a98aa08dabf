"""``kasa-plan-memory`` (``tools/plan_memory.py``): the per-GPU memory plan of a KaSA (16-bit base) or QKaSA
(4-bit base) run, from a HF config.json alone.

    python tools/plan_memory.py --model configs/models/llama-3-70b --gpus 64 --zero 3 --seq-len 4096 --gpu-gib 80
    python tools/plan_memory.py --model configs/models/llama-3-70b --gpus 16 --tp 8 --zero 1 --gpu-gib 80
    python tools/plan_memory.py --model configs/models/llama-3-70b --megatron --tp 8 --pp 2 --gpus 16 --gpu-gib 80
    python tools/plan_memory.py --model DIR --method qkasa --gpus 1 --no-deepspeed --optimizer paged_adamw8bit \\
        --seq-len 2048 --gpu-gib 24
    python tools/plan_memory.py --model configs/models/qwen2-72b --min-gpus --gpus-per-node 8 --gpu-gib 80

Prints weights, adapter parameters, gradients, optimizer states, activations and a fixed CUDA/NCCL slack per GPU
and whether the total fits --gpu-gib; --min-gpus searches the smallest multiple of --gpus-per-node that fits.
The model of bytes is in kasa_ds/training/memory_plan.py (estimates; see its docstring for what is and is not counted).
"""

from __future__ import annotations

import argparse
from pathlib import Path


from ..cli import bad_input_fails, fail, positive_float, positive_int, probability
from ..training.memory_plan import GiB, RunShape, describe_targets, format_plan, model_shape, plan


def parse_args(argv=None):
    d = RunShape()
    p = argparse.ArgumentParser(prog="kasa-plan-memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="directory with the model's config.json (weights not needed)")
    p.add_argument("--method", choices=["kasa", "qkasa"], default=d.method)
    p.add_argument("--r", type=positive_int, default=d.r)
    p.add_argument("--targets", default=",".join(d.targets), help="comma-separated module names")
    p.add_argument("--seq-len", type=positive_int, default=d.seq_len)
    p.add_argument("--micro-batch", type=positive_int, default=d.micro_batch)
    p.add_argument("--no-checkpointing", action="store_true", help="activation (gradient) checkpointing off")
    p.add_argument("--optimizer", choices=["adamw", "paged_adamw", "adamw8bit", "paged_adamw8bit"], default=d.optimizer)
    p.add_argument("--quant-mode", choices=["low_rank_correction", "requantize"], default=d.quant_mode,
                   help="QKaSA: low_rank_correction keeps two rank-r tail factors per layer on the GPU")
    p.add_argument("--adapter-bytes", type=int, choices=[2, 4], default=d.adapter_bytes,
                   help="adapter dtype without DeepSpeed: 4 (kasa_ds trains float32 adapters) or 2 (bf16)")
    p.add_argument("--no-deepspeed", action="store_true", help="one process per GPU without DeepSpeed")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=d.zero)
    p.add_argument("--offload", choices=["none", "optimizer", "all"], default=d.offload)
    p.add_argument("--tp", type=positive_int, default=d.tp)
    p.add_argument("--megatron", action="store_true",
                   help="the Megatron road (backend: megatron): megatron-core TP and pipeline stages, no DeepSpeed")
    p.add_argument("--pp", type=positive_int, default=d.pp, help="pipeline stages (with --megatron)")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="megatron's sequence parallelism (with --megatron and --tp > 1)")
    p.add_argument("--gpus", type=positive_int, default=d.gpus)
    p.add_argument("--gpu-gib", type=positive_float, default=80.0, help="memory of one GPU in GiB (H100 80 GB: 79.6)")
    p.add_argument("--dropout", type=probability, default=d.dropout)
    p.add_argument("--min-gpus", action="store_true", help="search the smallest GPU count that fits")
    p.add_argument("--gpus-per-node", type=positive_int, default=8)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    if not (Path(a.model) / "config.json").is_file():
        fail(f"--model {a.model}: no config.json there")
    targets = tuple(t for t in a.targets.split(",") if t)
    shape = model_shape(a.model, targets)
    if not shape.targets and not shape.expert_targets:
        fail(f"none of --targets {a.targets} names a decoder linear or experts projection of {a.model}")

    def run_for(gpus: int) -> RunShape:
        return RunShape(method=a.method, r=a.r, targets=targets, seq_len=a.seq_len, micro_batch=a.micro_batch,
                        checkpointing=not a.no_checkpointing, optimizer=a.optimizer,
                        deepspeed=not (a.no_deepspeed or a.megatron), zero=a.zero, offload=a.offload, tp=a.tp,
                        pp=a.pp, megatron=a.megatron, gpus=gpus, dropout=a.dropout, quant_mode=a.quant_mode,
                        adapter_bytes=a.adapter_bytes, sequence_parallel=a.sequence_parallel)

    gpus = a.gpus
    with bad_input_fails():
        if a.min_gpus:
            step = max(a.gpus_per_node, a.tp * a.pp)
            gpus = next((g for g in range(step, 4097, step) if plan(shape, run_for(g), a.gpu_gib)["fits"]), None)
            if gpus is None:
                fail("no GPU count up to 4096 fits; use offload, checkpointing or a shorter sequence")
        run = run_for(gpus)
        result = plan(shape, run, a.gpu_gib)
    if run.megatron:
        mode = "megatron-core" + (" with sequence parallelism" if run.sequence_parallel else "")
    else:
        mode = "no DeepSpeed" if not run.deepspeed else f"ZeRO-{run.zero}, offload {run.offload}"
    stages = f" × PP {a.pp}" if a.pp > 1 else ""
    print(f"{a.model}: {shape.total:,} parameters, {describe_targets(shape)} (r={a.r}), "
          f"{a.method}, {gpus} GPUs = TP {a.tp}{stages} × DP {result['data_parallel']}, {mode}, {a.optimizer}, "
          f"seq {a.seq_len} × micro batch {a.micro_batch}, checkpointing {'on' if run.checkpointing else 'off'}")
    print(format_plan(result))
    if a.min_gpus:
        print(f"smallest GPU count that fits ({a.gpus_per_node} per node): {gpus} "
              f"({gpus // a.gpus_per_node if gpus >= a.gpus_per_node else 1} node(s))")
    result["gpus"] = gpus
    result["total_gib"] = result["total_bytes"] / GiB
    return result
