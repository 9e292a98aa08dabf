"""Per-step time and peak memory of KaSA (kasa_ds) vs PEFT LoRA vs PEFT KaSA on the same model, batch and length.

Timing: the three run interleaved in one process (one step of each in turn, rotating the order), after warm-up;
medians and ratios to PEFT LoRA are printed: the ratio of the medians, and the median of each round's own ratio
("paired": a round's steps run back to back, so a load change on the machine between rounds cancels). A step =
forward, task loss (+ the KaSA regularizer for the KaSA methods, as each library exposes it), backward, AdamW step,
zero_grad.
Memory: on CUDA, torch.cuda.max_memory_allocated per method. On CPU (no allocator statistics), what the methods can
differ in, counted exactly: the bytes autograd saves for backward in one step (unique storages, via
saved_tensors_hooks; parameters themselves excluded) plus trainable state (parameter, gradient, two AdamW moments).

    python tools/bench_step.py                  # Llama hidden 512, 4 layers, batch 4 × 128 tokens, r = 16
    python tools/bench_step.py --base nf4       # QKaSA vs PEFT QLoRA on the same bitsandbytes NF4 base
    python tools/bench_step.py --smoke          # 3 steps on a tiny model (what the tests run)
    python tools/bench_step.py --profile        # where the time differs: torch.profiler, per operator, vs LoRA

``--base nf4`` quantizes every adapted linear to bitsandbytes NF4 (double quantization, compute in ``--dtype``)
before either method adapts it; PEFT's KaSA does not take a 4-bit base, so that run compares kasa_ds with PEFT LoRA.
``--base moe`` builds a Qwen3-MoE of the same hidden size instead (``--experts`` experts of ``--ff`` // 4 each,
top 2, every layer sparse) and adapts only the routed experts' gate, up and down projections: kasa_ds's per-expert
KaSA against PEFT LoRA on the same fused parameters (``target_parameters``: lora.ParamWrapper, which forms each
step's dense ΔW); PEFT's KaSA does not take parameters.
``--dtype bfloat16`` holds the model in bf16 (adapters stay float32 in kasa_ds, as PEFT's do under autocast_adapter_dtype).
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import statistics
import time
from pathlib import Path


import torch

from kasa_ds import KaSAConfig, apply_kasa, kasa_regularization
from kasa_ds.formats.bnb4 import quantize_linears_

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("peft_lora", "peft_kasa", "kasa_ds")


def build(method: str, a, device):
    if a.base == "moe":
        return build_moe(method, a, device)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ff, num_hidden_layers=a.layers,
                         num_attention_heads=a.heads, num_key_value_heads=a.kv_heads or a.heads,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(device=device, dtype=getattr(torch, a.dtype))
    if a.base == "nf4":
        quantize_linears_(model, "nf4", double_quant=True, compute_dtype=getattr(torch, a.dtype),
                          keep=lambda name: name.rsplit(".", 1)[-1] not in TARGETS)
        model.to(device)  # bitsandbytes quantizes on the device the weight is moved to
        model.is_loaded_in_4bit = True  # as from_pretrained(quantization_config=...) marks it: PEFT's QLoRA layer
    if method == "kasa_ds":
        apply_kasa(model, KaSAConfig(r=a.r, alpha=2 * a.r, target_modules=TARGETS, quant_mode=a.quant_mode),
                   show_progress=False)
        return model, lambda m: kasa_regularization(m)
    from peft import KasaConfig, LoraConfig, get_peft_model

    kasa = KasaConfig() if method == "peft_kasa" else None
    r = a.r if kasa else a.lora_r or a.r
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, kasa_config=kasa))
    return model, (lambda m: m.base_model._get_kasa_loss()) if kasa else None


def build_moe(method: str, a, device):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ff,
                            moe_intermediate_size=a.ff // 4, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                            num_key_value_heads=a.kv_heads or a.heads, head_dim=a.hidden // a.heads,
                            num_experts=a.experts, num_experts_per_tok=2, decoder_sparse_step=1,
                            tie_word_embeddings=False)
    model = Qwen3MoeForCausalLM(config).to(device=device, dtype=getattr(torch, a.dtype))
    if method == "kasa_ds":
        apply_kasa(model, KaSAConfig(r=a.r, alpha=2 * a.r, target_modules=["gate_proj", "up_proj", "down_proj"]),
                   show_progress=False)
        return model, lambda m: kasa_regularization(m)
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=2 * a.r, target_modules=[],
                                             target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    return model, None


def make_step(model, reg, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = model(**batch).loss
        if reg is not None:
            loss = loss + reg(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def batch_for(a, device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids}


def saved_and_state_bytes(model, reg, batch) -> int:
    """Bytes autograd saves for backward in one forward (+ regularizer), unique storages, parameters excluded, plus
    4 × trainable bytes (parameter, gradient, AdamW exp_avg and exp_avg_sq)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
        if reg is not None:
            loss = loss + reg(model)
    loss.backward()
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return sum(seen.values()) + 4 * trainable


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("hidden", 512), ("ff", 1376), ("layers", 4), ("heads", 8), ("vocab", 2000), ("r", 16),
                          ("batch", 4), ("seq", 128), ("steps", 20), ("warmup", 3), ("memory-steps", 3)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--kv-heads", type=int, default=0, help="key/value heads (grouped-query attention); 0: --heads")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--base", default="float", choices=["float", "nf4", "moe"],
                   help="nf4: a bitsandbytes 4-bit base; moe: a Qwen3-MoE, routed experts adapted")
    p.add_argument("--experts", type=int, default=8, help="experts per layer with --base moe")
    p.add_argument("--quant-mode", default="low_rank_correction", choices=["low_rank_correction", "requantize"],
                   help="QKaSA's mode with --base nf4 (kasa_ds.KaSAConfig.quant_mode)")
    p.add_argument("--lora-r", type=int, default=0,
                   help="PEFT LoRA's rank (0: --r). With --base nf4 and the default quant mode, 2·r is QKaSA's own "
                        "arithmetic: its tail correction is a second rank-r product")
    p.add_argument("--smoke", action="store_true", help="tiny model, 3 steps")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing: --steps steps of each method under torch.profiler; prints each method's "
                        "total operator time per step and the operators that differ most from PEFT LoRA's")
    p.add_argument("--json")
    a = p.parse_args(argv)
    if a.smoke:
        a.hidden, a.ff, a.layers, a.heads, a.vocab, a.r, a.batch, a.seq, a.steps, a.warmup, a.memory_steps = \
            64, 176, 1, 4, 128, 4, 2, 16, 3, 1, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    methods = METHODS if a.base == "float" else ("peft_lora", "kasa_ds")  # PEFT's KaSA takes no 4-bit base, no experts
    if a.profile:
        return profile_operators(methods, a, device)
    times = step_seconds(methods, a, device)
    median = {m: statistics.median(v) for m, v in times.items()}
    paired = {m: statistics.median(t / ref for t, ref in zip(times[m], times["peft_lora"])) for m in methods}
    memory = peak_memory(methods, a, device)
    result = {"config": vars(a) | {"device": str(device), "threads": torch.get_num_threads(),
                                   "torch": torch.__version__},
              "median_step_seconds": median, "peak_memory_bytes": memory,
              "time_ratio_vs_peft_lora": {m: median[m] / median["peft_lora"] for m in methods},
              "paired_time_ratio_vs_peft_lora": paired,
              "memory_ratio_vs_peft_lora": {m: memory[m] / max(memory["peft_lora"], 1) for m in methods}}
    kind = "peak allocated" if device.type == "cuda" else "saved-for-backward + state"
    what = f"Qwen3-MoE {a.experts} experts (top 2), experts adapted" if a.base == "moe" else "Llama, 7 targets"
    lora_r = f" (PEFT LoRA r={a.lora_r})" if a.lora_r else ""
    print(f"{what}, hidden={a.hidden} layers={a.layers}, batch {a.batch}×{a.seq}, r={a.r}{lora_r}, {a.dtype}, "
          f"{a.base} base, {device}, median of {a.steps} interleaved steps")
    print(f"{'method':10s} {'step ms':>9s} {'vs LoRA':>8s} {'paired':>7s} {kind + ' MB':>26s} {'vs LoRA':>8s}")
    for m in methods:
        print(f"{m:10s} {median[m] * 1e3:9.1f} {result['time_ratio_vs_peft_lora'][m]:7.3f}x {paired[m]:6.3f}x "
              f"{memory[m] / 2**20:26.1f} {result['memory_ratio_vs_peft_lora'][m]:7.3f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


def step_seconds(methods: tuple[str, ...], a, device) -> dict[str, list[float]]:
    """Each method's step times after warm-up, round by round (:func:`interleaved`)."""
    times: dict[str, list[float]] = {m: [] for m in methods}
    for method, step in interleaved(methods, a, device):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[method].append(time.perf_counter() - tic)
    return times


def interleaved(methods: tuple[str, ...], a, device):
    """All methods built at once and warmed up, then (method, step) for ``a.steps`` rounds of one step each, the
    order rotating each round."""
    runs = {}
    for method in methods:
        model, reg = build(method, a, device)
        runs[method] = make_step(model, reg, batch_for(a, device))
    for _ in range(a.warmup):
        for method in methods:
            runs[method]()
    for i in range(a.steps):
        shift = i % len(methods)
        for method in methods[shift:] + methods[:shift]:
            yield method, runs[method]


def profile_operators(methods: tuple[str, ...], a, device, rows: int = 12) -> dict:
    """Self time per operator and step (CPU, plus CUDA kernels on a GPU) of each method, under one torch.profiler
    session, the methods interleaved as in the timing (each step inside a ``bench_step:<method>`` range, the order
    rotating); prints the totals and the operators whose time differs most from PEFT LoRA's."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    steps = interleaved(methods, a, device)
    first = next(steps)  # built and warmed up before the profiler starts
    with profile(activities=activities) as prof:
        for method, step in itertools.chain([first], steps):
            with record_function(f"bench_step:{method}"):
                step()
    # an event belongs to the step whose range it starts in (backward may run on another thread, kernels on the GPU;
    # each step ends by reading its loss, so its work lies inside its range)
    events = prof.events()
    ranges = sorted((e.time_range.start, e.time_range.end, e.name.split(":", 1)[1]) for e in events
                   if e.name.startswith("bench_step:"))
    starts = [start for start, _, _ in ranges]
    per_op: dict[str, dict[str, list[float]]] = {m: {} for m in methods}  # operator → [calls, ms] per step
    for event in events:
        at = bisect.bisect_right(starts, event.time_range.start) - 1
        if event.name.startswith("bench_step:") or at < 0 or event.time_range.start > ranges[at][1]:
            continue
        acc = per_op[ranges[at][2]].setdefault(event.name, [0.0, 0.0])
        acc[0] += 1 / a.steps
        acc[1] += (event.self_cpu_time_total + getattr(event, "self_device_time_total", 0)) / a.steps / 1e3
    total = {m: sum(ms for _, ms in ops.values()) for m, ops in per_op.items()}
    print(f"operator self time per step (ms, {device.type}), {a.steps} interleaved steps each: "
          + ", ".join(f"{m} {total[m]:.1f} ({total[m] / total['peft_lora']:.3f}x)" for m in methods))
    for method in methods[1:]:
        ref, ops = per_op["peft_lora"], per_op[method]
        diff = sorted(((ops.get(k, (0, 0))[1] - ref.get(k, (0, 0))[1], k) for k in set(ref) | set(ops)), reverse=True)
        print(f"{method} vs peft_lora, largest differences (calls per step, ms per step):")
        for d, k in diff[:rows] + [(None, "...")] + diff[-3:]:
            if d is None:
                print("  ...")
                continue
            (c0, t0), (c1, t1) = ref.get(k, (0, 0)), ops.get(k, (0, 0))
            print(f"  {k[:48]:48s} {c0:6.1f} → {c1:6.1f} calls  {t0:8.2f} → {t1:8.2f} ms  {d:+.2f}")
    result = {"profile_ms_per_step": total,
              "profile_ratio_vs_peft_lora": {m: total[m] / total["peft_lora"] for m in methods}}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


def peak_memory(methods: tuple[str, ...], a, device) -> dict[str, int]:
    """Per method, alone: max_memory_allocated over a few steps on CUDA; on CPU saved_and_state_bytes."""
    memory = {}
    for method in methods:
        model, reg = build(method, a, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            step = make_step(model, reg, batch_for(a, device))
            torch.cuda.reset_peak_memory_stats()
            for _ in range(a.memory_steps):
                step()
            memory[method] = torch.cuda.max_memory_allocated()
        else:
            memory[method] = saved_and_state_bytes(model, reg, batch_for(a, device))
        del model
    return memory


if __name__ == "__main__":
    main()
