#!/usr/bin/env python
"""Check tools/plan_memory.py against memory measured on this machine's CPU.

    python tools/validate_memory_plan.py            # the cases below; exit 1 if one is off by more than --tolerance
                                                    # (the last three were held out while the planner was written)
    python tools/validate_memory_plan.py --smoke    # one small case
    python tools/validate_memory_plan.py --only-moe # the mixture-of-experts cases

For each case a Llama-architecture model (random init from a config: memory does not depend on the values) gets
KaSA on every decoder linear (the MoE cases: a Qwen3-MoE model, KaSA on its attention and on every expert); one
full training step (forward, backward, AdamW step) runs under torch.profiler's memory timeline, whose peak (every
live CPU tensor: weights, adapters, gradients, optimizer states, activations, temporaries) is compared with the
planner's total for the same run in float32 (compute_bytes=4), less the fixed CUDA-context slack the planner adds
for GPUs. Ratio = planned / measured.
"""

from __future__ import annotations

import argparse
import sys


CASES = [  # hidden, ffn, layers, heads, kv heads, vocab, seq, micro batch, checkpointing
    (256, 688, 4, 8, 4, 2048, 256, 4, False),
    (256, 688, 4, 8, 4, 2048, 256, 4, True),
    (512, 1376, 4, 8, 2, 4096, 512, 2, False),
    (512, 1376, 4, 8, 2, 4096, 512, 2, True),
    (384, 1024, 6, 6, 6, 8192, 128, 8, False),
]
HELD_OUT = [  # shapes not looked at while the planner's byte counts were written
    (640, 1728, 3, 10, 2, 1024, 384, 3, False),
    (640, 1728, 3, 10, 2, 1024, 384, 3, True),
    (320, 864, 8, 5, 5, 16384, 64, 16, True),
]
QKASA = [  # 4-bit NF4 base (double quantization), low_rank_correction
    (512, 1376, 4, 8, 2, 4096, 512, 2, True),
    (640, 1728, 3, 10, 2, 1024, 384, 3, False),
]
MOE = [  # Qwen3-MoE architecture, 8 experts, top-2; ffn is each expert's intermediate size
    (256, 128, 4, 8, 4, 2048, 256, 4, False),
    (256, 128, 4, 8, 4, 2048, 256, 4, True),
]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def measure(case, r: int, dropout: float, quantized: bool = False, moe: bool = False) -> tuple[float, dict]:
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from kasa_ds import KaSAConfig, apply_kasa, kasa_regularization
    from kasa_ds.training.memory_plan import RunShape, plan, shape_of

    hidden, ffn, layers, heads, kv, vocab, seq, batch, ckpt = case
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, max_position_embeddings=seq, tie_word_embeddings=False)
    if moe:
        cfg = Qwen3MoeConfig(intermediate_size=4 * ffn, moe_intermediate_size=ffn, num_experts=8, num_experts_per_tok=2,
                             decoder_sparse_step=1, head_dim=hidden // heads, norm_topk_prob=True, **common)
        model_class = Qwen3MoeForCausalLM
    else:
        cfg, model_class = LlamaConfig(intermediate_size=ffn, **common), LlamaForCausalLM
    model = model_class(cfg)
    with torch.no_grad():  # expert parameters may be left uninitialized (torch.empty) outside from_pretrained
        for name, p in model.named_parameters():
            if "experts" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    if quantized:
        from kasa_ds.formats.bnb4 import quantize_linears_

        quantize_linears_(model, "nf4", True, torch.float32)
    apply_kasa(model, KaSAConfig(r=r, alpha=2 * r, dropout=dropout, target_modules=list(TARGETS)),
               show_progress=False)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq))

    def step():
        loss = model(input_ids=ids, labels=ids).loss + kasa_regularization(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # optimizer states exist from here on, as in every later step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    measured = float(np.array(sizes).sum(axis=1).max())

    with torch.device("meta"):
        meta = model_class(cfg)
    run = RunShape(method="qkasa" if quantized else "kasa", r=r, targets=TARGETS, seq_len=seq, micro_batch=batch,
                   checkpointing=ckpt, deepspeed=False,
                   zero=0, gpus=1, dropout=dropout, compute_bytes=4)
    planned = plan(shape_of(meta, cfg, TARGETS), run)
    return measured, planned


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--tolerance", type=float, default=0.15)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--only-moe", action="store_true", help="the mixture-of-experts cases alone")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    print(f"{'method':>9} {'hidden':>6} {'layers':>6} {'vocab':>6} {'seq×b':>8} {'ckpt':>5} {'measured MiB':>13} "
          f"{'planned MiB':>12} {'ratio':>6}")
    cases = ([(c, False, False) for c in CASES + HELD_OUT] + [(c, True, False) for c in QKASA]
             + [(c, False, True) for c in MOE])
    if a.only_moe:
        cases = [c for c in cases if c[2]]
    for case, quantized, moe in cases[:1] if a.smoke else cases:
        measured, planned = measure(case, a.r, a.dropout, quantized, moe)
        total = planned["total_bytes"] - planned["per_gpu_bytes"]["cuda_context_and_slack"]
        ratio = total / measured
        hidden, _, layers, _, _, vocab, seq, batch, ckpt = case
        method = "qkasa" if quantized else "kasa-moe" if moe else "kasa"
        print(f"{method:>9} {hidden:>6} {layers:>6} {vocab:>6} {f'{seq}×{batch}':>8} "
              f"{'on' if ckpt else 'off':>5} "
              f"{measured / 2**20:>13.1f} {total / 2**20:>12.1f} {ratio:>6.3f}", flush=True)
        rows.append({"case": case, "quantized": quantized, "moe": moe, "measured": measured, "planned": total,
                     "ratio": ratio})
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"largest deviation {100 * worst:.1f}% (tolerance {100 * a.tolerance:.0f}%)")
    if worst > a.tolerance:
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
