"""Real DeepSpeed (CPU accelerator, gloo) through the deepspeed launcher with 2 ranks.

Exactness argument: sequence classification with dropout 0, per-example mean loss; 2 ranks × micro batch 4 see the
same global batches as 1 process × micro batch 8 (kasa_ds.training.data.global_batches), DeepSpeed averages the
two ranks' gradients, so each step's mean loss equals the single-process one up to float32 reduction order (≤ 1e-5 relative).
"""

import glob
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import free_port, write_uneven_instructions
from deepspeed_runs import COMMON, fully_partitioned_zero3, launch, losses

pytest.importorskip("deepspeed", reason="DeepSpeed is a [dev] dependency (pip install -e .[dev])")

REPO = Path(__file__).resolve().parents[2]
@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    return tiny_llama_dir


@pytest.fixture(scope="module")
def single_run(tiny_model, tmp_path_factory):
    """The one-process run every stage is compared with (micro batch 8 = 2 ranks × 4), run once."""
    tmp = tmp_path_factory.mktemp("single")
    launch(["--config", str(REPO / "configs/tiny_llama_instruct.yaml"), f"model.path={tiny_model}", *COMMON,
            "--output_dir", str(tmp / "single"), "train.micro_batch_size=8"], 1, tmp)
    return tmp / "single"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3", "zero3_offload"])
def test_two_ranks_match_single_process(tmp_path, tiny_model, single_run, stage):
    ds_config = fully_partitioned_zero3(tmp_path) if stage == "zero3" else REPO / f"ds_configs/{stage}.json"
    base = ["--config", str(REPO / "configs/tiny_llama_instruct.yaml"), f"model.path={tiny_model}", *COMMON]
    launch([*base, "--ds_config", str(ds_config), "--output_dir", str(tmp_path / "zero2"),
            "train.micro_batch_size=4"], 2, tmp_path)
    single, zero2 = losses(single_run), losses(tmp_path / "zero2")
    assert len(single) == len(zero2) == 3
    assert zero2 == pytest.approx(single, rel=1e-5)
    assert len(set(single)) == 3  # the steps differ: training happened
    ckpt = tmp_path / "zero2" / "checkpoints" / "step-0000003"
    assert (ckpt / "deepspeed").is_dir() and (ckpt / "meta.json").is_file()
    # the adapter written under DeepSpeed equals the single-process one (same training, same init seed)
    from safetensors.torch import load_file

    a = load_file(str(single_run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "zero2" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(v.numel() > 0 for v in b.values())
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-4 * max(1.0, a[k].abs().max()), k


@pytest.mark.slow
def test_moe_recipe_under_zero3_adapts_the_experts_and_checkpoints_only_adapters(tmp_path, tiny_moe_dir):
    """The recipe on a Qwen3-MoE model under a fully partitioned 2-rank ZeRO-3 (tests/placements/test_zero3.py
    checks the numbers against one process): the experts are adapted, the run trains, the DeepSpeed checkpoint holds
    the adapter's parameters and none of the frozen base (experts included), and the adapter loads on the base."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from kasa_ds import load_adapter

    out = tmp_path / "run"
    proc = launch(["--config", str(REPO / "configs/tiny_llama_instruct.yaml"), f"model.path={tiny_moe_dir}",
                   "data.max_eval_examples=16", "train.max_steps=4", "train.save_every=4", "train.eval_every=4",
                   "train.log_every=1", "train.micro_batch_size=4", "model.max_length=64",
                   "--ds_config", str(fully_partitioned_zero3(tmp_path)), "--output_dir", str(out)], 2, tmp_path)
    assert "30 expert projections in 2 experts modules" in proc.stdout + proc.stderr
    assert len(losses(out)) == 4
    states = torch.load(next((out / "checkpoints/step-0000004/deepspeed").glob("*model_states.pt")),
                        weights_only=False, map_location="cpu")["module"]
    assert states and all(".lora" in k for k in states), [k for k in states if ".lora" not in k][:5]
    assert any(k.endswith("experts.lora.down_proj.lora_A") for k in states)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    experts = {k: v for k, v in adapter.items() if ".experts." in k}
    assert len(experts) == 2 * 3 * 3 and all(v.shape[0] == 5 for v in experts.values())
    model = AutoModelForCausalLM.from_pretrained(tiny_moe_dir)
    load_adapter(model, out / "adapter", show_progress=False)  # the recorded base fingerprint matches


@pytest.mark.slow
def test_zero3_killed_run_resumes_with_the_same_losses(tmp_path, tiny_model):
    """SIGKILL the whole ZeRO-3 job once a checkpoint exists; `--resume auto` (the default) continues from the newest
    complete checkpoint and every later step has the loss of an uninterrupted run (same data order, optimizer state,
    schedule; 1e-5 relative for float32 reduction order)."""
    import signal
    import time

    ds_config = fully_partitioned_zero3(tmp_path)
    args = ["--config", str(REPO / "configs/tiny_llama_instruct.yaml"), f"model.path={tiny_model}", *COMMON,
            "--ds_config", str(ds_config), "train.micro_batch_size=4", "train.max_steps=30", "train.save_every=4"]
    launch([*args, "--output_dir", str(tmp_path / "full")], 2, tmp_path)
    out = tmp_path / "cut"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    port = free_port()
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port",
           str(port), str(REPO / "launch/train.py"), *args, "--output_dir", str(out),
           "train.log_every=1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-0000008").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # DeepSpeed's CPU allreduce segments (≈ 66 MiB per rank) of the killed job are not left in /dev/shm
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    done_before_kill = len(losses(out))
    assert 8 <= done_before_kill < 30, "the job must be killed mid-run"
    launch([*args, "--output_dir", str(out)], 2, tmp_path)  # resume: auto
    resumed = {}
    for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        if row["split"] == "train":
            resumed[row["step"]] = row["loss"]  # later rows (after resume) overwrite replayed steps
    full = losses(tmp_path / "full")
    assert sorted(resumed) == list(range(1, 31))
    assert [resumed[s] for s in range(1, 31)] == pytest.approx(full, rel=1e-5)
    assert not list((out / "checkpoints").glob(".*tmp"))  # no half-written checkpoint survives


@pytest.mark.slow
def test_tensor_parallel_recipe_matches_single_process(tmp_path, tiny_model):
    """`tensor_parallel: 2` in the recipe: AutoTP + ZeRO-2 on 2 ranks (one TP group, both ranks on the same batches)
    equals one process step for step (causal LM instruction tuning); the checkpoint holds DeepSpeed's per-TP-rank files and the gathered adapter
    equals the single-process adapter."""
    base = ["--config", str(REPO / "configs/tiny_llama_instruct.yaml"), f"model.path={tiny_model}", "kasa.dropout=0.0",
            "data.max_eval_examples=16", "train.max_steps=3", "train.save_every=3", "train.micro_batch_size=4"]
    launch([*base, "--output_dir", str(tmp_path / "single")], 1, tmp_path)
    proc = launch([*base, "--ds_config", str(REPO / "ds_configs/zero2.json"), "tensor_parallel=2",
                   "--output_dir", str(tmp_path / "tp")], 2, tmp_path)
    assert "tensor parallel: 2-way AutoTP × 1 data-parallel replicas" in proc.stdout
    single, tp = losses(tmp_path / "single"), losses(tmp_path / "tp")
    assert len(tp) == 3 and tp == pytest.approx(single, rel=1e-5)
    ckpt = tmp_path / "tp" / "checkpoints" / "step-0000003" / "deepspeed"
    assert {p.name for p in ckpt.glob("mp_rank_0*_model_states.pt")} == {"mp_rank_00_model_states.pt",
                                                                         "mp_rank_01_model_states.pt"}
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "tp" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and (a[k] - b[k]).abs().max() <= 1e-4 * max(1.0, a[k].abs().max()), k


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero3_bf16", "zero3_offload_bf16", "tp8_zero1_bf16"])
def test_large_model_ds_configs_train(tmp_path, tiny_model, name):
    """The ds_configs shipped for 70B-class runs (bf16, ZeRO-3, offload, AutoTP + ZeRO-1) train on 2 ranks: bf16
    base, adapters cast to bf16 for DeepSpeed (which keeps float32 masters), finite losses, adapter written.
    tp8_zero1_bf16 runs with autotp_size 2 (this machine has 2 ranks; the file says 8)."""
    ds = json.loads((REPO / f"ds_configs/{name}.json").read_text())
    extra = ["model.task=seq_cls", "data.train=data/rotten_tomatoes/train.jsonl",
             "data.eval=data/rotten_tomatoes/eval.jsonl", "kasa.modules_to_save=[score]", "model.max_length=48"]
    if "tensor_parallel" in ds:
        ds["tensor_parallel"]["autotp_size"] = 2
        extra = ["tensor_parallel=2"]  # AutoTP is supported for causal LMs
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(ds))
    launch(["--config", str(REPO / "configs/tiny_llama_instruct.yaml"), f"model.path={tiny_model}",
            "model.dtype=bfloat16", "--ds_config", str(path), "--output_dir", str(tmp_path / "run"),
            "train.max_steps=2", "train.log_every=1", "data.max_eval_examples=16", "tensorboard=false", *extra],
           2, tmp_path)
    values = losses(tmp_path / "run")
    assert len(values) == 2 and all(v == v and abs(v) < 1e3 for v in values)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_packed_causal_lm_under_zero2_and_zero3_matches_one_process(tmp_path, tiny_model):
    """Packed causal-LM training (rows of different label-token counts) on 2 ranks × 2 rows, ZeRO-2 and fully
    partitioned ZeRO-3, equals one process × 4 rows step for step: the loss is the token mean over the step's rows
    on every rank, not the mean of the ranks' means (1e-5: float32 reduction order)."""
    write_uneven_instructions(tmp_path / "data.jsonl")
    base = ["--config", str(REPO / "configs/tiny_llama_instruct.yaml"), f"model.path={tiny_model}", "kasa.dropout=0.0",
            f"data.train={tmp_path / 'data.jsonl'}", "data.packing=true", "model.max_length=160", "data.eval=null",
            "train.max_steps=3", "train.save_every=3", "train.lr_schedule=constant", "train.warmup_steps=0",
            "train.log_every=1"]
    launch([*base, "train.micro_batch_size=4", "--output_dir", str(tmp_path / "single")], 1, tmp_path)
    single = losses(tmp_path / "single")
    for name, ds in (("zero2", REPO / "ds_configs/zero2.json"), ("zero3", fully_partitioned_zero3(tmp_path))):
        launch([*base, "train.micro_batch_size=2", "--ds_config", str(ds), "--output_dir", str(tmp_path / name)], 2,
               tmp_path)
        assert losses(tmp_path / name) == pytest.approx(single, rel=1e-5), name
