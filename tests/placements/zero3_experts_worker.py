"""Run under the deepspeed launcher: KaSA on the fused experts of ZeRO-3 partitioned MoE models, 3 training steps,
dumping what tests/placements/test_zero3.py checks against one process.

    deepspeed --num_gpus N tests/placements/zero3_experts_worker.py <out dir> <model dir> [<model dir> …]

Writes per model (rank 0), into <out dir>/<model dir name>/: truncated.safetensors (the gathered W_world of every
adapted base parameter), adapter_init/ (right after injection), losses.json (task loss and regularizer per step),
adapter/ (after the steps), whole_truncated.safetensors (W_world of the model held whole on every rank, truncated
with the solves spread over the ranks); then <out dir>/done.
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

from kasa_ds import KaSAConfig, apply_kasa, kasa_regularization, save_adapter  # noqa: E402
from kasa_ds.comm.processes import exit_now, shutdown_processes  # noqa: E402
from kasa_ds.core.experts import expert_layers  # noqa: E402
from kasa_ds.core.layer import kasa_layers  # noqa: E402
from kasa_ds.io.adapter import gathered_adapter_state  # noqa: E402
from zero3_common import EXPERTS_CONFIG_KW, EXPERTS_LR, EXPERTS_STEPS, TOKENS_SEED, adapted_base_parameters  # noqa: E402


def main(out_dir: str, *model_dirs: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "train_batch_size": torch.distributed.get_world_size(), "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    for model_dir in model_dirs:
        out = Path(out_dir) / Path(model_dir).name
        keep = HfDeepSpeedConfig(ds)  # noqa: F841  the model is built partitioned
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        experts = next(m for n, m in model.named_modules() if n.endswith("experts"))
        assert experts.down_proj.numel() == 0 and experts.down_proj.ds_numel > 0, "expected partitioned experts"
        # a cap of one expert's bytes: every range holds one expert, several rounds per rank
        report = apply_kasa(model, KaSAConfig(**EXPERTS_CONFIG_KW), max_gather_bytes=8_000, show_progress=False)
        assert report.experts, "the experts were not adapted"
        bases = adapted_base_parameters(model)
        with deepspeed.zero.GatheredParameters(list(bases.values()), modifier_rank=None):
            if rank == 0:
                out.mkdir(parents=True, exist_ok=True)
                save_file({n: w.detach().clone() for n, w in bases.items()}, str(out / "truncated.safetensors"))
        state = gathered_adapter_state(model)
        if rank == 0:
            save_adapter(model, out / "adapter_init", state=state)

        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=EXPERTS_LR)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
        tokens = torch.randint(0, model.config.vocab_size, (2, 12),
                               generator=torch.Generator().manual_seed(TOKENS_SEED))
        engine.train()
        losses = []
        for _ in range(EXPERTS_STEPS):  # every rank the same batch: the averaged gradient is one process's
            task = engine(input_ids=tokens, labels=tokens).loss
            reg = kasa_regularization(model)
            engine.backward(task + reg)
            engine.step()
            losses.append([task.item(), reg.item()])
        assert all(m.regularize_in_forward for _, m in [*kasa_layers(model), *expert_layers(model)])
        state = gathered_adapter_state(model)
        if rank == 0:
            save_adapter(model, out / "adapter", state=state)
            (out / "losses.json").write_text(json.dumps(losses))
        del engine, model, keep

        # the same model held whole on every rank (DDP, ZeRO ≤ 2): apply_kasa(distributed=True) spreads the ranges
        # of experts over the ranks and broadcasts the factors
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        apply_kasa(model, KaSAConfig(**EXPERTS_CONFIG_KW), distributed=True, max_gather_bytes=8_000,
                   show_progress=False)
        if rank == 0:
            save_file({n: w.detach().clone() for n, w in adapted_base_parameters(model).items()},
                      str(out / "whole_truncated.safetensors"))
    if rank == 0:
        (Path(out_dir) / "done").write_text(str(torch.distributed.get_world_size()))
    shutdown_processes()  # leave the group together (a rank exiting with live gloo threads can abort)


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    exit_now(0)  # skip C++ teardown once the work is written (kasa_ds.comm.processes.exit_now)
