"""Exact LoRA export (kasa_ds.io.lora, tools/export_adapter.py --as-lora): PEFT loads the rank-2r LoRA as a plain
LoraConfig adapter onto the original, untruncated base and reproduces the KaSA model's logits.

Tolerance 1e-4 relative: W + B·A and W_world + ΔW are the same matrix in exact arithmetic; in float32 they differ by
the rounding of W − L·R (≈ 1e-7 relative per weight), amplified through 2 layers and the LM head."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ALL_LLAMA_TARGETS, randomize_adapters, tiny_llama
from kasa_ds import KaSAConfig, apply_kasa, export_lora_adapter, save_adapter

peft = pytest.importorskip("peft", reason="PEFT is a [dev] dependency (it loads the exported LoRA)")
REPO = Path(__file__).resolve().parents[2]


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def peft_logits(base, lora_dir, tokens):
    model = peft.PeftModel.from_pretrained(base, lora_dir).eval()
    assert isinstance(model.peft_config["default"], peft.LoraConfig) and model.peft_config["default"].r == 8
    with torch.no_grad():
        return model(tokens).logits


def check_files(lora_dir, r=4):
    tensors = load_file(str(lora_dir / "adapter_model.safetensors"))
    assert tensors and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert all(v.shape[0 if k.endswith("lora_A.weight") else 1] == 2 * r for k, v in tensors.items())
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 2 * r, 2 * r)
    assert "kasa_config" not in config


def test_dense_lora_export_reproduces_the_kasa_model(tmp_path, tokens):
    original = tiny_llama()
    model = copy.deepcopy(original)
    apply_kasa(model, KaSAConfig(r=4, target_modules=ALL_LLAMA_TARGETS), show_progress=False)
    randomize_adapters(model)
    with torch.no_grad():
        kasa = model(tokens).logits
    # from the model, the tails recomputed from the original model in memory, and from its checkpoint directory
    export_lora_adapter(model, tmp_path / "from_module", base=original)
    original.save_pretrained(tmp_path / "base")
    export_lora_adapter(model, tmp_path / "from_dir", base=tmp_path / "base")
    # the tool, from the saved KaSA adapter and the base checkpoint
    save_adapter(model, tmp_path / "kasa")
    from export_adapter import export_lora

    export_lora(tmp_path / "kasa", tmp_path / "from_tool", tmp_path / "base")
    for name in ("from_module", "from_dir", "from_tool"):
        check_files(tmp_path / name)
        assert rel(peft_logits(tiny_llama(), tmp_path / name, tokens), kasa) <= 1e-4, name
    # not a no-op: the original base alone is far from the KaSA model
    with torch.no_grad():
        assert rel(tiny_llama()(tokens).logits, kasa) > 1e-2
    with pytest.raises(ValueError, match="pass base="):
        export_lora_adapter(model, tmp_path / "no_base")


def test_qkasa_low_rank_correction_exports_a_lora_for_the_unchanged_4bit_base(tmp_path, tokens):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is a [dev] dependency (QKaSA)")
    from kasa_ds.formats.bnb4 import quantize_linears_

    def quantized():
        model = tiny_llama()
        quantize_linears_(model, "nf4", double_quant=True)
        return model

    model = quantized()
    apply_kasa(model, KaSAConfig(r=4, target_modules=ALL_LLAMA_TARGETS), show_progress=False)
    randomize_adapters(model)
    with torch.no_grad():
        kasa = model(tokens).logits
    export_lora_adapter(model, tmp_path / "lora")  # the corrections are the tails: no base needed
    check_files(tmp_path / "lora")
    assert rel(peft_logits(quantized(), tmp_path / "lora", tokens), kasa) <= 1e-4
    requantized = quantized()
    apply_kasa(requantized, KaSAConfig(r=4, target_modules=ALL_LLAMA_TARGETS, quant_mode="requantize"),
               show_progress=False)
    with pytest.raises(ValueError, match="requantize adapter replaced its quantized base"):
        export_lora_adapter(requantized, tmp_path / "nope", base=tmp_path)


def test_the_exporter_refuses_what_vllm_would_refuse_and_names_the_rank_to_serve(tmp_path):
    """#25: for vLLM (--server vllm) a non-head modules_to_save and a rank 2r above 512 are refused before anything
    is written; every export prints the --max-lora-rank to pass (the smallest vLLM allows ≥ 2r)."""
    import subprocess
    import sys

    from kasa_ds.io.lora import vllm_max_lora_rank

    assert [vllm_max_lora_rank(x) for x in (2, 8, 32, 34, 300, 512)] == [8, 8, 32, 64, 320, 512]
    with pytest.raises(ValueError, match="above vLLM's largest --max-lora-rank 512"):
        vllm_max_lora_rank(514)
    tiny_llama().save_pretrained(tmp_path / "base")
    model = tiny_llama()
    apply_kasa(model, KaSAConfig(r=4, target_modules=["q_proj"], modules_to_save=["model.norm"]), show_progress=False)
    save_adapter(model, tmp_path / "kasa")
    tool = [sys.executable, str(REPO / "tools/export_adapter.py"), str(tmp_path / "kasa"), "--as-lora", "--base",
            str(tmp_path / "base")]
    proc = subprocess.run([*tool, "--out", str(tmp_path / "v"), "--server", "vllm"], capture_output=True, text=True)
    assert proc.returncode == 2 and "model.norm.weight" in proc.stderr and not (tmp_path / "v").exists()
    proc = subprocess.run([*tool, "--out", str(tmp_path / "p")], capture_output=True, text=True)
    assert proc.returncode == 0 and "--max-lora-rank 8 " in proc.stdout  # 2r = 8
    with pytest.raises(ValueError, match="classification head"):
        export_lora_adapter(model, tmp_path / "lib", base=tmp_path / "base", server="vllm")
