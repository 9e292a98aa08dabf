"""A megatron-core GPT model that runs on CUDA and on CPU, for launch/megatron/train_gpt.py.

megatron-core's local layer spec is kept except the core attention: its DotProductAttention takes a scratch buffer
on the current CUDA device, so it is swapped (through the spec, the way megatron-core customizes layers) for
:class:`SDPACoreAttention`, torch's scaled_dot_product_attention behind the same interface. Embeddings, the
tensor-parallel linears (which KaSA adapts), norms, the vocab-parallel output layer and cross-entropy are
megatron-core's own. Learned absolute positions: megatron's RoPE module also allocates on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPACoreAttention(MegatronModule):
    """Causal attention of one TP rank's heads: q [s, b, heads_local, d], k/v [s, b, groups_local, d] →
    [s, b, heads_local·d] (megatron's DotProductAttention interface, with torch SDPA inside)."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention: packed sequences and attention bias are not supported")
        if key.shape[2] != query.shape[2]:  # grouped-query attention: each KV head serves several query heads
            rep = query.shape[2] // key.shape[2]
            key, value = key.repeat_interleave(rep, dim=2), value.repeat_interleave(rep, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                             dropout_p=self.dropout if self.training else 0.0)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def build_gpt(model_cfg: dict, tensor_parallel: int, vocab_size: int, device: torch.device) -> GPTModel:
    """A Llama-style GPTModel (RMSNorm, SwiGLU, no biases, untied output layer), this rank's TP shards.

    Weights are initialized on the CPU from the global seed and then split (use_cpu_initialization), so the full
    model is the same for every TP size.
    """
    config = TransformerConfig(
        num_layers=model_cfg["num_layers"], hidden_size=model_cfg["hidden_size"],
        num_attention_heads=model_cfg["num_attention_heads"], num_query_groups=model_cfg["num_query_groups"],
        ffn_hidden_size=model_cfg["ffn_hidden_size"], tensor_model_parallel_size=tensor_parallel,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32)
    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    model = GPTModel(config, spec, vocab_size=vocab_size, max_sequence_length=model_cfg["seq_length"],
                     position_embedding_type="learned_absolute", parallel_output=True,
                     share_embeddings_and_output_weights=False)
    return model.to(device)
