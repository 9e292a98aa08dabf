"""Worker for tests/placements/test_megatron_hf.py: HF checkpoints through megatron-core at TP=t, against the HF road.

    torchrun --nproc_per_node N tests/placements/megatron_hf_worker.py --ckpts DIR --out DIR [--pp P] [--resume DIR]
        [--checkpointing] [--sequence-parallel]

(TP = N / P, P pipeline stages; stage-held tensors are merged over the stages before they are compared.)

For each family checkpoint under --ckpts (llama, qwen2, qwen3; written by the test):
    logits        HF model vs the megatron GPTModel built from the same files (float32), relative to max |logit|
    roundtrip     the megatron shards gathered back to HF tensors vs the stored ones (bit-exact expected)
    own_*         without pipeline stages: megatron's own attention and RoPE (the CUDA road's), see
                  :func:`megatron_own_modules`
    truncated     each projection's truncated weight (HF names, gathered) vs the float64 SVD reference
    init          adapter tensors (HF names, gathered) vs the HF road's KaSA model with the same config
    steps         3 SGD steps (momentum) of the same batch on both: logits, and each adapter tensor's ‖Δ‖/‖tensor‖
                  (with --checkpointing the megatron model recomputes its layers in backward; ``activations``: the
                  bytes one training forward keeps for backward, without and with it)
    schedules     with pipeline stages, after the steps: one step of 3 micro-batches (two lengths) through each
                  pipeline schedule (kasa_ds's 1F1B, and megatron-core's own under :func:`megatron_cuda_on_cpu`;
                  layers recomputed in backward) vs one forward and backward per micro-batch: this stage's adapter
                  gradients (‖Δ‖/‖g‖ over all of them) and the task losses
    odd_logits    with --sequence-parallel: logits of an 11-token row (padded to a multiple of TP inside) vs HF's
    exported      rank 0: the adapter written from megatron, loaded with load_adapter on the HF checkpoint: logits
                  vs megatron's; and exported as the rank-2r LoRA (export_lora_files), loaded by PEFT
With --resume (a TP=1 run after a TP=2 one): the adapter the TP=2 run wrote is loaded into this run's megatron model;
its logits vs the TP=2 run's (written to <resume>/<family>_logits.safetensors). Writes <out>/rank<R>.json.
"""

import argparse
import contextlib
import json
import warnings
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")

from kasa_ds import KaSAConfig, apply_kasa, kasa_regularization, load_adapter, save_adapter  # noqa: E402
from kasa_ds.comm.processes import exit_now  # noqa: E402
from kasa_ds.io.adapter import adapter_state_dict, gathered_adapter_state  # noqa: E402
from kasa_ds.io.hf_checkpoint import iter_tensors  # noqa: E402
from kasa_ds.io.lora import export_lora_files  # noqa: E402
from kasa_ds.io.megatron_checkpoint import hf_state  # noqa: E402
from kasa_ds.training import megatron_model  # noqa: E402
from kasa_ds.training.megatron_model import load_megatron_lm  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIG = dict(r=4, alpha=8, target_modules=PROJ, init_seed=5, beta=1e-2, gamma=1e-2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def reference_world(w: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return w.double() - (u[:, -r:] * s[-r:]) @ vh[-r:]


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def activation_bytes(model, ids: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages one training forward keeps for backward (no backward runs)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids)
    return sum(kept.values())


@contextlib.contextmanager
def megatron_cuda_on_cpu():
    """megatron-core's CUDA-only code as it runs on a GPU, its buffers on the CPU. Its pipeline schedule, its
    sequence-parallel mappings and linears, its attention and RoPE allocate with ``device="cuda"`` and
    ``torch.cuda.current_device()`` and call ``torch.cuda.synchronize()``, and its sequence-parallel embedding and
    attention enter the CUDA RNG tracker around their dropouts (p = 0 here), which a CPU-only torch refuses. Those are
    redirected (the tracker's fork does nothing); the rest (the schedule's order and batched p2p operations over
    gloo, its loss scaling, its release of sent activations, the sequence-parallel all-gathers and reduce-scatters,
    the attention's masking and softmax, RoPE's tables) is megatron's."""
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random
    from megatron.core.transformer import utils

    factories = {"zeros", "ones", "empty", "full", "arange", "tensor"}

    class TorchOnCpu:  # what a megatron module that writes device="cuda" sees as ``torch``
        def __getattr__(self, name):
            attr = getattr(torch, name)
            if name not in factories:
                return attr
            return lambda *args, device=None, **kwargs: attr(*args, device="cpu" if device == "cuda" else device,
                                                             **kwargs)

    with mock.patch.object(schedules, "torch", TorchOnCpu()), mock.patch.object(utils, "torch", TorchOnCpu()), \
            mock.patch.object(torch.cuda, "current_device", lambda: torch.device("cpu")), \
            mock.patch.object(torch.cuda, "synchronize", lambda *args, **kwargs: None), \
            mock.patch.object(random.CudaRNGStatesTracker, "fork", lambda self, *args: contextlib.nullcontext()):
        yield


def megatron_own_modules(hf, mg, ids: torch.Tensor) -> dict:
    """The modules the CUDA road runs, on the CPU under :func:`megatron_cuda_on_cpu`: each layer's SDPA core attention
    swapped back for megatron-core's DotProductAttention and RoPE's frequency table computed by megatron's own
    get_emb. Logits vs HF's (relative to max |logit|): ``own_logits`` for ``ids``; ``own_packed`` for one packed row
    of two documents (5 and 7 tokens, position_ids restarting: the block-causal mask goes to megatron's attention)
    vs HF's logits of each document alone. The CPU modules are put back."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    attentions = [layer.self_attention for layer in mg.gpt.decoder.layers]
    kept = [attention.core_attention for attention in attentions]
    for attention in attentions:
        attention.core_attention = DotProductAttention(
            mg.gpt.config, layer_number=attention.layer_number, attn_mask_type=attention.attn_mask_type,
            attention_type="self", softmax_scale=mg.gpt.config.softmax_scale)
    del mg.gpt.rotary_pos_emb.get_emb  # the instance's CPU override: megatron's own method again
    docs = [ids[:1, :5], ids[1:, :7]]
    row, positions = torch.cat(docs, dim=1), torch.cat([torch.arange(5), torch.arange(7)])[None]
    try:
        with torch.no_grad(), megatron_cuda_on_cpu():
            return {"own_attention": type(attentions[0].core_attention).__name__,
                    "own_logits": rel(hf(ids).logits, mg(ids).logits),
                    "own_packed": rel(torch.cat([hf(d).logits for d in docs], dim=1),
                                      mg(row, position_ids=positions).logits)}
    finally:
        for attention, core in zip(attentions, kept):
            attention.core_attention = core
        megatron_model._rope_where_it_is(mg.gpt.rotary_pos_emb)


def schedules_agree(mg, ids: torch.Tensor) -> dict:
    """See ``schedules`` in the module docstring; collective over the pipeline stages."""
    batches = [{"input_ids": ids[:, :n], "labels": ids[:, :n]} for n in (12, 9, 12)]
    scales, reg_scale = [0.5, 0.3, 0.2], 0.1
    params = [p for p in mg.parameters() if p.requires_grad]

    def take_grads() -> torch.Tensor:
        flat = torch.cat([p.grad.flatten() for p in params])
        mg.zero_grad(set_to_none=True)
        return flat

    mg.zero_grad(set_to_none=True)
    reference = []
    for batch, scale in zip(batches, scales):
        loss = mg(**batch).loss
        (loss * scale + reg_scale * kasa_regularization(mg)).backward()
        reference.append(loss.item())
    expected = take_grads()
    mg.gradient_checkpointing_enable()
    result = {}
    for schedule in ("kasa_ds", "megatron"):
        mg.pipeline_schedule = schedule
        with megatron_cuda_on_cpu() if schedule == "megatron" else contextlib.nullcontext():
            losses, _ = mg.pipelined_forward_backward(batches, scales, reg_scale, lambda: kasa_regularization(mg))
        result[schedule] = {"grads": ((take_grads() - expected).norm() / expected.norm()).item(),
                            "losses": max(abs(a - b) / abs(b) for a, b in zip(losses, reference))}
    mg.gradient_checkpointing_disable()
    mg.pipeline_schedule = "kasa_ds"
    return result


def run_family(path: Path, out: Path, tp_group, resume, checkpointing: bool, sequence_parallel: bool) -> dict:
    from peft import PeftModel

    family = path.name
    rank = dist.get_rank()
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(1))
    hf = hf_model(path)
    mg = load_megatron_lm(path, dtype=torch.float32, device=torch.device("cpu"),
                          sequence_parallel=sequence_parallel).eval()
    with torch.no_grad():
        result = {"logits": rel(hf(ids).logits, mg(ids).logits)}
        if sequence_parallel:  # 11 tokens: padded to 12 to split evenly over the TP ranks
            result["odd_logits"] = rel(hf(ids[:, :11]).logits, mg(ids[:, :11]).logits)
        stored = dict(iter_tensors(path))
        gathered = mg.gather_stages(hf_state(mg.gpt, mg.family, mg.layout, tp_group))
        result["roundtrip_keys"] = sorted(gathered) == sorted(stored)
        result["roundtrip"] = max((gathered[k] - stored[k]).abs().max().item() for k in stored)
    if mg.pipeline is None:
        result.update(megatron_own_modules(hf, mg, ids))
    if resume is not None:  # the adapter written at another TP size, loaded here
        load_adapter(mg, resume / f"adapter_{family}", show_progress=False)
        with torch.no_grad():
            result["resumed"] = rel(load_file(str(resume / f"{family}_logits.safetensors"))["logits"], mg(ids).logits)
        return result

    config = KaSAConfig(**CONFIG)
    hf_report, mg_report = apply_kasa(hf, config, show_progress=False), apply_kasa(mg, config, show_progress=False)
    result["counts"] = {"hf": [hf_report.trainable_params, hf_report.total_params],
                        "megatron": [mg_report.trainable_params, mg_report.total_params]}
    truncated = mg.gather_stages(hf_state(mg.gpt, mg.family, mg.layout, tp_group))
    result["truncated"] = max((truncated[k].double() - reference_world(stored[k], config.r)).abs().max().item()
                              for k in stored if any(f".{p}.weight" in k for p in PROJ))
    mine, theirs = gathered_adapter_state(mg), adapter_state_dict(hf)  # every TP rank's and stage's part
    result["adapter_keys"] = sorted(mine) == sorted(theirs)
    result["init"] = max((mine[k] - theirs[k]).abs().max().item() for k in theirs)

    hf.train(), mg.train()
    if checkpointing:
        plain = activation_bytes(mg, ids)
        mg.gradient_checkpointing_enable()
        result["activations"] = [plain, activation_bytes(mg, ids)]
    # SGD with momentum: Adam divides by √v, so an element whose gradient is at rounding level takes a ±lr step in
    # either run, and comparing elements after Adam would measure rounding, not the method
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
                  for m in (hf, mg)]
    losses = {"hf": [], "megatron": []}
    for _ in range(3):
        for name, model, opt in (("hf", hf, optimizers[0]), ("megatron", mg, optimizers[1])):
            loss = model(ids, labels=ids).loss
            (loss + kasa_regularization(model)).backward()
            opt.step(), opt.zero_grad()
            losses[name].append(loss.item())
    if mg.pipeline is not None:
        result["schedules"] = schedules_agree(mg, ids)
    hf.eval(), mg.eval()
    with torch.no_grad():
        mg_logits = mg(ids).logits
        result["steps_logits"] = rel(hf(ids).logits, mg_logits)
    mine, theirs = gathered_adapter_state(mg), adapter_state_dict(hf)  # every TP rank's and stage's part
    result["steps_adapter"] = max(((mine[k] - theirs[k]).norm() / theirs[k].norm()).item() for k in theirs)
    result["losses"] = losses

    adapter = out / f"adapter_{family}"
    save_adapter(mg, adapter)  # collective: gathered over TP and the stages, written by rank 0
    if rank == 0:
        save_file({"logits": mg_logits.contiguous()}, str(out / f"{family}_logits.safetensors"))
        fresh = hf_model(path)
        load_adapter(fresh, adapter, show_progress=False)
        with torch.no_grad():
            result["exported"] = rel(mg_logits, fresh(ids).logits)
        export_lora_files(adapter, out / f"lora_{family}", path)
        peft = PeftModel.from_pretrained(hf_model(path), out / f"lora_{family}").eval()
        with torch.no_grad():
            result["exported_lora"] = rel(mg_logits, peft(input_ids=ids).logits)
        result["adapter_config"] = json.loads((adapter / "adapter_config.json").read_text())
    dist.barrier()
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpts", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--resume", type=Path)
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (TP = world / pp)")
    p.add_argument("--checkpointing", action="store_true", help="train the megatron model with its layers recomputed")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="megatron's sequence parallelism (its CUDA allocations on the CPU: megatron_cuda_on_cpu)")
    a = p.parse_args()
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size() // a.pp,
                                 pipeline_model_parallel_size=a.pp)
    torch.manual_seed(0)
    with megatron_cuda_on_cpu() if a.sequence_parallel else contextlib.nullcontext():
        results = {path.name: run_family(path, a.out, ps.get_tensor_model_parallel_group(), a.resume,
                                         a.checkpointing, a.sequence_parallel)
                   for path in sorted(a.ckpts.iterdir())}
    results["tp_rank"] = ps.get_tensor_model_parallel_rank()
    (a.out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_now(0)
