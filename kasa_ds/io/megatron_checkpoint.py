"""Hugging Face dense decoder checkpoints ↔ megatron-core GPTModel shards: one table per model family.

A rank reads only its own tensor-parallel slices of its own layers, straight from the safetensors files (slices of
the stored tensors; nothing is unpickled, no rank ever holds the model). Before any byte is read, every tensor the
model needs is checked against the checkpoint's headers: a missing, unexpected or misshapen name is one ``error:``
listing them all (``MegatronCheckpointError``).

megatron-core (local layer spec), TP rank i of t           HF (Llama, Mistral, SmolLM2, Qwen2, Qwen3)
    embedding.word_embeddings.weight   rows i of V_pad/t      model.embed_tokens.weight (V_pad − V rows zero)
    decoder.layers.L.input_layernorm.weight                   model.layers.L.input_layernorm.weight
    decoder.layers.L.self_attention.linear_qkv.weight/bias    self_attn.{q,k,v}_proj (per query group: fused.qkv_rows)
    decoder.layers.L.self_attention.{q,k}_layernorm.weight    self_attn.{q,k}_norm.weight (Qwen3)
    decoder.layers.L.self_attention.linear_proj.weight  cols  self_attn.o_proj.weight
    decoder.layers.L.pre_mlp_layernorm.weight                 post_attention_layernorm.weight
    decoder.layers.L.mlp.linear_fc1.weight  [gate_i; up_i]    mlp.gate_proj.weight, mlp.up_proj.weight
    decoder.layers.L.mlp.linear_fc2.weight             cols   mlp.down_proj.weight
    decoder.final_layernorm.weight                            model.norm.weight
    output_layer.weight                rows i of V_pad/t      lm_head.weight (absent when the embeddings are tied)

Adding a family is one :class:`Family` row: its HF ``model_type`` values and the per-layer tensors it adds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from .hf_checkpoint import TensorInfo, list_tensors

COPY, COLUMNS, QKV, GLU, VOCAB = "copy", "columns", "qkv", "glu", "vocab"

#: per layer: megatron name → (how it is split, HF names under model.layers.L)
LLAMA_LAYER: dict[str, tuple[str, tuple[str, ...]]] = {
    "input_layernorm.weight": (COPY, ("input_layernorm.weight",)),
    "self_attention.linear_qkv.weight": (QKV, ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                               "self_attn.v_proj.weight")),
    "self_attention.linear_proj.weight": (COLUMNS, ("self_attn.o_proj.weight",)),
    "pre_mlp_layernorm.weight": (COPY, ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.weight": (GLU, ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": (COLUMNS, ("mlp.down_proj.weight",)),
}
QKV_BIAS = {"self_attention.linear_qkv.bias": (QKV, ("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                                     "self_attn.v_proj.bias"))}
QK_NORM = {"self_attention.q_layernorm.weight": (COPY, ("self_attn.q_norm.weight",)),
           "self_attention.k_layernorm.weight": (COPY, ("self_attn.k_norm.weight",))}
OUTER: dict[str, tuple[str, tuple[str, ...]]] = {
    "embedding.word_embeddings.weight": (VOCAB, ("model.embed_tokens.weight",)),
    "decoder.final_layernorm.weight": (COPY, ("model.norm.weight",)),
    "output_layer.weight": (VOCAB, ("lm_head.weight",)),
}

#: HF projection → (the megatron linear computing it, within a layer; its HF parent module)
PROJECTIONS: dict[str, tuple[str, str]] = {
    "q_proj": ("self_attention.linear_qkv", "self_attn"), "k_proj": ("self_attention.linear_qkv", "self_attn"),
    "v_proj": ("self_attention.linear_qkv", "self_attn"), "o_proj": ("self_attention.linear_proj", "self_attn"),
    "gate_proj": ("mlp.linear_fc1", "mlp"), "up_proj": ("mlp.linear_fc1", "mlp"),
    "down_proj": ("mlp.linear_fc2", "mlp"),
}
#: HF checkpoint tensors that carry no weight (older checkpoints store the RoPE frequencies)
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layer: dict = field(default_factory=lambda: dict(LLAMA_LAYER))
    qkv_bias: bool = False  # Qwen2: q/k/v have biases (o_proj none)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "mistral")),
    Family("qwen2", ("qwen2",), {**LLAMA_LAYER, **QKV_BIAS}, qkv_bias=True),
    Family("qwen3", ("qwen3",), {**LLAMA_LAYER, **QK_NORM}, qk_norm=True),
)


class MegatronCheckpointError(ValueError):
    """A checkpoint or config the Megatron road cannot load; the message names every problem and the fix."""


def family_of(hf_config) -> Family:
    model_type = getattr(hf_config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise MegatronCheckpointError(f"model_type {model_type!r} has no Megatron mapping (known: {known}); train it on "
                                  "the Hugging Face road (drop backend: megatron)")


@dataclass(frozen=True)
class Layout:
    """The shapes of one HF model as megatron-core splits them over ``tp_size`` TP ranks and ``pp_size`` pipeline
    stages (this rank: ``tp_rank`` of stage ``pp_rank``, which holds the layers :attr:`stage_layers`)."""

    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int
    layers: int
    tied: bool
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0

    @classmethod
    def of(cls, hf_config, tp_size: int = 1, tp_rank: int = 0, pp_size: int = 1, pp_rank: int = 0) -> "Layout":
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        return cls(hf_config.hidden_size, heads, getattr(hf_config, "num_key_value_heads", None) or heads, head_dim,
                   hf_config.intermediate_size, hf_config.vocab_size, hf_config.num_hidden_layers,
                   bool(getattr(hf_config, "tie_word_embeddings", False)), tp_size, tp_rank, pp_size, pp_rank)

    @property
    def stage_layers(self) -> range:
        """The decoder layers (global indices) of this pipeline stage: megatron's even split."""
        per = self.layers // self.pp_size
        return range(self.pp_rank * per, (self.pp_rank + 1) * per)

    @property
    def padded_vocab(self) -> int:
        """The vocabulary padded to a multiple of the TP size (megatron splits it evenly); padded logits are masked."""
        return math.ceil(self.vocab / self.tp_size) * self.tp_size

    def qkv_rows(self) -> dict[str, torch.Tensor]:
        """{q, k, v: the rows of this rank's linear_qkv shard holding that projection's rows, in its own order}: for
        each of its G/t query groups, [the group's q heads (hpg·d); k (d); v (d)]."""
        hpg, d = self.heads // self.groups, self.head_dim
        starts = (torch.arange(self.groups // self.tp_size) * (hpg + 2) * d)[:, None]
        q = (starts + torch.arange(hpg * d)).flatten()
        k = (starts + hpg * d + torch.arange(d)).flatten()
        return {"q": q, "k": k, "v": k + d}

    def projection_rows(self) -> dict[str, tuple[str, Optional[torch.Tensor], int]]:
        """{HF projection: (the megatron linear computing it within a layer, its rows of that linear's local shard
        (None: all), its unsplit output width)}; linear_fc1 holds [gate_i; up_i]."""
        f = self.ffn // self.tp_size
        rows = {**{f"{p}_proj": r for p, r in self.qkv_rows().items()},
                "gate_proj": torch.arange(f), "up_proj": torch.arange(f, 2 * f)}
        width = {"q_proj": self.heads * self.head_dim, "k_proj": self.groups * self.head_dim,
                 "v_proj": self.groups * self.head_dim, "o_proj": self.hidden, "gate_proj": self.ffn,
                 "up_proj": self.ffn, "down_proj": self.hidden}
        return {p: (linear, rows.get(p), width[p]) for p, (linear, _) in PROJECTIONS.items()}

    def hf_shapes(self, family: Family) -> dict[str, tuple[int, ...]]:
        """Every tensor the HF checkpoint must hold, with its shape."""
        q, kv = self.heads * self.head_dim, self.groups * self.head_dim
        per_layer = {"input_layernorm.weight": (self.hidden,), "post_attention_layernorm.weight": (self.hidden,),
                     "self_attn.q_proj.weight": (q, self.hidden), "self_attn.k_proj.weight": (kv, self.hidden),
                     "self_attn.v_proj.weight": (kv, self.hidden), "self_attn.o_proj.weight": (self.hidden, q),
                     "mlp.gate_proj.weight": (self.ffn, self.hidden), "mlp.up_proj.weight": (self.ffn, self.hidden),
                     "mlp.down_proj.weight": (self.hidden, self.ffn)}
        if family.qkv_bias:
            per_layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                              "self_attn.v_proj.bias": (kv,)})
        if family.qk_norm:
            per_layer.update({"self_attn.q_norm.weight": (self.head_dim,), "self_attn.k_norm.weight": (self.head_dim,)})
        shapes = {f"model.layers.{i}.{k}": v for i in range(self.layers) for k, v in per_layer.items()}
        shapes.update({"model.embed_tokens.weight": (self.vocab, self.hidden), "model.norm.weight": (self.hidden,)})
        if not self.tied:
            shapes["lm_head.weight"] = (self.vocab, self.hidden)
        return shapes


def check_checkpoint(model_dir: str | Path, family: Family, layout: Layout) -> dict[str, TensorInfo]:
    """Every tensor the model needs is in the checkpoint with its shape, and nothing else is: else one error naming
    them (headers only; call before building or reading anything). Returns the headers' listing."""
    listing = list_tensors(model_dir)
    stored = {k: v for k, v in listing.items() if not IGNORED.match(k)}
    wanted = layout.hf_shapes(family)
    if layout.tied:
        stored.pop("lm_head.weight", None)  # some tied checkpoints store the head too; the embedding is used
    missing = sorted(set(wanted) - set(stored))
    unexpected = sorted(set(stored) - set(wanted))
    misshapen = [f"{k} {tuple(stored[k].shape)} (expected {wanted[k]})" for k in sorted(set(wanted) & set(stored))
                 if tuple(stored[k].shape) != wanted[k]]
    problems = ([f"missing: {', '.join(missing[:6])}{' …' if len(missing) > 6 else ''}"] if missing else []) + \
        ([f"unexpected: {', '.join(unexpected[:6])}{' …' if len(unexpected) > 6 else ''}"] if unexpected else []) + \
        ([f"wrong shape: {', '.join(misshapen[:6])}"] if misshapen else [])
    if problems:
        raise MegatronCheckpointError(f"{model_dir} does not match its config.json as a {family.name} model "
                                      f"({'; '.join(problems)}): point model.path at the checkpoint this "
                                      "config belongs to")
    return listing


class _Reader:
    """Slices of stored tensors, each file opened once (safetensors: memory-mapped, nothing unpickled)."""

    def __init__(self, model_dir: str | Path, stored: dict[str, TensorInfo]) -> None:
        self.dir, self.stored = Path(model_dir), stored
        self.files: dict[str, object] = {}

    def width(self, key: str) -> int:
        """The stored tensor's column count (from its header)."""
        return self.stored[key].shape[1]

    def __call__(self, key: str, dim: int = 0, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        name = self.stored[key].file
        if name not in self.files:
            self.files[name] = safe_open(str(self.dir / name), "pt")
        part = self.files[name].get_slice(key)
        stop = part.get_shape()[dim] if stop is None else stop
        return part[start:stop] if dim == 0 else part[:, start:stop]


def _shard(kind: str, hf: tuple[str, ...], read: _Reader, layout: Layout) -> torch.Tensor:
    """This TP rank's megatron tensor, read from the HF tensors ``hf``."""
    t, i = layout.tp_size, layout.tp_rank
    if kind == COPY:
        return read(hf[0])
    if kind == COLUMNS:
        n = read.width(hf[0])
        return read(hf[0], 1, i * n // t, (i + 1) * n // t)
    if kind == GLU:
        f = layout.ffn // t
        return torch.cat([read(name, 0, i * f, (i + 1) * f) for name in hf])
    if kind == QKV:
        rows = layout.qkv_rows()
        parts = [read(name, 0, i * len(rows[p]), (i + 1) * len(rows[p])) for name, p in zip(hf, "qkv")]
        fused = parts[0].new_empty(sum(len(x) for x in parts), *parts[0].shape[1:])
        for part, p in zip(parts, "qkv"):
            fused[rows[p]] = part
        return fused
    if kind == VOCAB:
        per = layout.padded_vocab // t
        start, stop = i * per, min((i + 1) * per, layout.vocab)
        rows = read(hf[0], 0, start, stop)
        return torch.cat([rows, rows.new_zeros(per - rows.shape[0], *rows.shape[1:])]) if rows.shape[0] < per else rows
    raise AssertionError(kind)


def megatron_names(family: Family, layout: Layout) -> dict[str, tuple[str, tuple[str, ...]]]:
    """megatron name (GPTModel, layers numbered from 0 on this stage) → (kind, HF names) for this rank's stage; the
    embedding and output layer wherever a stage may hold them (the output layer of a tied model is the embedding:
    megatron keeps a copy on the last stage when there are several)."""
    names = {}
    for local, layer in enumerate(layout.stage_layers):
        for m, (kind, hf) in family.layer.items():
            names[f"decoder.layers.{local}.{m}"] = (kind, tuple(f"model.layers.{layer}.{h}" for h in hf))
    names.update(OUTER)
    if layout.tied:
        names["output_layer.weight"] = OUTER["embedding.word_embeddings.weight"]
    return names


@torch.no_grad()
def load_hf_checkpoint(model: nn.Module, model_dir: str | Path, family: Family, layout: Layout) -> None:
    """Fill a GPTModel (this rank's TP shards of its stage's layers) from the HF checkpoint, slice by slice. Every
    parameter must be written with its exact shape, else MegatronCheckpointError naming it."""
    stored = check_checkpoint(model_dir, family, layout)
    table = megatron_names(family, layout)
    params = dict(model.named_parameters())
    left_out = sorted(set(params) - set(table))
    if left_out:
        raise MegatronCheckpointError(f"the megatron model has parameters the {family.name} mapping does not fill: "
                                      f"{', '.join(left_out[:6])} (a megatron-core version with other names?)")
    read = _Reader(model_dir, stored)
    for name, param in params.items():
        value = _shard(*table[name], read, layout)
        if tuple(value.shape) != tuple(param.shape):
            raise MegatronCheckpointError(f"{name}: the checkpoint gives {tuple(value.shape)} for this rank, the "
                                          f"model holds {tuple(param.shape)} (tensor_parallel must divide heads, "
                                          "query groups and the MLP width)")
        param.copy_(value)
        # megatron-core's mark of a tensor split over TP (its own initialization sets it; the import skips that)
        param.tensor_model_parallel = table[name][0] != COPY


@torch.no_grad()
def hf_state(model: nn.Module, family: Family, layout: Layout, group=None) -> dict[str, torch.Tensor]:
    """The HF-named full tensors of this rank's stage of a GPTModel, on every rank of its TP group: each parameter is
    all-gathered over ``group`` and put back in the HF layout (inverse of :func:`load_hf_checkpoint`). For checks
    and small models: every rank ends up holding its whole stage."""
    t = layout.tp_size
    out = {}
    for name, (kind, hf) in megatron_names(family, layout).items():
        module_name, _, param = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue  # held by another pipeline stage
        local = getattr(getattr(module, "base_layer", module), param, None)  # also once wrapped for KaSA
        if not isinstance(local, torch.Tensor):
            continue  # the output layer of a tied model on one stage: the embedding itself
        local = local.detach()
        parts = [local] if t == 1 else [torch.empty_like(local) for _ in range(t)]
        if t > 1:
            dist.all_gather(parts, local.contiguous(), group=group)
        if kind == COPY:
            out[hf[0]] = local.clone()
        elif kind == COLUMNS:
            out[hf[0]] = torch.cat(parts, dim=1)
        elif kind == VOCAB:
            out[hf[0]] = torch.cat(parts)[: layout.vocab]
        elif kind == GLU:
            halves = [p.chunk(2) for p in parts]
            out[hf[0]], out[hf[1]] = torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])
        elif kind == QKV:
            rows = layout.qkv_rows()
            for key, p in zip(hf, "qkv"):
                out[key] = torch.cat([part[rows[p]] for part in parts])
    return out


_PROJECTION_NAME = re.compile(r"(?:.*\.)?decoder\.layers\.(\d+)\.(\w+)\.(linear_\w+)\.(\w+_proj)$")


def hf_module_name(name: str, layer_offset: int = 0) -> Optional[str]:
    """The HF module name of a megatron projection (``decoder.layers.3.self_attention.linear_qkv.q_proj`` →
    ``model.layers.3.self_attn.q_proj``; ``layer_offset``: this pipeline stage's first layer), None for another."""
    match = _PROJECTION_NAME.match(name)
    if match is None or match.group(4) not in PROJECTIONS:
        return None
    layer, proj = int(match.group(1)) + layer_offset, match.group(4)
    return f"model.layers.{layer}.{PROJECTIONS[proj][1]}.{proj}"
