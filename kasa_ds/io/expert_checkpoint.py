"""Where a Hugging Face checkpoint stores each expert's projection, for the tools that work from files (the streamed
merge, the LoRA export).

transformers 5 holds routed experts fused (kasa_ds.core.experts), but writes and reads most families' checkpoints in
their released per-expert layout: ``<module>.<e>.gate_proj.weight`` (Qwen2/3-MoE, DeepSeek-V3, OLMoE) or, for
Mixtral, ``…block_sparse_moe.experts.<e>.w1/w3/w2.weight``. An experts adapter (factors ``[E, …]`` under
``<module>.<projection>``) is split here into per-expert 2-D factors under those checkpoint names, so the streamed
merge treats each expert's projection as the linear weight it is in the file (checkpoints that store the experts
fused, gpt-oss, are refused there by name); :func:`expert_weights` reads one projection of every expert, from either
layout.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from ..core.experts import PROJECTIONS, ExpertsLayout, projection_weight
from .adapter import PREFIX
from .hf_checkpoint import TensorInfo, module_key, read_tensor

#: per family, how the checkpoint renames the experts module and its projections (the first that matches wins)
LAYOUTS = (
    ("", {p: p for p in PROJECTIONS}),                                              # Qwen2/3-MoE, DeepSeek-V3, OLMoE
    (".block_sparse_moe", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}),  # Mixtral
)
FACTORS = ("lora_A.weight", "lora_B.weight", "lora_diag")


def expand_experts(state: dict[str, torch.Tensor], keys: set[str], base) -> dict[str, torch.Tensor]:
    """``state`` (a PEFT-keyed adapter) with every experts module's 3-D factors replaced by one 2-D set per expert,
    keyed by that expert's projection as ``keys`` (the checkpoint's tensor names) hold it. ValueError naming the
    module where the checkpoint has no per-expert weight for it (fused experts, or another model)."""
    out = {k: v for k, v in state.items() if not _is_expert_factor(k, state)}
    for key, a in state.items():
        if not (key.endswith(".lora_A.weight") and a.dim() == 3):
            continue
        module, projection = key[len(PREFIX):].removesuffix(".lora_A.weight").rsplit(".", 1)
        names = _checkpoint_names(module, projection, a.shape[0], keys)
        if names is None:
            raise ValueError(f"{base}: no per-expert weight for {module}.{projection} (looked for "
                             f"{module}.0.{projection}.weight and Mixtral's block_sparse_moe names): the checkpoint "
                             "stores its experts fused or is another model; merge in memory instead (load_adapter, "
                             "then merge_kasa(model).save_pretrained(DIR))")
        for e, name in enumerate(names):
            for factor in FACTORS:
                out[f"{PREFIX}{name}.{factor}"] = state[f"{PREFIX}{module}.{projection}.{factor}"][e]
    return out


def expert_weights(base_dir: str | os.PathLike, tensors: dict[str, TensorInfo], module: str, layout: ExpertsLayout,
                   projection: str) -> torch.Tensor:
    """(E, m, n): ``projection`` of every expert of ``module`` as the checkpoint stores it, one tensor per expert
    (Qwen-MoE, DeepSeek-V3, OLMoE, Mixtral names) or the module's fused parameters (gpt-oss) read and viewed as the
    model does (kasa_ds.core.experts.projection_weight). ValueError naming the module if neither is there."""
    keys = set(tensors)
    names = _checkpoint_names(module, projection, layout.num_experts, keys)
    if names is not None:
        return torch.stack([read_tensor(base_dir, tensors[n + ".weight"], n + ".weight") for n in names])
    fused = {p: f"{module}.{p}" for p in ("gate_up_proj", "up_proj", "down_proj") if f"{module}.{p}" in keys}
    if "down_proj" not in fused:
        raise ValueError(f"{base_dir}: no weights for the experts of {module} (neither per expert, e.g. "
                         f"{module}.0.{projection}.weight, nor fused, {module}.down_proj): is it the adapter's base?")
    held = SimpleNamespace(**{p: read_tensor(base_dir, tensors[k], k) for p, k in fused.items()})
    return projection_weight(held, layout, projection)


def _is_expert_factor(key: str, state: dict[str, torch.Tensor]) -> bool:
    stem = key.rsplit(".lora_", 1)[0]
    a = state.get(f"{stem}.lora_A.weight")
    return ".lora_" in key and a is not None and a.dim() == 3


def _checkpoint_names(module: str, projection: str, experts: int, keys: set[str]) -> list[str] | None:
    for renamed, names in LAYOUTS:
        stem = module.replace(".mlp.experts", f"{renamed}.experts") if renamed else module
        found = [module_key(f"{stem}.{e}.{names[projection]}", keys) for e in range(experts)]
        if all(found):
            return found
    return None
