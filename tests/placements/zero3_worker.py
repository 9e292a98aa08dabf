"""Run under the deepspeed launcher: KaSA on a ZeRO-3 partitioned HF model, dumping what tests/placements/test_zero3.py checks.

    deepspeed --num_gpus N tests/placements/zero3_worker.py <base model dir> <out dir>

Writes (rank 0): truncated.safetensors (gathered W_world of every target), adapter_init/ (PEFT adapter right after
injection), reg.json + reg_grads.safetensors (regularizer value and full gradients on randomized adapters),
logits.safetensors (forward of the sharded model), adapter/ (PEFT adapter, gathered).
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402

from kasa_ds.comm.processes import exit_now, shutdown_processes  # noqa: E402
from kasa_ds import KaSAConfig, apply_kasa, kasa_layers, kasa_regularization, save_adapter  # noqa: E402
from kasa_ds.io.adapter import gathered_adapter_state  # noqa: E402
from kasa_ds.placements.scheduled import truncate_scheduled  # noqa: E402
from kasa_ds.placements.zero3 import prepare_for_zero3  # noqa: E402
from conftest import randomize_adapters  # noqa: E402
from zero3_common import ADAPTER_SEED, CONFIG_KW, TOKENS_SEED  # noqa: E402


def main(base_dir: str, out_dir: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    out = Path(out_dir)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "train_batch_size": torch.distributed.get_world_size(), "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    keep = HfDeepSpeedConfig(ds)  # noqa: F841  the model is built partitioned
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.numel() == 0 and q.ds_numel > 0, "expected a partitioned model"
    config = KaSAConfig(**CONFIG_KW)
    # a 40 kB cap: several rounds, so the bounded-group path runs
    apply_kasa(model, config, truncate=lambda ts, c: truncate_scheduled(ts, c, max_gather_bytes=40_000))

    targets = [(n, m.base_layer.weight) for n, m in kasa_layers(model)]
    with deepspeed.zero.GatheredParameters([w for _, w in targets], modifier_rank=None):
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_file({n: w.detach().clone() for n, w in targets}, str(out / "truncated.safetensors"))
    state = gathered_adapter_state(model)
    if rank == 0:
        save_adapter(model, out / "adapter_init", state=state)

    randomize_adapters(model, ADAPTER_SEED)  # identical on every rank; adapters are not partitioned yet
    prepare_for_zero3(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    tokens = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(TOKENS_SEED))
    engine.train()
    task = engine(input_ids=tokens, labels=tokens).loss
    reg = kasa_regularization(model)
    # as in training, the loss includes the model's output (here × 0, exactly): under ZeRO-3 the regularizer's
    # gradients reach each adapter during its module's backward, when DeepSpeed has it gathered
    engine.backward(0.0 * task + reg)
    grads = {}
    for name, layer in kasa_layers(model):
        for pname, p in layer.adapter_parameters():
            g = deepspeed.utils.safe_get_full_grad(p)
            grads[f"{name}.{pname}"] = g.detach().clone()
    if rank == 0:
        save_file(grads, str(out / "reg_grads.safetensors"))
        (out / "reg.json").write_text(json.dumps({"value": reg.item()}))
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=tokens).logits
    state = gathered_adapter_state(model)
    if rank == 0:
        save_file({"logits": logits.detach().clone()}, str(out / "logits.safetensors"))
        save_adapter(model, out / "adapter", state=state)
        (out / "done").write_text(str(torch.distributed.get_world_size()))
    shutdown_processes()  # leave the group together (a rank exiting with live gloo threads can abort)


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    exit_now(0)  # skip C++ teardown once the work is written (kasa_ds.comm.processes.exit_now)
