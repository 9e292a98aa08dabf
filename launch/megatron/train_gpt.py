#!/usr/bin/env python
"""KaSA fine-tuning of a megatron-core GPT model with tensor parallelism (megatron-core process groups).

    torchrun --nproc_per_node 2 launch/megatron/train_gpt.py --config configs/megatron_gpt_tiny.yaml
    torchrun --nproc_per_node 8 launch/megatron/train_gpt.py --config my.yaml tensor_parallel=4   # TP 4 × DP 2

Steps: processes and megatron parallel_state (TP groups, DP = world / TP) → GPT model, this rank's shards
(kasa_ds.training.megatron_gpt), base weights from ``model.checkpoint`` (Megatron-LM layout
``mp_rank_XX/model_optim_rng.pt``, key "model") or a random init from the seed → KaSA on the TP linears
(linear_qkv / linear_fc1 column-parallel, linear_proj / linear_fc2 row-parallel; truncation through the all-reduced
Gram, no weight gathered) → training (task loss + KaSA regularizer, gradients averaged over the DP group) → the
adapter gathered across TP ranks into one file on rank 0 (kasa_ds adapter format; any TP size loads it back).

Text is byte-level (vocab 256), packed into seq_length blocks: no tokenizer to ship; real runs bring their own token
ids through ``data.train`` (.jsonl with "text" or the instruction fields).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


from kasa_ds import apply_kasa, gathered_adapter_state, kasa_regularization, save_adapter
from kasa_ds.comm.processes import init_processes, launcher_world_size, local_device, shutdown_processes
from kasa_ds.progress import progress
from kasa_ds.training.config import ConfigError, MegatronGPTConfig, load_megatron_config
from kasa_ds.training.data import format_prompt, load_records
from kasa_ds.training.metrics import MetricsLogger

VOCAB = 256  # bytes


def token_stream(path: str) -> torch.Tensor:
    """All records' text as one byte stream (instruction records: prompt and response joined)."""
    texts = []
    for rec in load_records(path):
        if "text" in rec:
            texts.append(rec["text"])
        else:
            texts.append(format_prompt(rec["instruction"], rec.get("input", "")) + rec["output"])
    data = "\n\n".join(texts).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def setup(cfg: MegatronGPTConfig):
    """Processes: TP groups of consecutive ranks, DP across them (megatron-core parallel_state)."""
    from megatron.core import parallel_state as ps

    tp, m = cfg.tensor_parallel, cfg.model
    world = launcher_world_size()
    if world % tp:
        raise ConfigError(f"tensor_parallel={tp} does not divide the {world} ranks")
    if m.num_attention_heads % tp or m.num_query_groups % tp or VOCAB % tp:
        raise ConfigError(f"tensor_parallel={tp} must divide the attention heads, query groups and vocab (256)")
    init_processes(backend="nccl" if torch.cuda.is_available() else "gloo")
    device = local_device()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    return ps, device


def build_model(cfg: MegatronGPTConfig, ps, device, say):
    """This rank's shards of the same full weights for every TP size; base weights from a Megatron-LM checkpoint."""
    from kasa_ds.training.megatron_gpt import build_gpt

    torch.manual_seed(cfg.train.seed)
    model = build_gpt(dataclasses.asdict(cfg.model), cfg.tensor_parallel, VOCAB, device)
    if cfg.model.checkpoint:
        path = Path(cfg.model.checkpoint) / f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}" / "model_optim_rng.pt"
        model.load_state_dict(torch.load(path, map_location=device, weights_only=False)["model"], strict=False)
        say(f"base weights from {cfg.model.checkpoint}")
    else:
        say("model.checkpoint is null: random base weights from the seed (a demonstration of the mechanics)")
    return model


def train_loop(cfg: MegatronGPTConfig, model, params, optimizer, ps, device, logger, say) -> None:
    """Steps of task loss + KaSA regularizer; adapter gradients averaged over the data-parallel replicas."""
    m, t = cfg.model, cfg.train
    dp_rank, dp_world = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    # data: blocks of seq_length + 1 bytes; each global batch split over the DP replicas
    stream = token_stream(cfg.data.train)
    s, mb = m.seq_length, t.micro_batch_size
    blocks = stream[: (len(stream) // (s + 1)) * (s + 1)].view(-1, s + 1)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(t.seed))
    positions = torch.arange(s, device=device).unsqueeze(0).expand(mb, -1)

    model.train()
    for step in progress(range(t.max_steps), disable=dist.get_rank() != 0, desc="train", unit="step"):
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
        if (step + 1) % t.log_every == 0 or step + 1 == t.max_steps:
            say(f"step {step + 1}/{t.max_steps} | loss {record['loss']:.4f} | kasa_reg {record['kasa_reg']:.3e} | "
                f"{record['step_time']:.2f} s/step")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    a = p.parse_args(argv)
    try:
        cfg = load_megatron_config(a.config, a.overrides, base_dirs=[str(Path(__file__).resolve().parents[2])])
        ps, device = setup(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m, t = cfg.model, cfg.train
    rank, dp_world = dist.get_rank(), ps.get_data_parallel_world_size()
    say = print if rank == 0 else (lambda *x, **y: None)
    say(f"megatron-core GPT: {cfg.tensor_parallel}-way tensor parallel × {dp_world} data-parallel replicas, "
        f"{device.type}")
    model = build_model(cfg, ps, device, say)

    # KaSA: apply_kasa recognizes megatron's Column/RowParallelLinear and truncates through the TP group
    say(apply_kasa(model, cfg.kasa_config(), show_progress=rank == 0))
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=0.0)

    out = Path(cfg.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    logger = MetricsLogger(out, enabled=rank == 0, tensorboard=False)
    train_loop(cfg, model, params, optimizer, ps, device, logger, say)

    # the adapter, gathered over the TP group (collective), written once
    state = gathered_adapter_state(model)
    if rank == 0:
        save_adapter(model, out / "adapter", state=state, base_model_name_or_path=m.checkpoint or "megatron-gpt")
        say(f"adapter written to {out / 'adapter'}")
    logger.close()
    ps.destroy_model_parallel()
    shutdown_processes()
    return 0


if __name__ == "__main__":
    sys.exit(main())
