"""Run under the deepspeed launcher: QKaSA on a 4-bit base partitioned by ZeRO-3, dumping what
tests/placements/test_qkasa_zero3.py checks.

    deepspeed --num_gpus N tests/placements/qkasa_zero3_worker.py <base dir> <out dir> <nf4|fp4> <quant_mode>

Writes: effective.safetensors (rank 0: every target's gathered effective base, dequantized 4-bit minus the
correction), held_rank<R>.json (base-weight bytes this rank held at its peak while loading and truncating, and the
model's), logits.safetensors (rank 0: the sharded model with randomized adapters), adapter/ (gathered, PEFT files).
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from kasa_ds import KaSAConfig, apply_kasa, kasa_layers, save_adapter  # noqa: E402
from kasa_ds.comm.processes import exit_now  # noqa: E402
from kasa_ds.io.adapter import gathered_adapter_state  # noqa: E402
from kasa_ds.placements.zero3 import prepare_for_zero3  # noqa: E402
from kasa_ds.training.partitioned_4bit import HeldBytes, load_partitioned_4bit, unique_parameters  # noqa: E402
from conftest import randomize_adapters  # noqa: E402
from zero3_common import ADAPTER_SEED, CONFIG_KW, TOKENS_SEED  # noqa: E402

DS = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def main(base_dir: str, out_dir: str, quant_type: str, mode: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = {**DS, "train_batch_size": world}
    held = HeldBytes()
    model = load_partitioned_4bit(base_dir, lambda: AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(base_dir)), ds, quant_type, True, torch.float32, torch.float32, torch.float32,
        torch.device("cpu"), held=held)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert type(q).__name__ == "Params4bit" and q.numel() == 0 and q.ds_numel > 0, "expected a partitioned 4-bit base"
    whole = sum(p.ds_numel * p.element_size() for p in unique_parameters(model))
    apply_kasa(model, KaSAConfig(**CONFIG_KW, quant_mode=mode), show_progress=False, max_gather_bytes=4_000)

    layers = list(kasa_layers(model))
    weights = [m.base_layer.weight for _, m in layers]
    with deepspeed.zero.GatheredParameters(weights, modifier_rank=None):
        effective = {}
        for name, m in layers:
            w = bnbF.dequantize_4bit(m.base_layer.weight.data, m.base_layer.weight.quant_state).float()
            if m.tail_left is not None:
                w = w - m.tail_left.float() @ m.tail_right.float()
            effective[name] = w
        largest_gathered = max(w.data.numel() * w.element_size() for w in weights)
        if rank == 0:
            save_file(effective, str(out / "effective.safetensors"))
    (out / f"held_rank{rank}.json").write_text(json.dumps({
        "peak": held.peak, "largest_module": held.largest_module, "quant_state": held.quant_state,
        "whole_4bit_model": whole, "world": world, "largest_gathered_layer": largest_gathered}))

    randomize_adapters(model, ADAPTER_SEED)
    prepare_for_zero3(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    tokens = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(TOKENS_SEED))
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=tokens).logits
    state = gathered_adapter_state(model)
    if rank == 0:
        save_file({"logits": logits.detach().clone()}, str(out / "logits.safetensors"))
        save_adapter(model, out / "adapter", state=state)
        (out / "done").write_text("ok")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    exit_now(0)  # as launch/train.py: skip an occasional abort in C++ teardown after the work is written
