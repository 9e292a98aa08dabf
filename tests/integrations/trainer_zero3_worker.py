"""Under the deepspeed launcher: KaSATrainer on a ZeRO-3 partitioned model, the way a Trainer script is written.

    deepspeed --num_gpus N tests/integrations/trainer_zero3_worker.py <base dir> <out dir> <max_steps> [<resume dir>]

TrainingArguments(deepspeed=...) comes before from_pretrained, so the model is built partitioned, and apply_kasa
(through kasa_config) must recognize that by itself. Rank 0 writes truncated.safetensors (the gathered W_world of
every target before training) and losses.json; checkpoints go to <out>/run.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed  # noqa: E402
from accelerate.state import PartialState  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, TrainingArguments  # noqa: E402

from conftest import ALL_LLAMA_TARGETS, token_data  # noqa: E402
from kasa_ds.comm.processes import exit_now, shutdown_processes  # noqa: E402
from kasa_ds import KaSAConfig, kasa_layers  # noqa: E402
from kasa_ds.integrations.transformers import KaSATrainer  # noqa: E402

DS = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
      "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def gloo_when_no_gpu() -> None:
    """accelerate 1.15 takes its DeepSpeed path only with a GPU backend (``_prepare_backend`` finds none on a CPU-only
    machine, and the Trainer then runs each rank as a lone process); let it fall back to gloo, as DeepSpeed's CPU
    accelerator does, so the real DeepSpeed path of accelerate and the Trainer runs here. Unneeded on GPU machines."""
    original = PartialState._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        chosen, distributed_type = original(self, cpu, sagemaker_dp, backend)
        return chosen or "gloo", distributed_type

    PartialState._prepare_backend = prepare_backend


def main(base_dir: str, out_dir: str, max_steps: str, resume: str = "") -> None:
    gloo_when_no_gpu()
    out = Path(out_dir)
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    args = TrainingArguments(output_dir=str(out / "run"), per_device_train_batch_size=8 // world,
                             max_steps=int(max_steps), learning_rate=1e-2, optim="adamw_torch",
                             lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1e9,
                             logging_steps=1, save_strategy="steps", save_steps=2, report_to=[], seed=0,
                             disable_tqdm=True, deepspeed=DS)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.numel() == 0 and q.ds_numel > 0, "expected a partitioned model"
    trainer = KaSATrainer(model=model, args=args, train_dataset=token_data(),
                          kasa_config=KaSAConfig(r=4, target_modules=ALL_LLAMA_TARGETS, init_seed=0))
    rank = torch.distributed.get_rank()
    targets = [(n, m.base_layer.weight) for n, m in kasa_layers(model)]
    with deepspeed.zero.GatheredParameters([w for _, w in targets], modifier_rank=None):
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_file({n: w.detach().clone() for n, w in targets}, str(out / "truncated.safetensors"))
    trainer.train(resume_from_checkpoint=resume or None)
    if rank == 0:
        losses = {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}
        (out / "losses.json").write_text(json.dumps(losses))
    # leave the process group together, as the recipe does (kasa_ds.comm.processes.shutdown_processes): a rank exiting
    # with live gloo threads sometimes aborts in teardown ("terminate called without an active exception")
    shutdown_processes()


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    exit_now(0)  # skip C++ teardown once the work is written (kasa_ds.comm.processes.exit_now)
