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
    init_70b       the truncation of 70B-shaped matrices (8192×8192, 28672×8192, 1024×8192, r = 16): kasa_ds's solver
                   (tail_factors, "auto") against PEFT's serial float32 full SVD, seconds each and the error of the
                   truncated weight against a float64 SVD
    step           tools/bench_step.py on the GPU: per-step time and max_memory_allocated of kasa_ds vs PEFT LoRA
    llm_compare    the full-model version of the pre-registered comparison (docs/PROTOCOL_LLM_SIQA.md): every decoder
                   layer of gemma-3-270m adapted (tools/compare_llm.py --adapt-top all, results in
                   <out dir>/llm_siqa_full); NOT AVAILABLE (never a pass) under --smoke or before
                   `python3 tools/prepare_model.py gemma-3-270m` (tests/tools/test_compare_llm.py covers the tool on the CPU)
Exit code 0 when every available check passed, 1 otherwise, 2 without a CUDA GPU (unless --smoke).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


import torch

from kasa_ds import KaSAConfig, apply_kasa, kasa_layers, kasa_regularization
from kasa_ds.core.truncation import reference_world, tail_factors

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES_70B = [(8192, 8192), (28672, 8192), (1024, 8192)]


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
    from kasa_ds.formats.bnb4 import dequantize, quantize_linears_

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
    shapes = [(m // a.shrink, n // a.shrink) for m, n in SHAPES_70B]
    rows = {}
    for m, n in shapes:
        weight = torch.randn(m, n, device=device) * 0.02
        reference = reference_world(weight.double(), 16)
        timings = {}
        for label, solve in (("kasa_ds", lambda w: tail_factors(w, 16, "auto")),
                             ("peft_serial_svd", lambda w: torch.linalg.svd(w.float(), full_matrices=False))):
            solve(weight)  # warm-up (kernels, workspaces)
            _sync(device)
            tic = time.perf_counter()
            out = solve(weight)
            _sync(device)
            timings[label] = time.perf_counter() - tic
            if label == "kasa_ds":
                world = weight.double() - out.left.double() @ out.right.double()
                timings["kasa_ds_rel_error"] = (torch.linalg.norm(world - reference) /
                                                torch.linalg.norm(reference)).item()
        rows[f"{m}x{n}"] = timings
    ok = all(r["kasa_ds_rel_error"] < 1e-4 for r in rows.values())
    return {"pass": ok, "matrices": rows}


def check_step(a, device) -> dict:
    """tools/bench_step.py run as its own process (a tool never imports another), its JSON read back."""
    out = Path(a.work) / "bench_step.json"
    args = ["--smoke"] if a.smoke else ["--steps", "20"]
    subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "bench_step.py"), *args, "--json", str(out)],
                   check=True)
    return {"pass": True, "bench_step": json.loads(out.read_text())}


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
    name = torch.cuda.get_device_name() if cuda else "CPU (--smoke)"
    results = {"device": name, "torch": torch.__version__, "smoke": a.smoke, "checks": {}}
    for check, run in (("qkasa_4bit", check_qkasa_4bit), ("bf16_autocast", check_bf16_autocast),
                       ("init_70b", check_init_70b), ("step", check_step), ("llm_compare", check_llm_compare)):
        try:
            results["checks"][check] = run(a, device)
        except Exception as e:  # one failing check must not hide the others' results
            results["checks"][check] = {"pass": False, "error": f"{type(e).__name__}: {e}"}
        r = results["checks"][check]
        verdict = "NOT AVAILABLE (" + r["reason"] + ")" if r["pass"] is None else "PASS" if r["pass"] else "FAIL"
        print(f"{check:<14} {verdict}", flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"device: {name}")
    return 0 if all(c["pass"] is not False for c in results["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
