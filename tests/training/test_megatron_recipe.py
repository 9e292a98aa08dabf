"""The recipe on the megatron backend (`backend: megatron`): a Hugging Face checkpoint split by megatron-core tensor
parallelism, or into two pipeline stages, on 2 CPU ranks (torchrun, gloo) trains exactly as the HF road in one
process (the two stages with gradient checkpointing, each step's two micro-batches through the stages together), as
do two data-parallel replicas, and a TP=2 checkpoint resumes at TP=1 and on two stages.

Same batches, packing (block-causal attention from position_ids), eval, samples, checkpoints; losses, gradient norms
and eval losses agree to float32 rounding (1e-5 relative: the fused q/k/v and gate/up matmuls and the
vocabulary-parallel cross-entropy sum in another order), the adapter files hold the HF module names with the same
tensors (‖Δ‖ ≤ 1e-5·‖tensor‖, measured ≤ 6e-6: per element, AdamW's division by √v turns a gradient at rounding level
into a ±lr step either way, so elements are not compared one by one after Adam).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import free_port

pytest.importorskip("megatron.core", reason="megatron-core is a [dev] dependency (pip install -e .[dev])")

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def train(args: list[str], tmp: Path, nproc: int = 1) -> str:
    runner = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                  str(nproc), "--master_port", str(free_port())]
    proc = subprocess.run([*runner, str(REPO / "launch/train.py"), *args], cwd=tmp, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def records(out: Path, split: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def test_megatron_tp2_and_pp2_train_as_the_hf_road_and_resume_at_other_sizes(tmp_path, tiny_llama_dir):
    base = ["--config", str(REPO / "configs/tiny_llama_instruct.yaml"), f"model.path={tiny_llama_dir}",
            "kasa.dropout=0.0", "data.max_eval_examples=16", "data.packing=true", "train.max_steps=4",
            "train.save_every=2", "train.eval_every=4", "train.micro_batch_size=2",
            "train.gradient_accumulation_steps=2", "train.log_every=1",
            "train.sample_prompts=1", "train.sample_max_new_tokens=6"]
    hf_out = train([*base, "--output_dir", str(tmp_path / "hf")], tmp_path)
    # with a memory limit: the planner's per-rank estimate (TP-split) is checked first, each rank's peak after each step
    mg_out = train([*base, "backend=megatron", "tensor_parallel=2", "train.max_memory_gib=16",
                    "--output_dir", str(tmp_path / "tp2")], tmp_path, nproc=2)
    assert "tensor parallel: 2-way megatron-core × 1 data-parallel replicas" in mg_out
    assert "memory plan: " in mg_out and "GiB estimated, limit 16 GiB" in mg_out
    # the stages recompute their layers in backward (gradient checkpointing): the same losses and gradient norms
    pp_out = train([*base, "backend=megatron", "pipeline_parallel=2", "model.gradient_checkpointing=true",
                    "--output_dir", str(tmp_path / "pp2")], tmp_path, nproc=2)
    assert "1-way megatron-core × 2 pipeline stages × 1 data-parallel replicas" in pp_out
    assert "gradient checkpointing: each decoder layer is recomputed in backward" in pp_out
    assert "gradient checkpointing" not in mg_out
    # two data-parallel replicas of one micro-batch each: the same global batch of 2 × 2 rows per step
    dp_out = train([*base, "backend=megatron", "train.micro_batch_size=1", "--output_dir", str(tmp_path / "dp2")],
                   tmp_path, nproc=2)
    assert "tensor parallel: 1-way megatron-core × 2 data-parallel replicas" in dp_out
    # the truncation read from an SVD cache of the HF checkpoint (its TP=1 layout, HF names), each rank subtracting
    # its own rows or columns of every projection's tail
    subprocess.run([sys.executable, str(REPO / "tools/precompute_svd.py"), "--model", str(tiny_llama_dir),
                    "--kasa-r", "8", "--targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                    "--out", str(tmp_path / "svd")], check=True, capture_output=True, timeout=300)
    cache = f"kasa.svd_cache={tmp_path / 'svd'}"
    cached_out = train([*base, "backend=megatron", "tensor_parallel=2", cache, "--output_dir",
                        str(tmp_path / "tp2-cached")], tmp_path, nproc=2)
    assert "max dropped energy nan" in cached_out  # the cache's report: its factors were applied, nothing solved
    hf = records(tmp_path / "hf", "train")
    a = load_file(str(tmp_path / "hf" / "adapter" / "adapter_model.safetensors"))
    for run in ("tp2", "pp2", "dp2", "tp2-cached"):
        mine = records(tmp_path / run, "train")
        for key in ("loss", "grad_norm", "kasa_reg"):
            assert [r[key] for r in mine] == pytest.approx([r[key] for r in hf], rel=1e-5), (run, key)
        assert [r["loss"] for r in records(tmp_path / run, "eval")] == pytest.approx(
            [r["loss"] for r in records(tmp_path / "hf", "eval")], rel=1e-5)
        assert records(tmp_path / run, "sample")[-1]["samples"] == records(tmp_path / "hf", "sample")[-1]["samples"]
        b = load_file(str(tmp_path / run / "adapter" / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and "base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight" in b
        for k in a:
            assert (a[k] - b[k]).norm() <= 1e-5 * a[k].norm(), (run, k)

    # the TP=2 run's step-2 checkpoint continued on one rank, and on two pipeline stages: the same steps 3 and 4
    tp2 = records(tmp_path / "tp2", "train")
    step2 = f"resume={tmp_path / 'tp2' / 'checkpoints' / 'step-0000002'}"
    train([*base, "backend=megatron", step2, "--output_dir", str(tmp_path / "tp1")], tmp_path)
    train([*base, "backend=megatron", "pipeline_parallel=2", step2, cache,  # the base rebuilt from the cache
           "--output_dir", str(tmp_path / "pp2-resumed")], tmp_path, nproc=2)
    for run in ("tp1", "pp2-resumed"):
        resumed = records(tmp_path / run, "train")
        assert [r["step"] for r in resumed] == [3, 4], run
        assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in tp2[2:]], rel=1e-5), run
    assert "eval after" in hf_out


@pytest.mark.parametrize("overrides,message", [
    (["train.optimizer=adamw8bit"], "train.optimizer=adamw8bit with backend: megatron: use adamw"),
    (["sequence_parallel=true"], "sequence_parallel: true splits the tokens over the tensor-parallel ranks: set "
                                 "tensor_parallel > 1, or sequence_parallel: false"),
    # checked when the backend starts, before megatron's groups or the model: the device is known there
    (["sequence_parallel=true", "tensor_parallel=2"], "sequence_parallel: true runs on CUDA only (megatron-core's "
     "sequence-parallel layers allocate their buffers on the GPU); set sequence_parallel: false on this machine"),
])
def test_megatron_backend_refuses_what_it_does_not_run(tmp_path, tiny_llama_dir, overrides, message):
    """Settings the megatron backend does not support (here) are one error line naming the fix, before any work."""
    proc = subprocess.run([sys.executable, str(REPO / "launch/train.py"), "--config",
                           str(REPO / "configs/tiny_llama_instruct.yaml"), f"model.path={tiny_llama_dir}",
                           "backend=megatron", *overrides], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert "KaSA:" not in proc.stdout  # nothing was loaded


def test_megatron_memory_limit_below_the_plan_is_refused_before_loading(tmp_path, tiny_llama_dir):
    proc = subprocess.run([sys.executable, str(REPO / "launch/train.py"), "--config",
                           str(REPO / "configs/tiny_llama_instruct.yaml"), f"model.path={tiny_llama_dir}",
                           "backend=megatron", "train.max_memory_gib=0.001"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: train.max_memory_gib=0.001: the planner estimates more" in proc.stderr
    assert "raise tensor_parallel or pipeline_parallel" in proc.stderr
    assert not (tmp_path / "outputs").exists()  # refused before the run's directory was made


def test_former_megatron_demo_config_is_refused_by_the_alias(tmp_path):
    """launch/megatron/train_gpt.py runs the recipe with backend=megatron; the former byte-level demo config is one
    error line naming the road that replaced it (no training starts)."""
    config = tmp_path / "old.yaml"
    config.write_text("model:\n  num_layers: 2\n  checkpoint: /somewhere/megatron-lm\ntensor_parallel: 2\n")
    proc = subprocess.run([sys.executable, str(REPO / "launch/megatron/train_gpt.py"), "--config", str(config)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error: launch/megatron/train_gpt.py now runs the recipe" in proc.stderr
