#!/usr/bin/env python
"""What CPU runs cannot check, in one command for anyone with a CUDA GPU:

    python tools/gpu_check.py --out docs/results/gpu_check.json     # on a CUDA machine
    python tools/gpu_check.py --smoke                               # the same checks, tiny shapes, CPU (tests)

Checks (each prints one line, PASS / FAIL / NOT AVAILABLE, and lands in the JSON with the device's name):
    qkasa_4bit     bitsandbytes' CUDA 4-bit kernels: a Llama quantized to NF4 (bf16 compute) is adapted by KaSA;
                   the effective base is the dequantized weight minus exactly its r-smallest tail (float64 check),
                   20 training steps move only adapter parameters and lower the loss
    bf16_autocast  the recipe's bf16 autocast path: 10 steps of KaSA on a 16-bit Llama under torch.autocast(bf16),
                   finite loss that decreases, adapters kept in float32
    init_70b       the truncation of Llama-3-70B-shaped matrices (8192×8192, 1024×8192, 28672×8192, 8192×28672,
                   r = 16): each kasa_ds solver (tail_factors: auto, gram, gram_fp64) against PEFT's float32
                   torch.linalg.svd (gesvdj on CUDA), seconds and the error of the truncated weight against float64;
                   and the init of all 560 matrices of the model projected from those timings on 1 and on 8 GPUs
                   (kasa_ds's owner schedule, kasa_ds.comm.schedule; the gather and broadcast traffic not counted)
    step_8b        tools/bench_step.py at an 8B-shaped layer stack (hidden 4096, ffn 14336, 32 heads, 8 kv heads,
                   2 layers, bf16, batch 2 × 1024): step time and max_memory_allocated, kasa_ds vs PEFT LoRA
    step_qkasa     tools/bench_step.py --base nf4 on bitsandbytes' CUDA kernels: QKaSA vs PEFT QLoRA, same base
    recipe_zero3   the recipe through the deepspeed launcher with ZeRO-3 on one GPU (NCCL), a tiny random Llama
                   (tools/make_tiny_llama.py) on the bundled chat data: it finishes and writes the adapter
    trainer        the transformers Trainer drop-in (KaSATrainer) on CUDA: the loss falls, the base stays frozen
    megatron       the Megatron road at TP=1 on the GPU with megatron-core's own attention (DotProductAttention) and
                   RoPE, bf16: an HF Llama checkpoint loaded into a GPTModel gives the HF model's logits (bf16
                   rounding: ≤ 3e-2 of the largest logit), and KaSA on its projections trains with its layers
                   recomputed in backward (gradient checkpointing; 10 steps, the loss falls)
    megatron_parallel  the Megatron road on 2 GPUs (NCCL), float32, a tiny random Llama on the bundled data,
                   against the same recipe at TP=1 on one GPU: two pipeline stages through megatron-core's own 1F1B
                   schedule (2 micro-batches per step), and TP=2 with sequence parallelism; each run's losses equal
                   the TP=1 run's (≤ 1e-3 relative: the layouts sum in other orders). NOT AVAILABLE with one GPU;
                   under --smoke the two stages run on 2 CPU ranks (gloo, kasa_ds's 1F1B; sequence parallelism is
                   CUDA-only)
    llm_compare    the full-model version of the pre-registered comparison (docs/PROTOCOL_LLM_SIQA.md): every decoder
                   layer of gemma-3-270m adapted (tools/compare_llm.py --adapt-top all, results in
                   <out dir>/llm_siqa_full); NOT AVAILABLE (never a pass) under --smoke or before
                   `python3 tools/prepare_model.py gemma-3-270m` (tests/tools/test_compare_llm.py covers the tool on the CPU)
Exit code 0 when every available check passed, 1 otherwise, 2 without a CUDA GPU (unless --smoke). A check whose
package is not installed (DeepSpeed, bitsandbytes, TRL: on a bare lent machine they travel as wheels,
tools/gpu_wheels.py) is NOT AVAILABLE with the reason, never a pass.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path


import torch

from kasa_ds import KaSAConfig, apply_kasa, kasa_layers, kasa_regularization
from kasa_ds.comm.schedule import WorkItem, assign_owners
from kasa_ds.core.truncation import reference_world, tail_factors
from kasa_ds.formats.bnb4 import dequantize, quantize_linears_
from kasa_ds.integrations.transformers import KaSATrainer

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Llama-3-70B: 80 layers of q, o (8192×8192), k, v (1024×8192), gate, up (28672×8192), down (8192×28672).
LAYER_70B = {(8192, 8192): 2, (1024, 8192): 2, (28672, 8192): 2, (8192, 28672): 1}
LAYERS_70B = 80
SOLVERS = ("auto", "gram", "gram_fp64")


def llama(hidden: int, layers: int, device, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 8 * 8,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def train(model, device, steps: int, autocast: bool = False) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    tokens = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1)).to(device)
    losses = []
    for _ in range(steps):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=tokens, labels=tokens).loss + kasa_regularization(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def check_qkasa_4bit(a, device) -> dict:
    if missing := _missing("bitsandbytes"):
        return missing

    model = llama(a.hidden, 2, device)
    quantize_linears_(model, "nf4", double_quant=True, compute_dtype=torch.bfloat16)
    before = {n: dequantize(m).double() for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS}
    apply_kasa(model, KaSAConfig(r=8, alpha=16, target_modules=TARGETS), show_progress=False)
    error = 0.0
    for name, layer in kasa_layers(model):
        want = reference_world(before[name], 8)
        got = dequantize(layer.base_layer).double() - layer.tail_left.double() @ layer.tail_right.double()
        error = max(error, (torch.linalg.norm(got - want) / torch.linalg.norm(want)).item())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train(model, device, a.steps)
    untouched = all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    ok = error < 1e-4 and untouched and losses[-1] < losses[0]
    return {"pass": ok, "effective_base_rel_error": error, "frozen_untouched": untouched, "loss_first": losses[0],
            "loss_last": losses[-1]}


def check_bf16_autocast(a, device) -> dict:
    model = llama(a.hidden, 2, device)
    apply_kasa(model, KaSAConfig(r=8, alpha=16, target_modules=TARGETS), show_progress=False)
    losses = train(model, device, a.steps, autocast=True)
    fp32 = all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    ok = all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0] and fp32
    return {"pass": bool(ok), "loss_first": losses[0], "loss_last": losses[-1], "adapters_float32": fp32}


def check_init_70b(a, device) -> dict:
    rows = {}
    for m, n in LAYER_70B:
        weight = torch.randn(m // a.shrink, n // a.shrink, device=device) * 0.02
        reference = reference_world(weight.double(), 16)
        row = {}
        for label, solve in [(s, partial(tail_factors, r=16, solver=s)) for s in SOLVERS] + [
                ("peft_svd", lambda w: torch.linalg.svd(w, full_matrices=False))]:
            solve(weight[:256, :256])  # warm-up (kernels, workspaces) on a small block
            seconds, out = _timed(device, solve, weight)
            row[label] = {"seconds": seconds}
            if label != "peft_svd":
                world = weight.double() - out.left.double() @ out.right.double()
                row[label]["rel_error"] = (torch.linalg.norm(world - reference) / torch.linalg.norm(reference)).item()
        rows[f"{m}x{n}"] = row
        del weight, reference
    projected = {f"{g}_gpus": {label: _makespan(rows, label, g) for label in (*SOLVERS, "peft_svd")} for g in (1, 8)}
    ok = all(row[s]["rel_error"] < 1e-4 for row in rows.values() for s in ("auto", "gram_fp64"))
    return {"pass": ok, "shrink": a.shrink, "matrices": rows, "projected_560_matrices_seconds": projected}


def _makespan(rows: dict, label: str, gpus: int) -> float:
    """Seconds to truncate all 560 matrices on ``gpus`` GPUs, each matrix taking its measured time on its owner
    (assign_owners, as apply_kasa schedules them); PEFT solves every matrix on every rank, so its time is the 1-GPU one."""
    items = [WorkItem(f"{shape}", shape, shape[0] * shape[1] * 2)
             for shape, count in LAYER_70B.items() for _ in range(count * LAYERS_70B)]
    load = [0.0] * gpus
    for job in assign_owners(items, 1 if label == "peft_svd" else gpus):
        load[job.owner] += rows["x".join(map(str, items[job.index].shape))][label]["seconds"]
    return max(load)


def _timed(device, fn, *args):
    _sync(device)
    tic = time.perf_counter()
    out = fn(*args)
    _sync(device)
    return time.perf_counter() - tic, out


def _bench_step(a, *args: str) -> dict:
    """tools/bench_step.py run as its own process (a tool never imports another), its JSON read back."""
    out = Path(a.work) / "bench_step.json"
    shape = ["--smoke"] if a.smoke else ["--hidden", "4096", "--ff", "14336", "--heads", "32", "--kv-heads", "8",
                                         "--layers", "2", "--vocab", "32000", "--batch", "2", "--seq", "1024",
                                         "--dtype", "bfloat16", "--steps", "10"]
    subprocess.run([sys.executable, str(TOOLS / "bench_step.py"), *shape, *args, "--json", str(out)], check=True)
    result = json.loads(out.read_text())
    return {"pass": True, "time_ratio_vs_peft_lora": result["time_ratio_vs_peft_lora"],
            "memory_ratio_vs_peft_lora": result["memory_ratio_vs_peft_lora"], "bench_step": result}


def check_step_8b(a, device) -> dict:
    return _bench_step(a)


def check_step_qkasa(a, device) -> dict:
    if missing := _missing("bitsandbytes"):
        return missing
    return _bench_step(a, "--base", "nf4")


def check_recipe_zero3(a, device) -> dict:
    if missing := _missing("deepspeed", "datasets"):
        return missing
    work = Path(a.work) / "recipe_zero3"
    subprocess.run([sys.executable, str(TOOLS / "make_tiny_llama.py"), "--out", str(work / "model"), "--hidden",
                    "64" if a.smoke else "512", "--layers", "2"], check=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if device.type != "cuda":
        env["DS_ACCELERATOR"] = "cpu"
    proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port",
                           str(29500 + os.getpid() % 1000), str(REPO / "launch/train.py"),
                           "--config", str(REPO / "configs/tiny_llama_instruct.yaml"), f"model.path={work / 'model'}",
                           "--ds_config", str(REPO / "ds_configs/zero3.json"), "--output_dir", str(work / "run"),
                           "train.max_steps=6", "train.log_every=1", "train.save_every=6", "train.eval_every=6"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()] \
        if (work / "run" / "metrics.jsonl").exists() else []
    losses = [r["loss"] for r in rows if r.get("split") == "train"]
    adapter = (work / "run" / "adapter" / "adapter_model.safetensors").is_file()
    ok = proc.returncode == 0 and adapter and len(losses) == 6
    return {"pass": ok, "returncode": proc.returncode, "losses": losses, "adapter_written": adapter,
            **({} if ok else {"log_tail": (proc.stdout + proc.stderr)[-2000:]})}


def check_trainer(a, device) -> dict:
    from transformers import TrainingArguments

    model = llama(a.hidden, 2, device)
    g = torch.Generator().manual_seed(2)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 512, (4, 64), generator=g).repeat(8, 1)]
    args = TrainingArguments(output_dir=str(Path(a.work) / "trainer"), max_steps=10, per_device_train_batch_size=8,
                             learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                             report_to=[], disable_tqdm=True,
                             use_cpu=device.type != "cuda")
    trainer = KaSATrainer(model=model, args=args, train_dataset=rows,
                          kasa_config=KaSAConfig(r=8, alpha=16, target_modules=TARGETS))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    untouched = all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    on = {p.device.type for p in model.parameters()}
    ok = losses[-1] < losses[0] and untouched and on == {device.type}
    return {"pass": ok, "loss_first": losses[0], "loss_last": losses[-1], "frozen_untouched": untouched,
            "devices": sorted(on)}


def check_megatron(a, device) -> dict:
    missing = _missing("megatron.core")
    if missing:
        return missing
    from megatron.core import parallel_state

    from kasa_ds.comm.processes import init_processes
    from kasa_ds.training.megatron_model import load_megatron_lm

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = Path(a.work) / "megatron_llama"
    hf = llama(a.hidden, 2, device, dtype).eval()
    hf.save_pretrained(path)
    created = not torch.distributed.is_initialized()
    init_processes()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    try:
        model = load_megatron_lm(path, dtype=dtype, device=device).eval()
        tokens = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1)).to(device)
        with torch.no_grad():
            want, got = hf(input_ids=tokens).logits.float(), model(tokens).logits.float()
        error = ((want - got).abs().max() / want.abs().max()).item()
        attention = type(model.gpt.decoder.layers[0].self_attention.core_attention).__name__
        apply_kasa(model, KaSAConfig(r=8, alpha=16, target_modules=TARGETS), show_progress=False)
        model.gradient_checkpointing_enable()  # the layers recomputed in backward, around megatron's own modules
        losses = train(model.train(), device, a.steps)
    finally:  # leave the process as it was: later checks (and the tests' process) see no process group
        parallel_state.destroy_model_parallel()
        if created:
            torch.distributed.destroy_process_group()
    ok = error <= 3e-2 and losses[-1] < losses[0] and (device.type != "cuda" or attention == "DotProductAttention")
    return {"pass": ok, "logits_vs_hf": error, "core_attention": attention, "dtype": str(dtype),
            "gradient_checkpointing": True, "loss_first": losses[0], "loss_last": losses[-1]}


def check_megatron_parallel(a, device) -> dict:
    if missing := _missing("megatron.core", "datasets"):
        return missing
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and gpus < 2:
        return {"pass": None, "reason": f"needs 2 CUDA GPUs (this machine has {gpus})"}
    work = Path(a.work) / "megatron_parallel"
    subprocess.run([sys.executable, str(TOOLS / "make_tiny_llama.py"), "--out", str(work / "model"), "--hidden",
                    "64" if a.smoke else "512", "--layers", "2"], check=True)
    runs = {"tp1": (1, []), "pp2": (2, ["pipeline_parallel=2"])}
    if device.type == "cuda":
        runs["tp2_sequence_parallel"] = (2, ["tensor_parallel=2", "sequence_parallel=true"])
    losses, failed = {}, {}
    for name, (nproc, overrides) in runs.items():
        out = work / name
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
             str(_free_port()), str(REPO / "launch/train.py"), "--config",
             str(REPO / "configs/tiny_llama_instruct.yaml"), f"model.path={work / 'model'}", "backend=megatron",
             "model.dtype=float32", "kasa.dropout=0.0", f"train.max_steps={2 if a.smoke else 6}",
             "train.micro_batch_size=2", "train.gradient_accumulation_steps=2", "train.log_every=1",
             "train.eval_every=100", "train.save_every=100", "--output_dir", str(out), *overrides],
            cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode:
            failed[name] = (proc.stdout + proc.stderr)[-2000:]
            continue
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in rows if r.get("split") == "train"]
    ref = losses.get("tp1")
    errors = {name: max(abs(x - y) / abs(y) for x, y in zip(run, ref)) for name, run in losses.items()
              if ref and name != "tp1" and len(run) == len(ref)}
    ok = not failed and len(errors) == len(runs) - 1 and all(e <= 1e-3 for e in errors.values())
    return {"pass": ok, "loss_error_vs_tp1": errors, "losses": losses, "gpus": gpus,
            **({"failed": failed} if failed else {})}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _missing(*packages: str) -> dict | None:
    absent = [p for p in packages if importlib.util.find_spec(p) is None]
    if absent:
        return {"pass": None, "reason": f"{', '.join(absent)} not installed (a bare lent GPU: carry the wheels "
                                        "of tools/gpu_wheels.py)"}
    return None


def check_llm_compare(a, device) -> dict:
    """The whole-model comparison; ``pass`` None (not available) without the model or under --smoke."""
    from kasa_ds.experiments import compare_llm, stats

    model = Path(compare_llm.parse_args([]).model)
    if a.smoke or not (model / "config.json").exists():
        why = "--smoke" if a.smoke else f"no {model}: python3 tools/prepare_model.py gemma-3-270m"
        return {"pass": None, "reason": why}
    result = compare_llm.main(["--adapt-top", "all", "--device", device.type, "--resume",
                               "--out", str(Path(a.work) / "llm_siqa_full")])
    finals = stats.final_runs(result)
    return {"pass": True, "accuracy": {m: [r["accuracy"] for r in runs] for m, runs in finals.items()},
            "paired": result["paired"], "zero_shot": result["zero_shot"]["accuracy"]}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _figure(result: dict) -> str:
    """The headline figure of one check's result, for its line."""
    keys = ("time_ratio_vs_peft_lora", "loss_error_vs_tp1", "projected_560_matrices_seconds", "effective_base_rel_error", "losses",
            "loss_last", "error")
    return next((f"{k}={json.dumps(result[k], default=str)[:200]}" for k in keys if k in result), "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, on the CPU when there is no GPU")
    p.add_argument("--out", help="write the results (and the device) as JSON here")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not a.smoke:
        print("error: no CUDA GPU here; run this on a GPU machine (or --smoke to test the tool on the CPU)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    a.hidden, a.steps, a.shrink = (64, 4, 16) if a.smoke else (1024, 20, 1)
    a.work = str(Path(a.out).parent if a.out else Path.cwd())
    Path(a.work).mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if cuda else "CPU (--smoke)"
    results = {"device": name, "torch": torch.__version__, "smoke": a.smoke, "checks": {}}
    for check, run in (("qkasa_4bit", check_qkasa_4bit), ("bf16_autocast", check_bf16_autocast),
                       ("init_70b", check_init_70b), ("step_8b", check_step_8b), ("step_qkasa", check_step_qkasa),
                       ("recipe_zero3", check_recipe_zero3), ("trainer", check_trainer),
                       ("megatron", check_megatron), ("megatron_parallel", check_megatron_parallel),
                       ("llm_compare", check_llm_compare)):
        try:
            results["checks"][check] = run(a, device)
        except Exception as e:  # one failing check must not hide the others' results
            results["checks"][check] = {"pass": False, "error": f"{type(e).__name__}: {e}"}
        r = results["checks"][check]
        verdict = "NOT AVAILABLE (" + r["reason"] + ")" if r["pass"] is None else "PASS" if r["pass"] else "FAIL"
        print(f"{check:<17} {verdict}  {_figure(r)}", flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"device: {name}")
    return 0 if all(c["pass"] is not False for c in results["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
