"""GGUF LoRA export (kasa_ds.io.gguf_lora, tools/export_adapter.py --as-gguf) on a tiny Llama: the file holds exactly
the rank-2r LoRA export's tensors under llama.cpp's names and metadata, with q/k rows in llama.cpp's order (checked
against transformers' own GGUF loader, which undoes llama.cpp's permutation); refusals come first and write nothing.
Served by llama.cpp itself: tests/integrations/test_gguf.py."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ALL_LLAMA_TARGETS, randomize_adapters, tiny_llama
from kasa_ds import KaSAConfig, apply_kasa, export_gguf_adapter, export_lora_adapter, save_adapter
from kasa_ds.io.gguf_lora import permute_rows

gguf = pytest.importorskip("gguf", reason="gguf (llama.cpp's gguf-py) is the [gguf] extra, in [dev]")
REPO = Path(__file__).resolve().parents[2]
R = 4


def gguf_file(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    reader = gguf.GGUFReader(path)
    fields = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    return fields, {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}


def unpermute(b: torch.Tensor, n_head: int, n_kv: int) -> torch.Tensor:
    """transformers' GGUF loader: llama.cpp's q/k row order back to the Hugging Face one."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    return torch.from_numpy(LlamaTensorProcessor()._reverse_permute_weights(b.numpy(), n_head, n_kv).copy())


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """(original tiny Llama, its KaSA model with ΔW ≠ 0, its exact LoRA export directory)."""
    original = tiny_llama()
    model = copy.deepcopy(original)
    apply_kasa(model, KaSAConfig(r=R, target_modules=ALL_LLAMA_TARGETS), show_progress=False)
    randomize_adapters(model)
    lora = export_lora_adapter(model, tmp_path_factory.mktemp("gguf") / "lora", base=original)
    return original, model, lora


def test_permutation_is_the_one_transformers_undoes_when_loading_a_llama_cpp_gguf():
    b = torch.randn(4 * 12, 8, dtype=torch.float64)
    assert not torch.equal(permute_rows(b, 4), b)
    for heads, kv in ((4, 4), (4, 2)):  # q (all query heads), k (the key-value heads)
        assert torch.equal(unpermute(permute_rows(b[: kv * 12], kv), heads, kv), b[: kv * 12])


def test_gguf_holds_the_lora_export_under_llama_cpp_names(adapted, tmp_path):
    original, model, lora = adapted
    out = export_gguf_adapter(model, tmp_path / "kasa.gguf", base=original)
    fields, tensors = gguf_file(out)
    assert (fields["general.type"], fields["general.architecture"], fields["adapter.type"]) == \
        ("adapter", "llama", "lora")
    assert fields["adapter.lora.alpha"] == 2 * R  # llama.cpp's scale alpha / rank = 1, as the LoRA's
    peft = load_file(str(lora / "adapter_model.safetensors"))
    assert len(tensors) == len(peft) == 2 * 2 * len(ALL_LLAMA_TARGETS)
    config = model.config
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for key, expected in peft.items():
        module, part = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        layer, leaf = module.split(".")[2], module.rsplit(".", 1)[1]
        got = tensors[f"blk.{layer}.{names[leaf]}.weight.lora_{part[0].lower()}"]
        assert got.dtype == torch.float32 and got.shape == expected.shape, key
        if part == "B.weight" and leaf in ("q_proj", "k_proj"):
            got = unpermute(got, config.num_attention_heads,
                            config.num_attention_heads if leaf == "q_proj" else config.num_key_value_heads)
        assert torch.equal(got, expected), key


def test_files_and_tool_write_the_same_gguf_and_f16_halves_it(adapted, tmp_path):
    original, model, _ = adapted
    original.save_pretrained(tmp_path / "base")
    save_adapter(model, tmp_path / "kasa")
    from export_adapter import main

    main([str(tmp_path / "kasa"), "--as-gguf", "--base", str(tmp_path / "base"), "--out", str(tmp_path / "t.gguf")])
    main([str(tmp_path / "kasa"), "--as-gguf", "--base", str(tmp_path / "base"), "--out", str(tmp_path / "h.gguf"),
          "--gguf-dtype", "f16"])
    _, from_model = gguf_file(export_gguf_adapter(model, tmp_path / "m.gguf", base=original))
    _, from_tool = gguf_file(tmp_path / "t.gguf")
    _, half = gguf_file(tmp_path / "h.gguf")
    assert from_tool.keys() == from_model.keys() == half.keys()
    for name, t in from_model.items():
        assert torch.allclose(from_tool[name], t, rtol=1e-5, atol=1e-6), name  # tails recomputed from the files
        assert half[name].dtype == torch.float16 and torch.allclose(half[name].float(), t, rtol=1e-3, atol=1e-4)
    assert not list(tmp_path.glob(".*tmp*"))


def test_what_llama_cpp_cannot_load_is_refused_first_and_nothing_is_written(adapted, tmp_path):
    original, model, _ = adapted
    with pytest.raises(ValueError, match="does not end in .gguf"):
        export_gguf_adapter(model, tmp_path / "kasa.bin", base=original)
    # an architecture llama.cpp's LoRA converter does not handle here is refused by name
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))
    apply_kasa(qwen, KaSAConfig(r=2, target_modules=["q_proj"]), show_progress=False)
    with pytest.raises(ValueError, match="no GGUF LoRA export for Qwen2ForCausalLM"):
        export_gguf_adapter(qwen, tmp_path / "qwen.gguf")
    # modules_to_save: a GGUF adapter holds only lora_a/lora_b pairs
    saving = copy.deepcopy(tiny_llama())
    apply_kasa(saving, KaSAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), show_progress=False)
    with pytest.raises(ValueError, match="not modules_to_save .*lm_head.*merge the adapter"):
        export_gguf_adapter(saving, tmp_path / "saving.gguf", base=tiny_llama())
    assert not list(tmp_path.iterdir())


def test_tool_without_base_is_one_error_line(adapted, tmp_path):
    _, model, _ = adapted
    save_adapter(model, tmp_path / "kasa")
    proc = subprocess.run([sys.executable, str(REPO / "tools/export_adapter.py"), str(tmp_path / "kasa"), "--as-gguf"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "--as-gguf needs --base" in proc.stderr
    assert not (tmp_path / "kasa" / "exported-lora.gguf").exists()
