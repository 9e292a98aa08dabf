"""A Hugging Face dense decoder as a megatron-core GPTModel, behind the causal-LM calls the recipe makes.

:func:`load_megatron_lm` reads the HF config, builds this rank's tensor-parallel shards of a GPTModel from
megatron-core's local layer spec (RoPE with the checkpoint's theta, GQA, RMSNorm, SwiGLU, Qwen2's q/k/v biases,
Qwen3's q/k norms, tied or untied embeddings), fills them slice by slice from the safetensors files
(kasa_ds.io.megatron_checkpoint) and exposes each fused linear's HF projections for KaSA. With pipeline stages each
rank builds and reads only its stage's layers; a training step's micro-batches go through the stages together in 1F1B
order (:meth:`MegatronCausalLM.pipelined_forward_backward`: megatron-core's own schedule on CUDA, kasa_ds's on a CPU),
and a single call (eval, generation, a user's own loop) goes through them in turn (:class:`_PipelineLoss`). With
sequence parallelism (CUDA) the tokens outside the TP regions are split over the TP ranks. megatron-core's modules run
as they are on CUDA; on a CPU device two of them are replaced, because they allocate on CUDA: the core attention
(:class:`SDPACoreAttention`, torch SDPA behind megatron's interface) and RoPE's frequency table (computed where it is).

:class:`MegatronCausalLM` takes HF batches (input_ids, labels with −100, attention_mask or packed position_ids) and
returns HF's loss (the shift, the mean over label tokens; vocabulary-parallel cross-entropy, padded vocabulary
entries masked); ``generate`` decodes greedily for the recipe's samples.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..comm.collectives import comm_device
from ..comm.mappings import gather_last_dim
from ..comm.pipeline import StageLinks, one_f_one_b
from ..io.megatron_checkpoint import (Family, Layout, MegatronCheckpointError, family_of, hf_module_name,
                                      load_hf_checkpoint)
from ..placements.tp.fused import ProjectionView, Projections
from ..registry import whole_numel

#: HF RoPE scalings megatron-core computes the same way (Llama-3.1's, with megatron's fixed factors)
LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


class SDPACoreAttention(nn.Module):
    """Attention of one TP rank's heads: q [s, b, heads_local, d], k/v [s, b, groups_local, d] → [s, b, heads_local·d]
    (megatron's DotProductAttention interface, torch SDPA inside). ``attention_mask`` [b, 1, s, s], True = masked
    (megatron's convention), replaces the causal mask (packed rows: block-causal)."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__()
        self.config = config
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention: packed_seq_params and attention bias are not supported")
        if key.shape[2] != query.shape[2]:  # grouped-query attention: each KV head serves several query heads
            rep = query.shape[2] // key.shape[2]
            key, value = key.repeat_interleave(rep, dim=2), value.repeat_interleave(rep, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        mask = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             scale=self.softmax_scale,
                                             dropout_p=self.dropout if self.training else 0.0)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


class FrozenTorchNorm:
    """megatron's WrappedTorchNorm (torch's RMSNorm: the norm megatron's local spec takes without apex) also under
    sequence parallelism, which megatron refuses for it because a trained norm weight's gradient, computed from this
    rank's tokens only, would have to be summed over the TP ranks. The base's norms stay frozen here."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        return nn.RMSNorm(hidden_size, eps=eps)


def _with_norm(spec, norm) -> None:
    """Every torch norm in the layer spec ``spec`` (a ModuleSpec tree) replaced by ``norm``."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    submodules = getattr(spec, "submodules", None)
    for name in getattr(submodules, "__dataclass_fields__", {}):
        child = getattr(submodules, name)
        if child is WrappedTorchNorm:
            setattr(submodules, name, norm)
        elif hasattr(child, "submodules"):
            _with_norm(child, norm)


def rope_settings(hf_config) -> dict:
    """GPTModel's RoPE arguments for the checkpoint; an HF RoPE scaling megatron-core does not compute is refused."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None)) or 10000.0
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return {"rotary_base": theta}
    if kind == "llama3" and all(params.get(k) == v for k, v in LLAMA3_ROPE.items()):
        return {"rotary_base": theta, "rope_scaling": True, "rope_scaling_factor": params["factor"]}
    raise MegatronCheckpointError(f"rope scaling {params} is not computed by megatron-core's RoPE (supported: none, "
                                  f"and llama3 with {LLAMA3_ROPE}); train this model on the Hugging Face road")


def check_supported(hf_config, family: Family, tp: int, pp: int = 1) -> None:
    """One error naming every setting of the checkpoint the Megatron road would compute differently."""
    problems = []
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf_config.hidden_act} (megatron's gated MLP here is SwiGLU)")
    if family.name == "llama" and (getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False)):
        problems.append("attention_bias/mlp_bias (biases on o_proj and the MLP are not mapped)")
    if getattr(hf_config, "use_sliding_window", False) or (family.name == "llama" and
                                                          getattr(hf_config, "sliding_window", None)):
        problems.append(f"sliding-window attention (sliding_window={getattr(hf_config, 'sliding_window', None)})")
    layout = Layout.of(hf_config)
    if layout.layers % pp:
        problems.append(f"pipeline_parallel={pp} must divide the {layout.layers} decoder layers")
    if layout.groups % tp or layout.heads % tp:
        problems.append(f"tensor_parallel={tp} must divide the {layout.heads} attention heads and {layout.groups} "
                        "key/value heads")
    if layout.ffn % tp:
        problems.append(f"tensor_parallel={tp} must divide intermediate_size={layout.ffn}")
    rope_settings(hf_config)
    if problems:
        raise MegatronCheckpointError(f"{getattr(hf_config, '_name_or_path', 'the model')}: " + "; ".join(problems))


def _rope_where_it_is(rope) -> None:
    """megatron's RotaryEmbedding.get_emb moves its frequencies to the current CUDA device; on a CPU run they stay."""
    def get_emb(max_seq_len: int, offset: int = 0) -> torch.Tensor:
        freqs = rope.get_freqs_non_repeated(max_seq_len, offset)
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]  # not interleaved, as HF's rotate_half

    rope.get_emb = get_emb


def build_gpt(hf_config, family: Family, layout: Layout, *, dtype: torch.dtype, device: torch.device,
              sequence_parallel: bool = False):
    """This rank's (uninitialized) TP shards of the GPTModel for ``hf_config``; megatron parallel_state must be set.
    ``sequence_parallel`` (TP > 1): megatron's sequence parallelism, whose linears allocate on CUDA."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=layout.layers, hidden_size=layout.hidden, num_attention_heads=layout.heads,
        num_query_groups=layout.groups, kv_channels=layout.head_dim, ffn_hidden_size=layout.ffn,
        tensor_model_parallel_size=layout.tp_size, pipeline_model_parallel_size=layout.pp_size, pipeline_dtype=dtype,
        normalization="RMSNorm",
        layernorm_epsilon=getattr(hf_config, "rms_norm_eps", 1e-6), gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=family.qkv_bias, qk_layernorm=family.qk_norm, hidden_dropout=0.0,
        attention_dropout=0.0, bias_activation_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, use_cpu_initialization=True,
        perform_initialization=False, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        sequence_parallel=sequence_parallel and layout.tp_size > 1)
    spec = get_gpt_layer_local_spec(qk_layernorm=family.qk_norm, normalization="RMSNorm")
    on_cpu = device.type != "cuda"
    if on_cpu:
        spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    if config.sequence_parallel:
        _with_norm(spec, FrozenTorchNorm)
        spec = TransformerBlockSubmodules(layer_specs=[spec] * len(layout.stage_layers), layer_norm=FrozenTorchNorm)
    model = GPTModel(config, spec, vocab_size=layout.padded_vocab, pre_process=layout.pp_rank == 0,
                     post_process=layout.pp_rank == layout.pp_size - 1,
                     max_sequence_length=getattr(hf_config, "max_position_embeddings", 4096),
                     position_embedding_type="rope", parallel_output=True,
                     # with pipeline stages the last one holds its own copy of a tied (frozen) embedding, loaded
                     # from the same tensor: megatron's shared-weight sync moves it to CUDA and trains nothing here
                     share_embeddings_and_output_weights=layout.tied and layout.pp_size == 1,
                     **rope_settings(hf_config))
    if on_cpu:
        _rope_where_it_is(model.rotary_pos_emb)
    else:
        _track_model_parallel_rng(layout.tp_rank)
    return model


def _track_model_parallel_rng(tp_rank: int) -> None:
    """megatron's DotProductAttention runs its (here p = 0) attention dropout inside the CUDA RNG tracker's
    model-parallel state, and raises unless that state exists (megatron-LM adds it in
    ``model_parallel_cuda_manual_seed``). Add it as that function does (seed 2718 + TP rank), without reseeding
    the default CUDA generator: the adapters' dropout masks stay the recipe's."""
    from megatron.core.tensor_parallel import random

    name = getattr(random, "_MODEL_PARALLEL_RNG_TRACKER_NAME", "model-parallel-rng")  # fork()'s default state
    tracker = random.get_cuda_rng_tracker()
    if name not in tracker.get_states():
        tracker.add(name, 2718 + tp_rank)


class _PipelineLoss(torch.autograd.Function):
    """A stage before the last one: its handle on the pipeline's loss. Forward returns the loss the last stage
    broadcast (``loss``); backward receives from the next stage the gradient of this stage's output ``out`` (already
    scaled as the last stage's loss was: one weight per micro-batch on every stage) and passes it into this stage."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, loss: torch.Tensor, next_rank: int) -> torch.Tensor:
        ctx.shape, ctx.dtype, ctx.device, ctx.next_rank = out.shape, out.dtype, out.device, next_rank
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        received = torch.empty(ctx.shape, dtype=ctx.dtype, device=ctx.device)
        dist.recv(received, src=ctx.next_rank)
        return received, None, None


def _send_back(grad: torch.Tensor, to: int) -> None:
    dist.send(grad.contiguous(), dst=to)


def _causal_lm_loss(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's causal-LM loss from the last stage's vocabulary-parallel logits ``out`` [b, s, V_pad/t]: the mean
    cross-entropy of labels[:, 1:] (−100 ignored) given logits[:, :-1] (collective over the TP group)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    targets = labels[:, 1:]
    valid = targets != -100
    per_token = vocab_parallel_cross_entropy(out[:, :-1].contiguous(), targets.masked_fill(~valid, 0))
    return (per_token * valid).sum() / valid.sum().clamp(min=1)


def _checkpointed_forward(layer: nn.Module, *args, **kwargs):
    """A decoder layer's forward under torch's non-reentrant checkpoint while it trains with gradients; as it is
    otherwise (eval, generation)."""
    if layer.training and torch.is_grad_enabled():
        return checkpoint(layer.unchecked_forward, *args, use_reentrant=False, **kwargs)
    return layer.unchecked_forward(*args, **kwargs)


def expose_projections(gpt: nn.Module, layout: Layout) -> None:
    """Wrap each layer's linear_qkv, linear_proj, linear_fc1 and linear_fc2 in a :class:`Projections` whose children
    are the HF projections (q_proj … down_proj). The wrappers are re-registered in HF order (q, k, v, o, gate, up,
    down), so per-layer adapter seeds follow the HF model's module order."""
    projections = layout.projection_rows()
    for layer in gpt.decoder.layers:
        for fused in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"):
            parent_name, attr = fused.rsplit(".", 1)
            parent, linear = layer.get_submodule(parent_name), layer.get_submodule(fused)
            views = {p: ProjectionView(linear, rows, width) for p, (where, rows, width) in projections.items()
                     if where == fused}
            delattr(parent, attr)  # re-added last: HF order within the layer
            setattr(parent, attr, Projections(linear, views))


@dataclass
class CausalLMOutput:
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None


class MegatronCausalLM(nn.Module):
    """``gpt`` (a GPTModel: this rank's TP shards of its pipeline stage's layers) with the HF causal-LM interface.
    Every rank of a model replica calls it with the same batch: forward and generate are collective over the TP
    group and the pipeline stages, and every stage returns the loss (or the logits) the last stage computed."""

    def __init__(self, gpt: nn.Module, layout: Layout, family: Family, hf_config, tp_group, pipeline=None) -> None:
        """``pipeline``: (group, previous stage's rank, next stage's rank, last stage's rank) in global ranks, for
        pipeline parallelism (None: one stage)."""
        super().__init__()
        self.gpt = gpt
        self.layout, self.family, self.config, self.tp_group = layout, family, hf_config, tp_group
        self.pipeline = pipeline
        self.first_stage, self.last_stage = layout.pp_rank == 0, layout.pp_rank == layout.pp_size - 1
        #: megatron's sequence parallelism (TP > 1): activations outside the TP regions split on the token dimension
        self.sequence_parallel = bool(gpt.config.sequence_parallel)
        #: the training step's pipeline schedule: megatron-core's own on CUDA, kasa_ds.comm.pipeline's elsewhere
        self.pipeline_schedule = "megatron" if next(gpt.parameters()).is_cuda else "kasa_ds"
        eos = getattr(hf_config, "eos_token_id", None)
        self.eos_token_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])

    def gather_stages(self, tensors: dict) -> dict:
        """Every pipeline stage's ``tensors`` (keyed by HF names: adapter tensors, fingerprints) merged, on every rank
        (collective over the pipeline group; the input itself without pipeline parallelism)."""
        if self.pipeline is None:
            return tensors
        parts = [None] * self.layout.pp_size
        dist.all_gather_object(parts, {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in tensors.items()},
                               group=self.pipeline[0])
        return {k: v for part in parts for k, v in part.items()}

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters of the whole model as one unsplit model holds them: a TP-split tensor counts
        its unsplit size (kasa_ds.registry.whole_numel), the stages' counts are summed (collective over the pipeline
        group), a tied embedding once. The vocabulary counts as megatron pads it, to a multiple of TP
        (kasa_ds.inject.apply_kasa prints these)."""
        numel = whole_numel(self)
        # with stages, the last one holds its own frozen copy of a tied embedding: the HF model has it once
        copy = self.layout.tied and self.pipeline is not None and self.last_stage
        skip = {id(self.gpt.output_layer.weight)} if copy else set()
        counts = torch.zeros(2, dtype=torch.float64, device=comm_device() if dist.is_initialized() else None)
        for p in (p for p in self.parameters() if id(p) not in skip):
            counts[0] += numel(p) if p.requires_grad else 0
            counts[1] += numel(p)
        if self.pipeline is not None:
            dist.all_reduce(counts, group=self.pipeline[0])
        return int(counts[0].item()), int(counts[1].item())

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        """Recompute each decoder layer of this stage in backward: a layer keeps only its input [s, b, h] and what its
        recomputation needs, not its activations (the HF road's ``gradient_checkpointing``, on both devices).

        torch's non-reentrant checkpoint (only ``use_reentrant=False`` is accepted), not megatron's own recompute:
        its CheckpointFunction saves and restores CUDA RNG states and so runs on CUDA only. The layers draw no random
        numbers (megatron's dropouts are 0 here), the adapters' dropout draws the same masks again (torch restores
        the RNG state), and every TP rank recomputes, so the recomputation runs the same TP collectives in the same
        order on every rank."""
        if (gradient_checkpointing_kwargs or {}).get("use_reentrant", False):
            raise ValueError("MegatronCausalLM checkpoints its layers with use_reentrant=False only")
        for layer in self.gpt.decoder.layers:
            if not hasattr(layer, "unchecked_forward"):
                layer.unchecked_forward = layer.forward
                layer.forward = functools.partial(_checkpointed_forward, layer)

    def gradient_checkpointing_disable(self) -> None:
        for layer in self.gpt.decoder.layers:
            if hasattr(layer, "unchecked_forward"):
                layer.forward = layer.unchecked_forward
                del layer.unchecked_forward

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(hasattr(layer, "unchecked_forward") for layer in self.gpt.decoder.layers)

    def adapter_index_offset(self, targets_here: int) -> int:
        """The index in the whole model of this stage's first KaSA target (every stage holds as many layers, so as
        many targets): per-layer adapter seeds then match the HF model's."""
        return self.layout.pp_rank * targets_here

    def adapter_module_name(self, name: str) -> str:
        """Adapter files name each projection as the HF model does (``gpt.decoder.layers.3.self_attention.linear_qkv.
        q_proj`` → ``model.layers.3.self_attn.q_proj``): the adapter loads on the HF checkpoint, at any TP size."""
        return hf_module_name(name.removeprefix("gpt."), self.layout.stage_layers.start) or name

    def _stage(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
               position_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`_run_stage`; a later stage first receives its input from the previous one (and, when gradients are
        on, sends that input's gradient back during backward)."""
        if not self.first_stage:
            _, prev, _, _ = self.pipeline
            hidden = self._received_input(input_ids, prev)
            if torch.is_grad_enabled():
                hidden.register_hook(lambda grad: _send_back(grad, prev))
        return self._run_stage(input_ids, attention_mask, position_ids)

    def _run_stage(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                   position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This stage's output from its input (HF's input_ids [b, s], attention_mask, position_ids; a later stage's
        input is set by :meth:`_received_input`): hidden states [s, b, h] (a stage before the last; [s′/t, b, h]
        under sequence parallelism, s′ = :meth:`_tokens`), or the last stage's [b, s, V_pad/t] float32 logits of this
        rank's vocabulary part, padded entries −inf."""
        length = input_ids.shape[1]
        pad = self._tokens(length) - length
        if pad:  # sequence parallelism splits the tokens evenly: pads go last, where causal attention hides them
            input_ids = F.pad(input_ids, (0, pad))
            if position_ids is not None:  # a packed row's last example runs on through the pads
                steps = torch.arange(1, pad + 1, device=position_ids.device)
                position_ids = torch.cat([position_ids, position_ids[:, -1:] + steps], dim=1)
        out = self.gpt(input_ids, None, self._attention_mask(attention_mask, position_ids))
        if not self.last_stage:
            return out
        logits = out.float()[:, :length]
        layout = self.layout
        if layout.padded_vocab > layout.vocab:
            per = layout.padded_vocab // layout.tp_size
            ids = torch.arange(layout.tp_rank * per, (layout.tp_rank + 1) * per, device=logits.device)
            logits = logits.masked_fill(ids >= layout.vocab, float("-inf"))
        return logits

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                **unused) -> CausalLMOutput:
        """loss: mean cross-entropy of labels[:, 1:] (−100 ignored) given logits[:, :-1], as HF computes it;
        logits ([b, s, V], gathered over TP) only when no labels are given."""
        out = self._stage(input_ids, attention_mask, position_ids)
        if not self.last_stage:  # send this stage's output on; the last stage's result comes back
            group, _, following, last = self.pipeline
            dist.send(out.detach().contiguous(), dst=following)
            if labels is None:
                logits = torch.empty(*input_ids.shape, self.layout.vocab, device=input_ids.device)
                dist.broadcast(logits, src=last, group=group)
                return CausalLMOutput(logits=logits)
            loss = torch.empty((), device=input_ids.device)
            dist.broadcast(loss, src=last, group=group)
            return CausalLMOutput(loss=_PipelineLoss.apply(out, loss, following))
        if labels is None:
            full = out if self.layout.tp_size == 1 else gather_last_dim(
                out, [out.shape[-1]] * self.layout.tp_size, self.tp_group)
            logits = full[..., : self.layout.vocab].contiguous()
            if self.pipeline is not None:
                dist.broadcast(logits.detach(), src=self.pipeline[3], group=self.pipeline[0])
            return CausalLMOutput(logits=logits)
        loss = _causal_lm_loss(out, labels)
        if self.pipeline is not None:
            dist.broadcast(loss.detach().clone(), src=self.pipeline[3], group=self.pipeline[0])
        return CausalLMOutput(loss=loss)

    def pipelined_forward_backward(self, batches: list[dict], task_scales: list[float], reg_scale: float,
                                   regularizer: Callable[[], torch.Tensor]) -> tuple[list[float], float]:
        """One training step's micro-batches through the pipeline stages together, forward and backward, in 1F1B
        order: stage s works on micro-batch k while stage s+1 works on an earlier one, and keeps at most P − s
        micro-batches' activations (with gradient checkpointing, each layer's input only). On CUDA megatron-core's
        own schedule runs it (:meth:`_megatron_schedule`), on a CPU :func:`kasa_ds.comm.pipeline.one_f_one_b`
        (``pipeline_schedule``: "megatron" or "kasa_ds").

        The step's loss is Σ_k ``task_scales[k]``·task_k + K·``reg_scale``·``regularizer()`` (the KaSA terms of this
        stage's layers, collective over its TP group; the parameters do not change within a step, so the term is
        computed once). ``batches``: the same on every rank of the replica (HF batches with labels). Returns each
        micro-batch's task loss (broadcast from the last stage) and this stage's regularizer value. Collective over
        the pipeline group and each TP group."""
        group, _, _, last = self.pipeline
        run = self._megatron_schedule if self.pipeline_schedule == "megatron" else self._kasa_ds_schedule
        losses = run(batches, task_scales)
        reg = regularizer()
        if reg.requires_grad:
            (reg * (reg_scale * len(batches))).backward()
        device = batches[0]["input_ids"].device  # NCCL broadcasts CUDA tensors
        task_losses = torch.stack(losses) if self.last_stage else torch.empty(len(batches), device=device)
        dist.broadcast(task_losses, src=last, group=group)
        return task_losses.tolist(), reg.item()

    def _stage_of(self, batch: dict) -> torch.Tensor:
        return self._run_stage(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))

    def _kasa_ds_schedule(self, batches: list[dict], task_scales: list[float]) -> list[torch.Tensor]:
        """The step's forwards and backwards through :func:`kasa_ds.comm.pipeline.one_f_one_b`; returns the last
        stage's task losses (nothing elsewhere)."""
        _, prev, following, _ = self.pipeline
        losses = []

        def forward(k: int, x: Optional[torch.Tensor]):
            if x is not None:
                self.gpt.set_input_tensor(x)
            out = self._stage_of(batches[k])
            if not self.last_stage:
                return out, None
            task = _causal_lm_loss(out, batches[k]["labels"])
            losses.append(task.detach().float())
            return task * task_scales[k], None

        def backward(out: torch.Tensor, _, grad: Optional[torch.Tensor]) -> None:
            torch.autograd.backward(out, grad)

        links = StageLinks(None if self.first_stage else prev, None if self.last_stage else following)
        one_f_one_b(len(batches), self.layout.pp_rank, self.layout.pp_size, links, forward, backward,
                    lambda k: self._empty_activation(batches[k]["input_ids"]))
        return losses

    def _megatron_schedule(self, batches: list[dict], task_scales: list[float]) -> list[torch.Tensor]:
        """The step's forwards and backwards through megatron-core's non-interleaved 1F1B
        (``forward_backward_pipelining_without_interleaving``, over megatron's parallel_state pipeline group): its
        batched p2p operations, its release of each sent activation's storage (``deallocate_pipeline_outputs``) and,
        when the micro-batches' lengths differ, each transfer's shape sent first. Returns the last stage's task
        losses (nothing elsewhere). megatron allocates its buffers on the current CUDA device."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        losses = []

        def loss_func(k: int, logits: torch.Tensor):
            task = _causal_lm_loss(logits, batches[k]["labels"])
            losses.append(task.detach().float())
            return task * (task_scales[k] * len(batches)), {}  # the schedule divides by the number of micro-batches

        def forward_step(micro_batches, gpt):
            k = next(micro_batches)
            return self._stage_of(batches[k]), functools.partial(loss_func, k)

        config = self.gpt.config
        config.variable_seq_lengths = len({tuple(b["input_ids"].shape) for b in batches}) > 1
        config.deallocate_pipeline_outputs = True
        b, s = batches[0]["input_ids"].shape
        s = self._tokens(s)  # megatron divides it by TP under sequence parallelism
        schedule = get_forward_backward_func(pp_size=self.layout.pp_size)
        schedule(forward_step_func=forward_step, data_iterator=iter(range(len(batches))), model=self.gpt,
                 num_microbatches=len(batches), seq_length=s, micro_batch_size=b)
        return losses

    def _received_input(self, input_ids: torch.Tensor, prev: int) -> torch.Tensor:
        """The previous stage's output for ``input_ids`` ([s, b, h], received), set as this stage's input; a leaf
        that requires grad, so that backward leaves its gradient in ``.grad``."""
        hidden = self._empty_activation(input_ids)
        dist.recv(hidden, src=prev)
        hidden.requires_grad_()
        self.gpt.set_input_tensor(hidden)
        return hidden

    def _tokens(self, length: int) -> int:
        """The tokens a row of ``length`` runs as: under sequence parallelism, rounded up to a multiple of TP."""
        return length + (-length) % self.layout.tp_size if self.sequence_parallel else length

    def _empty_activation(self, input_ids: torch.Tensor) -> torch.Tensor:
        """An empty [s, b, h] tensor for the activation between stages of the batch ``input_ids`` [b, s] (or its
        gradient; [s′/t, b, h] under sequence parallelism), in the model's dtype."""
        tokens = self._tokens(input_ids.shape[1]) // (self.layout.tp_size if self.sequence_parallel else 1)
        return torch.empty(tokens, input_ids.shape[0], self.layout.hidden,
                           dtype=next(self.gpt.parameters()).dtype, device=input_ids.device)

    @staticmethod
    def _attention_mask(attention_mask, position_ids) -> Optional[torch.Tensor]:
        """None (causal) for unpadded or right-padded rows; block-causal [b, 1, s, s] (True = masked) for packed rows
        (position_ids restarting at 0 per example). Left padding is refused."""
        if attention_mask is not None and (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
            raise ValueError("MegatronCausalLM: left-padded rows are not supported (pad on the right)")
        if position_ids is None or not (position_ids[:, 1:] == 0).any():
            return None
        doc = (position_ids == 0).cumsum(dim=1)
        s = position_ids.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=position_ids.device).tril()
        return ~((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 32, do_sample: bool = False, stopping_criteria=None, **unused) -> torch.Tensor:
        """Greedy decoding of one or more unpadded prompts (no KV cache: each token re-reads the prefix)."""
        if do_sample:
            raise ValueError("MegatronCausalLM.generate decodes greedily only (do_sample=False)")
        ids = input_ids
        for _ in range(max_new_tokens):
            logits = self.forward(ids).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
            for criterion in stopping_criteria or []:
                criterion(ids, None)
            if all(int(t) in self.eos_token_ids for t in ids[:, -1]):
                break
        return ids


def load_megatron_lm(model_dir: str | Path, *, dtype: torch.dtype, device: torch.device,
                     sequence_parallel: bool = False) -> MegatronCausalLM:
    """The HF checkpoint at ``model_dir`` as this rank's shards of a GPTModel, projections exposed for KaSA.
    megatron parallel_state must be initialized (its TP group splits the model). ``sequence_parallel`` (TP > 1):
    megatron's sequence parallelism (CUDA: its sequence-parallel linears allocate their buffers there)."""
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(model_dir)
    family = family_of(hf_config)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    check_supported(hf_config, family, tp, pp)
    layout = Layout.of(hf_config, tp, tp_rank, pp, pp_rank)
    gpt = build_gpt(hf_config, family, layout, dtype=dtype, device=device, sequence_parallel=sequence_parallel)
    load_hf_checkpoint(gpt, model_dir, family, layout)
    expose_projections(gpt, layout)
    pipeline = None
    if pp > 1:
        pipeline = (ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_prev_rank(),
                    ps.get_pipeline_model_parallel_next_rank(), ps.get_pipeline_model_parallel_last_rank())
    model = MegatronCausalLM(gpt.to(device), layout, family, hf_config, ps.get_tensor_model_parallel_group(),
                             pipeline)
    model.config._name_or_path = str(model_dir)
    return model


__all__ = ["MegatronCausalLM", "SDPACoreAttention", "build_gpt", "load_megatron_lm", "rope_settings",
           "CausalLMOutput"]
