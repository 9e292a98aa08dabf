"""The rank-2r LoRA export as a llama.cpp adapter GGUF, for llama.cpp (``--lora``) and Ollama (``ADAPTER``).

The tensors are the exact rank-2r LoRA of :mod:`kasa_ds.io.lora` (W + B·A = W_world + ΔW, scaling 1), written as
llama.cpp's ``convert_lora_to_gguf.py`` writes a PEFT LoRA:

- metadata ``general.type = adapter``, ``general.architecture``, ``adapter.type = lora``, ``adapter.lora.alpha = 2r``
  (llama.cpp scales each pair by alpha / rank, rank read from lora_b: 1 here);
- per adapted linear ``<gguf name>.weight.lora_a`` = A (2r × n) and ``.lora_b`` = B (m × 2r), named by gguf-py's
  own tensor map (``model.layers.3.self_attn.q_proj`` → ``blk.3.attn_q``);
- for the Llama family, the rows of q's and k's B permuted as llama.cpp's Llama conversion permutes q_proj/k_proj
  (its GGUF stores the rotary halves interleaved per head), so B·A lands on the GGUF base's rows.

The base is the original (untruncated) model converted by llama.cpp (``convert_hf_to_gguf.py``), at any precision.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from torch import nn

from .adapter import PREFIX, adapter_param_items, check_finite, read_adapter_tensors
from .files import atomic_file, check_output_file
from .lora import Base, lora_state_from_files, lora_state_from_model

try:
    import gguf
except ImportError:  # the optional extra kasa_ds[gguf]
    gguf = None


@dataclass(frozen=True)
class GGUFArchitecture:
    """How llama.cpp converts one Hugging Face architecture: its GGUF architecture name and whether q/k rows are
    permuted (the Llama conversion)."""
    name: str
    permute_qk: bool


#: the architectures whose LoRA llama.cpp's converter handles and this exporter writes (Llama tested against
#: llama.cpp itself; Mistral goes through the same llama.cpp conversion class and GGUF architecture)
ARCHITECTURES = {"LlamaForCausalLM": GGUFArchitecture("llama", True),
                 "MistralForCausalLM": GGUFArchitecture("llama", True)}
DTYPES = {"f32": np.float32, "f16": np.float16}
LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)|lm_head")


def _require_gguf() -> None:
    if gguf is None:
        raise ValueError("the GGUF export needs the gguf package (llama.cpp's gguf-py): pip install 'kasa_ds[gguf]'")


def gguf_architecture(model_config: dict) -> GGUFArchitecture:
    """The base's architecture as llama.cpp converts it; any other is refused by name."""
    names = model_config.get("architectures") or [model_config.get("model_type", "unknown")]
    if names[0] not in ARCHITECTURES:
        raise ValueError(f"no GGUF LoRA export for {names[0]}: this exporter writes {', '.join(ARCHITECTURES)} "
                         "adapters. Export --as-lora and convert it with llama.cpp's convert_lora_to_gguf.py, or merge "
                         "the adapter (tools/merge.py) and convert the merged model")
    return ARCHITECTURES[names[0]]


def check_gguf_modules(keys: Iterable[str], model_config: dict) -> None:
    """Refuse, before any work, adapter tensors a llama.cpp LoRA GGUF cannot hold (``keys``: adapter tensor names,
    with or without PEFT's prefix): modules_to_save, experts, any linear but q/k/v/o/gate/up/down (and an untied
    lm_head)."""
    names = {k.removeprefix(PREFIX) for k in keys}
    saved = sorted(k for k in names if ".lora_" not in k)
    if saved:
        raise ValueError(f"a llama.cpp LoRA GGUF holds only lora_a/lora_b pairs, not modules_to_save ({saved[0]}): "
                         "merge the adapter (tools/merge.py) and convert the merged model with llama.cpp's "
                         "convert_hf_to_gguf.py, or train without modules_to_save")
    for module in sorted({k.rsplit(".lora_", 1)[0] for k in names}):
        if not LINEAR.fullmatch(module):
            raise ValueError(f"{module}: not a linear llama.cpp's LoRA GGUF maps (q/k/v/o/gate/up/down_proj, lm_head); "
                             "export --as-lora for PEFT and vLLM instead")
        if module == "lm_head" and model_config.get("tie_word_embeddings", False):
            raise ValueError("lm_head is tied to the embeddings: llama.cpp's GGUF of this base has no output tensor to "
                             "adapt; train without lm_head in target_modules")


def permute_rows(b: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection (m × ·) in llama.cpp's Llama GGUF order: per head, its two rotary halves
    interleaved (the permutation ``convert_hf_to_gguf.py`` applies to q_proj/k_proj; ``n_head``: query heads for
    q, key-value heads for k)."""
    m = b.shape[0]
    return b.reshape(n_head, 2, m // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def gguf_lora_tensors(state: dict[str, torch.Tensor], model_config: dict) -> dict[str, torch.Tensor]:
    """A rank-2r PEFT LoRA state dict → llama.cpp adapter tensors by GGUF name (``.lora_a`` 2r × n, ``.lora_b``
    m × 2r), q/k's B rows permuted for the Llama family."""
    arch = gguf_architecture(model_config)
    model_arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch.name)
    names = gguf.get_tensor_name_map(model_arch, model_config["num_hidden_layers"])
    heads = model_config["num_attention_heads"]
    kv_heads = model_config.get("num_key_value_heads") or heads
    out = {}
    for key, tensor in state.items():
        module, part = key.removeprefix(PREFIX).rsplit(".lora_", 1)
        name = names.get_name(module)
        if name is None:
            raise ValueError(f"{module}: gguf-py knows no llama.cpp tensor for it")
        if part == "B.weight" and arch.permute_qk and module.endswith(("q_proj", "k_proj")):
            tensor = permute_rows(tensor, heads if module.endswith("q_proj") else kv_heads)
        out[f"{name}.weight.lora_{'a' if part == 'A.weight' else 'b'}"] = tensor
    return out


def write_gguf_lora(state: dict[str, torch.Tensor], lora_config: dict, model_config: dict,
                    out_file: str | os.PathLike, dtype: str = "f32") -> Path:
    """Write the rank-2r LoRA (``state``, ``lora_config``: :mod:`kasa_ds.io.lora`'s PEFT state and config fields) as
    a llama.cpp adapter GGUF at ``out_file`` (atomically)."""
    _require_gguf()
    check_finite(state, f"GGUF export to {out_file}")  # a base holding NaN/inf gives non-finite tails
    arch = gguf_architecture(model_config)
    tensors = gguf_lora_tensors(state, model_config)
    rank = lora_config["r"]
    wrong = [k for k, t in tensors.items() if k.endswith(".lora_b") and t.shape[1] != rank]
    if wrong:  # llama.cpp scales every pair by alpha / (its own rank): one alpha fits only equal ranks
        raise ValueError(f"{wrong[0]} has rank {tensors[wrong[0]].shape[1]}, not {rank}: a GGUF adapter holds one "
                         "alpha")
    with atomic_file(out_file) as tmp:
        writer = gguf.GGUFWriter(tmp, arch.name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora_config["lora_alpha"]))
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        if lora_config.get("base_model_name_or_path"):
            writer.add_name(f"KaSA LoRA of {Path(str(lora_config['base_model_name_or_path'])).name}")
        for name, tensor in tensors.items():
            writer.add_tensor(name, tensor.detach().float().cpu().numpy().astype(DTYPES[dtype]))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(out_file)


def _check(keys: Iterable[str], model_config: dict, out_file, dtype: str, models=()) -> None:
    _require_gguf()
    if dtype not in DTYPES:
        raise ValueError(f"GGUF dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    check_output_file(out_file, ".gguf", models=models)
    gguf_architecture(model_config)
    check_gguf_modules(keys, model_config)


def export_gguf_files(adapter_dir: str | os.PathLike, out_file: str | os.PathLike, base_dir: str | os.PathLike,
                      svd_cache: Optional[str | os.PathLike] = None, allow_other_base: bool = False,
                      dtype: str = "f32") -> Path:
    """A KaSA adapter directory → a llama.cpp adapter GGUF, the tails recomputed from the original checkpoint
    ``base_dir`` (as :func:`kasa_ds.io.lora.export_lora_files`); refusals come before any tail is computed."""
    model_config = json.loads((Path(base_dir) / "config.json").read_text())
    _check(read_adapter_tensors(adapter_dir), model_config, out_file, dtype, models=[base_dir])
    state, lora_config = lora_state_from_files(adapter_dir, base_dir, svd_cache, allow_other_base)
    return write_gguf_lora(state, lora_config, model_config, out_file, dtype)


def export_gguf_adapter(model: nn.Module, out_file: str | os.PathLike, base: Base = None, *,
                        allow_other_base: bool = False, dtype: str = "f32") -> Optional[Path]:
    """Write the adapted ``model``'s rank-2r LoRA as a llama.cpp adapter GGUF (rank 0; collective when the adapter
    is sharded: call on every rank). ``base`` as in :func:`kasa_ds.io.lora.export_lora_adapter`."""
    model_config = model.config.to_dict()
    model_config["architectures"] = model_config.get("architectures") or [type(model).__name__]  # built in memory
    _check([key for key, _ in adapter_param_items(model)], model_config, out_file, dtype,
           models=[base] if isinstance(base, (str, os.PathLike)) else [])
    lora = lora_state_from_model(model, base, allow_other_base=allow_other_base)
    return None if lora is None else write_gguf_lora(*lora, model_config, out_file, dtype)
