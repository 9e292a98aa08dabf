#!/usr/bin/env python
"""KaSA fine-tuning of a megatron-core GPT model with tensor parallelism (megatron-core process groups).

    torchrun --nproc_per_node 2 launch/megatron/train_gpt.py --config configs/megatron_gpt_tiny.yaml
    torchrun --nproc_per_node 8 launch/megatron/train_gpt.py --config my.yaml tensor_parallel=4   # TP 4 × DP 2

Steps: processes and megatron parallel_state (TP groups, DP = world / TP) → GPT model, this rank's shards
(kasa_ds.megatron_gpt), base weights from ``model.checkpoint`` (Megatron-LM layout
``mp_rank_XX/model_optim_rng.pt``, key "model") or a random init from the seed → KaSA on the TP linears
(linear_qkv / linear_fc1 column-parallel, linear_proj / linear_fc2 row-parallel; truncation through the all-reduced
Gram, no weight gathered) → training (task loss + KaSA regularizer, gradients averaged over the DP group) → the
adapter gathered across TP ranks into one file on rank 0 (kasa_ds adapter format; any TP size loads it back).

Text is byte-level (vocab 256), packed into seq_length blocks: no tokenizer to ship; real runs bring their own token
ids through ``data.train`` (.jsonl with "text" or the instruction fields).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

DEFAULTS = {
    "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
              "ffn_hidden_size": 176, "seq_length": 64, "checkpoint": None},
    "data": {"train": "data/rt_instruct/train.jsonl"},
    "kasa": {"r": 8, "alpha": 16.0, "target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
             "beta": 1e-4, "gamma": 1e-3, "dropout": 0.0, "init_seed": 0},
    "train": {"max_steps": 20, "micro_batch_size": 4, "lr": 1e-3, "seed": 0, "log_every": 5},
    "tensor_parallel": 2,
    "output_dir": "outputs/megatron-gpt",
}
VOCAB = 256  # bytes


def load_config(path, overrides) -> dict:
    cfg = json.loads(json.dumps(DEFAULTS))
    if path:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        for key, value in raw.items():
            if key not in cfg:
                raise SystemExit(f"error: {path}: unknown key {key!r} (valid: {', '.join(cfg)})")
            if isinstance(cfg[key], dict):
                unknown = set(value) - set(cfg[key])
                if unknown:
                    raise SystemExit(f"error: {path}: unknown {key}.{sorted(unknown)[0]} "
                                     f"(valid: {', '.join(cfg[key])})")
                cfg[key].update(value)
            else:
                cfg[key] = value
    for item in overrides:
        key, _, value = item.partition("=")
        *sections, leaf = key.split(".")
        node = cfg
        for s in sections:
            node = node.get(s) if isinstance(node.get(s), dict) else None
            if node is None:
                raise SystemExit(f"error: override {item!r}: {s} is not a section")
        if leaf not in node:
            raise SystemExit(f"error: override {item!r}: unknown key {key}")
        node[leaf] = yaml.safe_load(value)
    return cfg


def token_stream(path: str) -> torch.Tensor:
    """All records' text as one byte stream (instruction records: prompt and response joined)."""
    from kasa_ds.data import format_prompt, load_records

    texts = []
    for rec in load_records(path):
        if "text" in rec:
            texts.append(rec["text"])
        else:
            texts.append(format_prompt(rec["instruction"], rec.get("input", "")) + rec["output"])
    data = "\n\n".join(texts).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    m, k, t, tp = cfg["model"], cfg["kasa"], cfg["train"], int(cfg["tensor_parallel"])
    from kasa_ds.train_config import resolve_path

    train_path = resolve_path(cfg["data"]["train"])
    if not os.path.exists(train_path):
        raise SystemExit(f"error: data.train={cfg['data']['train']}: file not found")
    if m["checkpoint"] and not os.path.isdir(m["checkpoint"]):
        raise SystemExit(f"error: model.checkpoint={m['checkpoint']}: directory not found")

    # 1. processes: TP groups of consecutive ranks, DP across them (megatron-core parallel_state)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % tp:
        raise SystemExit(f"error: tensor_parallel={tp} does not divide the {world} ranks")
    if m["num_attention_heads"] % tp or m["num_query_groups"] % tp or VOCAB % tp:
        raise SystemExit(f"error: tensor_parallel={tp} must divide the attention heads, query groups and vocab (256)")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    rank, dp_rank, dp_world = dist.get_rank(), ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    say = print if rank == 0 else (lambda *x, **y: None)
    say(f"megatron-core GPT: {tp}-way tensor parallel × {dp_world} data-parallel replicas, {device.type}")

    # 2. model: this rank's shards of the same full weights for every TP size
    from kasa_ds import KaSAConfig, apply_kasa, kasa_regularization, save_adapter
    from kasa_ds.megatron_gpt import build_gpt
    from kasa_ds.metrics import MetricsLogger
    from kasa_ds.tp_shard import gathered_tp_adapter_state
    from kasa_ds.utils import progress

    torch.manual_seed(t["seed"])
    model = build_gpt(m, tp, VOCAB, device)
    if m["checkpoint"]:
        path = Path(m["checkpoint"]) / f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}" / "model_optim_rng.pt"
        model.load_state_dict(torch.load(path, map_location=device, weights_only=False)["model"], strict=False)
        say(f"base weights from {m['checkpoint']}")
    else:
        say("model.checkpoint is null: random base weights from the seed (a demonstration of the mechanics)")

    # 3. KaSA: apply_kasa recognizes megatron's Column/RowParallelLinear and truncates through the TP group
    config = KaSAConfig(r=k["r"], alpha=k["alpha"], dropout=k["dropout"], target_modules=k["target_modules"],
                        beta=k["beta"], gamma=k["gamma"], init_seed=k["init_seed"])
    say(apply_kasa(model, config, show_progress=rank == 0))
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t["lr"], weight_decay=0.0)

    # 4. data: blocks of seq_length + 1 bytes; each global batch split over the DP replicas
    stream = token_stream(train_path)
    s, mb = m["seq_length"], t["micro_batch_size"]
    blocks = stream[: (len(stream) // (s + 1)) * (s + 1)].view(-1, s + 1)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(t["seed"]))
    positions = torch.arange(s, device=device).unsqueeze(0).expand(mb, -1)

    out = Path(cfg["output_dir"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    logger = MetricsLogger(out, enabled=rank == 0, tensorboard=False)
    model.train()
    for step in progress(range(t["max_steps"]), disable=rank != 0, desc="train", unit="step"):
        tic = time.perf_counter()
        first = (step * dp_world + dp_rank) * mb % (len(order) - mb)
        batch = blocks[order[first:first + mb]].to(device)
        per_token = model(batch[:, :-1], positions, None, labels=batch[:, 1:])  # [b, s], vocab-parallel CE
        task = per_token.float().mean()
        reg = kasa_regularization(model)
        (task + reg).backward()
        for q in params:  # data parallel: average the adapter gradients over the replicas of this TP rank
            if dp_world > 1:
                dist.all_reduce(q.grad, group=ps.get_data_parallel_group())
                q.grad /= dp_world
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = task.detach().clone()
        dist.all_reduce(loss, group=ps.get_data_parallel_group())
        record = {"loss": loss.item() / dp_world, "kasa_reg": reg.item(), "step_time": time.perf_counter() - tic}
        logger.log("train", step + 1, record)
        if (step + 1) % t["log_every"] == 0 or step + 1 == t["max_steps"]:
            say(f"step {step + 1}/{t['max_steps']} | loss {record['loss']:.4f} | kasa_reg {record['kasa_reg']:.3e} | "
                f"{record['step_time']:.2f} s/step")

    # 5. the adapter, gathered over the TP group (collective), written once
    state = gathered_tp_adapter_state(model)
    if rank == 0:
        save_adapter(model, out / "adapter", state=state, base_model_name_or_path=m["checkpoint"] or "megatron-gpt")
        say(f"adapter written to {out / 'adapter'}")
    logger.close()
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
