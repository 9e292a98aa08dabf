"""The HF → megatron-core mapping's checks, from the safetensors headers alone (no megatron process needed): every
problem of a checkpoint is named before anything is built or read."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, Qwen2Config

from kasa_ds.io.megatron_checkpoint import Layout, MegatronCheckpointError, check_checkpoint, family_of
from kasa_ds.training.megatron_model import check_supported, rope_settings


def _config(path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def test_a_matching_checkpoint_passes(tiny_llama_dir):
    config = _config(tiny_llama_dir)
    check_checkpoint(tiny_llama_dir, family_of(config), Layout.of(config))


def test_missing_unexpected_and_misshapen_tensors_are_named(tiny_llama_dir, tmp_path):
    state = load_file(str(tiny_llama_dir / "model.safetensors"))
    del state["model.layers.0.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    state["model.norm.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "model.safetensors"))
    config = _config(tiny_llama_dir)
    with pytest.raises(MegatronCheckpointError) as e:
        check_checkpoint(tmp_path, family_of(config), Layout.of(config))
    message = str(e.value)
    for name in ("missing: model.layers.0.mlp.up_proj.weight", "unexpected: model.layers.0.self_attn.extra.weight",
                 "wrong shape: model.norm.weight (3,)"):
        assert name in message, message


def test_unsupported_models_and_settings_are_refused():
    with pytest.raises(MegatronCheckpointError, match="model_type 'gpt2' has no Megatron mapping"):
        family_of(type("C", (), {"model_type": "gpt2"})())
    config = LlamaConfig(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, intermediate_size=96,
                         rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(MegatronCheckpointError, match="rope scaling"):
        rope_settings(config)
    config = Qwen2Config(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, intermediate_size=96,
                         hidden_act="gelu")
    with pytest.raises(MegatronCheckpointError, match="hidden_act=gelu.*tensor_parallel=4 must divide"):
        check_supported(config, family_of(config), 4)


def test_llama3_rope_scaling_is_accepted():
    config = LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         rope_theta=500000.0)
    assert rope_settings(config) == {"rotary_base": 500000.0, "rope_scaling": True, "rope_scaling_factor": 8.0}
