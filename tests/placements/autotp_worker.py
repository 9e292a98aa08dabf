"""Worker for tests/placements/test_tensor_parallel.py: KaSA on DeepSpeed AutoTP (2-way) + ZeRO-2 vs one process.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/placements/autotp_worker.py --base DIR --out DIR

A tiny Llama saved by the test is sharded by AutoTP (q/k/v/gate/up → LinearLayer, o/down → LinearAllreduce),
adapted (all seven projections), given the same non-zero adapter as a one-process copy, and both take 3 AdamW steps
(ZeRO-2 on the TP model). Writes <out>/rank<R>.json (errors vs the reference, losses) and, from rank 0, the gathered
adapter in PEFT format plus the reference's logits after training, for the test to load into PEFT.
"""

import argparse
import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import ALL_LLAMA_TARGETS, randomize_adapters  # noqa: E402
from kasa_ds.comm.processes import exit_now, shutdown_processes  # noqa: E402
from kasa_ds import KaSAConfig, apply_kasa, kasa_regularization, save_adapter  # noqa: E402
from kasa_ds.io.adapter import adapter_state_dict, load_adapter_state  # noqa: E402
from kasa_ds.placements.tp.autotp import autotp_shard  # noqa: E402
from kasa_ds.io.adapter import gathered_adapter_state  # noqa: E402
from kasa_ds.placements.tp import tp_layers  # noqa: E402

CONFIG = dict(r=4, alpha=8, dropout=0.0, target_modules=ALL_LLAMA_TARGETS, beta=1e-2, gamma=1e-2, init_seed=0)
DS = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
      "tensor_parallel": {"autotp_size": 2}, "zero_optimization": {"stage": 2}}


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    a = p.parse_args()
    from transformers import AutoModelForCausalLM

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    ref = AutoModelForCausalLM.from_pretrained(a.base)
    ref_report = apply_kasa(ref, KaSAConfig(**CONFIG), show_progress=False)
    randomize_adapters(ref, seed=3)
    full = adapter_state_dict(ref)

    model = autotp_shard(AutoModelForCausalLM.from_pretrained(a.base), DS)
    report = apply_kasa(model, KaSAConfig(**CONFIG), show_progress=rank == 0)
    load_adapter_state(model, full)  # full tensors cut to this rank's shards
    out = {"types": sorted({type(layer.base_layer).__name__ for _, layer in tp_layers(model)}),
           "tp_layers": sum(1 for _ in tp_layers(model)),
           "counts": {"one_process": [ref_report.trainable_params, ref_report.total_params],
                      "autotp": [report.trainable_params, report.total_params]}}
    tokens = torch.randint(0, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out["logits_init"] = rel(model(input_ids=tokens).logits, ref(input_ids=tokens).logits)

    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=DS)
    ref_opt = torch.optim.AdamW([q for q in ref.parameters() if q.requires_grad], lr=1e-2)
    losses = {"ref": [], "tp": []}
    engine.train()
    ref.train()
    for _ in range(3):
        loss = engine(input_ids=tokens, labels=tokens).loss + kasa_regularization(model)
        engine.backward(loss)
        engine.step()
        losses["tp"].append(loss.item())
        ref_loss = ref(input_ids=tokens, labels=tokens).loss + kasa_regularization(ref)
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        losses["ref"].append(ref_loss.item())
    out["losses"] = losses
    state = gathered_adapter_state(model)  # collective
    reference = adapter_state_dict(ref)
    out["adapter_after"] = max(rel(state[k], reference[k]) for k in reference)
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / f"rank{rank}.json").write_text(json.dumps(out, indent=1))
    if rank == 0:
        save_adapter(model, outdir / "adapter", state=state, base_model_name_or_path=a.base, task_type="CAUSAL_LM")
        ref.eval()
        with torch.no_grad():
            torch.save({"tokens": tokens, "logits": ref(input_ids=tokens).logits}, outdir / "reference.pt")
    shutdown_processes()  # leave the group together (a rank exiting with live gloo threads can abort)


if __name__ == "__main__":
    main()
    exit_now(0)  # skip C++ teardown once the work is written (kasa_ds.comm.processes.exit_now)
