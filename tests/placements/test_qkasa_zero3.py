"""QKaSA on a 4-bit base partitioned by ZeRO-3 (real DeepSpeed on the CPU accelerator, real bitsandbytes, 2 ranks),
against single-process QKaSA on the same quantized weights.

The packed 4-bit bytes are the same whatever element type stores them (uint8 in one process, float32 under ZeRO-3),
and the distributed truncation runs the same solver on the same dequantized weight on its owner, so the effective
bases agree to float32 round-off (≤ 1e-5 relative; requantize: the same bytes). Logits through the exported adapter
on a 4-bit base: 1e-5 relative (the same weights, a different reduction order across ranks).
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is a [dev] dependency")
pytest.importorskip("bitsandbytes", reason="bitsandbytes is a [dev] dependency")
peft = pytest.importorskip("peft", minversion="0.21", reason="PEFT >= 0.21 is a [dev] dependency")
from safetensors.torch import load_file  # noqa: E402

from conftest import free_port, tiny_llama  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from kasa_ds import KaSAConfig, apply_kasa, export_lora_adapter, kasa_layers, load_adapter  # noqa: E402
from kasa_ds.formats.bnb4 import effective_weight, quantize_linears_  # noqa: E402
from deepspeed_runs import COMMON, fully_partitioned_zero3, launch, losses  # noqa: E402
from zero3_common import CONFIG_KW, TOKENS_SEED  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
from merge import merge  # noqa: E402


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qbase")
    tiny_llama(seed=4).save_pretrained(d)
    return d


def quantized_base(base_dir, quant_type):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    quantize_linears_(model, quant_type, double_quant=True)
    return model


def run_worker(base_dir, out, quant_type, mode, world=2):
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(world), "--master_port", str(free_port()),
           str(REPO / "tests/placements/qkasa_zero3_worker.py"), str(base_dir), str(out), quant_type, mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and (out / "done").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("quant_type,mode,world", [("nf4", "low_rank_correction", 2), ("nf4", "requantize", 2),
                                                   ("fp4", "low_rank_correction", 2), ("fp4", "requantize", 2),
                                                   ("nf4", "low_rank_correction", 1)])
def test_partitioned_4bit_truncation_equals_one_process(base_dir, tmp_path, quant_type, mode, world):
    """At 2 ranks for each type and mode, and at 1 (the result does not depend on the world size)."""
    run_worker(base_dir, tmp_path, quant_type, mode, world)
    config = KaSAConfig(**CONFIG_KW, quant_mode=mode)
    reference = quantized_base(base_dir, quant_type)
    apply_kasa(reference, config, show_progress=False)
    effective = load_file(str(tmp_path / "effective.safetensors"))
    assert set(effective) == {n for n, _ in kasa_layers(reference)}
    for name, layer in kasa_layers(reference):
        want = effective_weight(layer)
        assert torch.linalg.norm(effective[name] - want) <= 1e-5 * torch.linalg.norm(want), name

    # the gathered adapter, loaded on a 4-bit base in one process, reproduces the sharded model's logits
    loaded = quantized_base(base_dir, quant_type)
    load_adapter(loaded, tmp_path / "adapter")
    tokens = torch.randint(0, loaded.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(TOKENS_SEED))
    sharded = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    loaded.eval()
    with torch.no_grad():
        logits = loaded(input_ids=tokens).logits
    assert torch.linalg.norm(logits - sharded) <= 1e-5 * torch.linalg.norm(sharded)
    meta = json.loads((tmp_path / "adapter" / "kasa_ds_config.json").read_text())
    assert meta["base_quantization"]["quant_type"] == quant_type and meta["quant_mode"] == mode

    # the streamed merge into the 16-bit checkpoint: plain transformers gives the sharded model's logits (1e-4, as in
    # tests/formats/test_qkasa.py); with the correction kept, the rank-2r LoRA export serves the unchanged 4-bit base in PEFT
    merge(base_dir, tmp_path / "adapter", tmp_path / "merged", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=tokens).logits, sharded, atol=1e-4, rtol=1e-4)
    if mode == "low_rank_correction":
        export_lora_adapter(loaded, tmp_path / "lora")
        lora = peft.PeftModel.from_pretrained(quantized_base(base_dir, quant_type), tmp_path / "lora").eval()
        with torch.no_grad():
            assert torch.linalg.norm(lora(input_ids=tokens).logits - sharded) <= 1e-4 * torch.linalg.norm(sharded)

    # no rank held more than its 1/N of the 4-bit model, the replicated scales, and one module whole
    for rank in range(world):
        held = json.loads((tmp_path / f"held_rank{rank}.json").read_text())
        bound = held["whole_4bit_model"] / held["world"] + held["quant_state"] + held["largest_module"]
        assert held["peak"] <= bound + 64 * held["world"], held  # + ZeRO-3's alignment padding per parameter
        if world > 1:  # never the whole model on one rank
            assert held["peak"] < held["whole_4bit_model"] + held["largest_module"], held


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from make_tiny_llama import build

    return build(tmp_path_factory.mktemp("tiny-llama-q"), hidden=64, layers=2, vocab=320)


@pytest.mark.slow
def test_recipe_trains_a_partitioned_4bit_base_like_one_process_and_resumes(tmp_path, tiny_model):
    """The recipe with model.quantize=nf4 under ZeRO-3 on 2 ranks: the same 3 losses as one process (1e-5, float32
    reduction order), a 4-bit adapter export; then a run killed after its step-4 checkpoint resumes with the losses
    of an uninterrupted one."""
    import signal
    import time

    base = ["--config", str(REPO / "configs/tiny_llama_instruct.yaml"), f"model.path={tiny_model}", *COMMON,
            "model.quantize=nf4", "train.max_steps=10", "train.save_every=4", "train.log_every=1"]
    ds_config = fully_partitioned_zero3(tmp_path)
    launch([*base, "--output_dir", str(tmp_path / "single"), "train.micro_batch_size=8"], 1, tmp_path)
    args = [*base, "--ds_config", str(ds_config), "train.micro_batch_size=4"]
    launch([*args, "--output_dir", str(tmp_path / "full")], 2, tmp_path)
    # the first steps equal one process's (later ones part by AdamW's amplified rounding, so they are not compared)
    single, zero3 = losses(tmp_path / "single")[:3], losses(tmp_path / "full")[:3]
    assert len(zero3) == 3 and len(set(single)) == 3 and zero3 == pytest.approx(single, rel=1e-5)
    # the regularizer, computed per module inside forward under ZeRO-3, equals the one-process value
    reg = losses(tmp_path / "full", "kasa_reg")[:3]
    assert reg == pytest.approx(losses(tmp_path / "single", "kasa_reg")[:3], rel=1e-5) and reg[0] > 0
    meta = json.loads((tmp_path / "full" / "adapter" / "kasa_ds_config.json").read_text())
    assert meta["base_quantization"]["quant_type"] == "nf4"

    out = tmp_path / "cut"
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "launch/train.py"), *args, "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, "DS_ACCELERATOR": "cpu"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-0000004").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 4 <= len(losses(out)) < 10, "the job must be killed mid-run"
    launch([*args, "--output_dir", str(out)], 2, tmp_path)
    resumed = {}
    for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        if row["split"] == "train":
            resumed[row["step"]] = row["loss"]
    assert [resumed[s] for s in range(1, 11)] == pytest.approx(losses(tmp_path / "full"), rel=1e-5)
