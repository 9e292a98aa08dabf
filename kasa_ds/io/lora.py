"""Exact LoRA export: a KaSA adapter as a plain PEFT LoRA of rank 2r on the original, untruncated base.

    W_world + ΔW = W − L·R + s·ΔU·diag(ΔΣ)·ΔVᵀ = W + B·A   with   B = [−L | s·ΔU·diag(ΔΣ)]  (m × 2r)
                                                                 A = [R ; ΔVᵀ]              (2r × n)
and ``lora_alpha = 2r`` (PEFT's scaling α/r = 1). L = U_tΣ_t, R = V_tᵀ is the dropped tail: recomputed from the
original weights (as training computed it, :mod:`kasa_ds.io.tails`), read from an SVD cache, or — for a QKaSA
``low_rank_correction`` adapter — the correction itself, so the unchanged 4-bit base is served. The files hold only
``lora_A``/``lora_B`` (and modules_to_save) tensors: what LoRA servers (vLLM, TGI, SGLang) and PEFT load.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import KaSAConfig
from ..core.experts import FUSED, ExpertsLayout, expert_layers, experts_layout, projection_weight
from ..core.layer import kasa_layers
from ..core.truncation import tail_factors
from ..comm.collectives import rank
from ..core import fingerprint
from ..inject import FINGERPRINT_ATTR, get_config
from .adapter import (CONFIG_FILE, PREFIX, WEIGHTS_FILE, adapter_metadata, base_quantization, check_finite,
                      adapter_param_items, gathered_adapter_state, read_adapter_config, read_adapter_tensors,
                      read_base_fingerprint, read_base_quantization)
from .files import atomic_directory, check_output_dir
from .expert_checkpoint import expert_weights
from .hf_checkpoint import list_tensors, module_key, read_tensor
from .svd_cache import SVDCache
from .tails import BaseCheck, base_and_tail, check_adapter_shape

Base = Union[str, os.PathLike, nn.Module, None]
#: vLLM's allowed --max-lora-rank values (vllm.config.LoRAConfig); a LoRA above the largest does not load
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: the only modules_to_save vLLM loads with a LoRA: a classification head
VLLM_HEADS = ("classifier", "score")
SERVERS = ("peft", "vllm")


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts for a LoRA of ``rank`` (ValueError above its largest)."""
    fits = [v for v in VLLM_MAX_LORA_RANKS if v >= rank]
    if not fits:
        raise ValueError(f"the exported LoRA has rank 2r = {rank}, above vLLM's largest --max-lora-rank "
                         f"{VLLM_MAX_LORA_RANKS[-1]}: train with r ≤ {VLLM_MAX_LORA_RANKS[-1] // 2}, or merge the adapter "
                         "(tools/merge.py) and serve the merged model")
    return fits[0]


def check_server(keys, config: KaSAConfig, server: str) -> None:
    """Refuse, before anything is written, what ``server`` would refuse to load (``peft`` loads everything)."""
    if server not in SERVERS:
        raise ValueError(f"unknown server {server!r}; choose one of {', '.join(SERVERS)}")
    if server != "vllm":
        return
    vllm_max_lora_rank(2 * config.r)
    extra = [k[len(PREFIX):] for k in keys if ".lora_" not in k
             and not set(k[len(PREFIX):].split(".")[:-1]) & set(VLLM_HEADS)]
    if extra:
        raise ValueError(f"vLLM loads no modules_to_save tensor but a classification head ({'/'.join(VLLM_HEADS)}); "
                         f"this adapter trains {len(extra)} more (e.g. {extra[0]}): serve the merged model "
                         "(tools/merge.py), retrain without them (kasa.modules_to_save), or export for PEFT "
                         "(--server peft)")


def lora_pair(state: dict[str, torch.Tensor], name: str, config: KaSAConfig, left: torch.Tensor,
              right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A 2r×n, lora_B m×2r), float32, of one adapted module ``name`` from PEFT-keyed KaSA ``state``."""
    return rank_2r(state[f"{PREFIX}{name}.lora_A.weight"], state[f"{PREFIX}{name}.lora_B.weight"],
                   state[f"{PREFIX}{name}.lora_diag"], left, right, config.scaling)


def rank_2r(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
            scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A = [R ; ΔVᵀ] (2r×n), B = [−L | s·ΔU·diag(ΔΣ)] (m×2r), float32, from one weight's factors and tail."""
    return torch.cat([right.float(), a.float()]), torch.cat([-left.float(), b.float() * d.float() * scaling], dim=1)


#: one experts module of an adapter, as the LoRA export sees it: (its name, the original module (real or on the meta
#: device: its fused parameter names), its layout, the projections adapted)
ExpertsModule = tuple[str, nn.Module, ExpertsLayout, tuple[str, ...]]


def expert_lora_state(modules: list[ExpertsModule], weights: Callable[[str, ExpertsLayout, str], torch.Tensor],
                      kasa: dict[str, torch.Tensor], config: KaSAConfig,
                      check: Optional[Callable[[str, torch.Tensor], None]] = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """PEFT ``target_parameters`` LoRA tensors (lora.ParamWrapper's layout) of every adapted fused experts module,
    and their ranks (rank_pattern): per fused parameter and expert e, B_e·A_e = the rank-2r update of each of its
    projections (gate and up side by side in gate_up_proj: rank 4r), placed in the parameter's row layout.
    ``weights(name, layout, projection)``: the original (E, m, n) weights, for the dropped tails (from a model or a
    checkpoint); ``check(key, weights)``: the base check of each projection's weights as read.

    PEFT stores lora_A as (E·ρ, n) expert-major and lora_B as (m, ρ·E) expert-minor, nests one ParamWrapper per
    parameter in the module's registration order (the last outermost: ``<module>.lora_A``, the one before
    ``<module>.base_layer.lora_A``)."""
    state, ranks = {}, {}
    for name, original, layout, adapted in modules:
        fused = [f for f in ("gate_up_proj", "up_proj", "down_proj") if hasattr(original, f)
                 and set(FUSED[f]) & set(adapted) and (f != "up_proj" or not layout.has_gate)]
        for depth, param in enumerate(reversed(fused)):
            parts = [p for p in FUSED[param] if p in adapted]
            rho = 2 * config.r * len(parts)
            m, n = (layout.hidden, layout.intermediate) if param == "down_proj" else (
                layout.intermediate * len(FUSED[param]), layout.hidden)
            a_all = torch.zeros(layout.num_experts, rho, n)
            b_all = torch.zeros(layout.num_experts, m, rho)
            rows = torch.arange(m).view(-1, len(FUSED[param])) if not layout.concatenated else \
                torch.arange(m).view(len(FUSED[param]), -1).T  # rows[:, i]: the rows of projection i
            for i, p in enumerate(FUSED[param]):
                if p not in parts:
                    continue
                j = parts.index(p) * 2 * config.r
                key = f"{PREFIX}{name}.{p}."
                stacked = weights(name, layout, p)
                if check is not None:
                    check(f"{name}.{p}", stacked)
                for e in range(layout.num_experts):
                    tail = tail_factors(stacked[e], config.r, config.svd_solver, name=f"{name}.{p}[expert {e}]")
                    a, b = rank_2r(kasa[key + "lora_A.weight"][e], kasa[key + "lora_B.weight"][e],
                                   kasa[key + "lora_diag"][e], tail.left.cpu(), tail.right.cpu(), config.scaling)
                    a_all[e, j:j + 2 * config.r] = a
                    b_all[e, rows[:, i], j:j + 2 * config.r] = b
            key = f"{PREFIX}{name}.{'base_layer.' * depth}"
            state[key + "lora_A.weight"] = a_all.reshape(-1, n)
            state[key + "lora_B.weight"] = b_all.permute(1, 2, 0).reshape(m, -1)
            ranks[f"{name.rsplit('.', 1)[-1]}.{param}"] = rho
    return state, ranks


def _check_experts(same_base: BaseCheck, key: str, weights: torch.Tensor) -> None:
    """The base check of one experts projection: its experts stacked ((E·m) × n), as the fingerprint records it."""
    stacked = weights.reshape(-1, weights.shape[-1])
    same_base(key, stacked, stacked.float(), None)


def experts_in_checkpoint(base_dir: str | os.PathLike, kasa: dict[str, torch.Tensor]) -> list[ExpertsModule]:
    """The experts modules an adapter adapts (its 3-D factors), read from the checkpoint's config.json: the model is
    built on the meta device (no weight read) for each module's layout and fused parameter names."""
    from transformers import AutoConfig, AutoModelForCausalLM

    adapted: dict[str, list[str]] = {}
    for key, value in kasa.items():
        if key.endswith(".lora_A.weight") and value.dim() == 3:
            module, projection = key[len(PREFIX):].removesuffix(".lora_A.weight").rsplit(".", 1)
            adapted.setdefault(module, []).append(projection)
    if not adapted:
        return []
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
    modules = []
    for name, projections in adapted.items():
        module = model.get_submodule(name)
        modules.append((name, module, experts_layout(module), tuple(sorted(projections))))
    return modules


def lora_config(config: KaSAConfig, base_model_name_or_path: Optional[str], task_type: Optional[str],
                expert_ranks: Optional[dict[str, int]] = None) -> dict:
    """PEFT LoraConfig fields of the exported adapter: rank 2r, lora_alpha 2r, no KaSA fields; fused experts as
    ``target_parameters`` with their ranks in rank_pattern / alpha_pattern (scaling 1 throughout)."""
    d = config.to_peft_dict(base_model_name_or_path, task_type)
    d.pop("kasa_config")
    d.update(r=2 * config.r, lora_alpha=2 * config.r)
    if expert_ranks:
        d.update(target_parameters=sorted(expert_ranks), rank_pattern=dict(expert_ranks),
                 alpha_pattern=dict(expert_ranks))
    return d


def _refuse_requantize(config: KaSAConfig, quantization: Optional[dict]) -> None:
    if quantization is not None and config.quant_mode == "requantize":
        raise ValueError("a quant_mode=requantize adapter replaced its quantized base by Q(W_world): no LoRA on the "
                         "original base reproduces it. Merge it (tools/merge.py), or train with "
                         "kasa.quant_mode=low_rank_correction to serve a shared 4-bit base")


def is_lora_export_dir(path: Path) -> bool:
    """An earlier LoRA export: a PEFT LoRA adapter_config.json without KaSA fields."""
    try:
        config = json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return config.get("peft_type") == "LORA" and not config.get("kasa_config")


def _write(out_dir, state: dict, config: dict) -> Path:
    check_finite(state, f"LoRA export to {out_dir}")  # a base holding NaN/inf gives non-finite tails: nothing written
    with atomic_directory(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return Path(out_dir)


def export_lora_files(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, base_dir: str | os.PathLike,
                      svd_cache: Optional[str | os.PathLike] = None, allow_other_base: bool = False,
                      server: str = "peft") -> Path:
    """A KaSA adapter directory → a LoRA adapter directory, the tails recomputed from the original checkpoint
    ``base_dir`` one weight at a time (memory: one weight), or read from ``svd_cache``. ``base_dir`` must be the base
    the adapter was trained on (its recorded fingerprint; ``allow_other_base``: a base changed on purpose)."""
    check_output_dir(out_dir, is_lora_export_dir, sources=[adapter_dir], models=[base_dir])
    return _write(out_dir, *lora_state_from_files(adapter_dir, base_dir, svd_cache, allow_other_base, server))


def lora_state_from_files(adapter_dir: str | os.PathLike, base_dir: str | os.PathLike,
                          svd_cache: Optional[str | os.PathLike] = None, allow_other_base: bool = False,
                          server: str = "peft") -> tuple[dict[str, torch.Tensor], dict]:
    """The rank-2r LoRA of a KaSA adapter directory, in memory: (PEFT state dict, PEFT LoraConfig fields); see
    :func:`export_lora_files`."""
    config = read_adapter_config(adapter_dir)
    quantization = read_base_quantization(adapter_dir)
    _refuse_requantize(config, quantization)
    kasa = read_adapter_tensors(adapter_dir)
    check_finite(kasa, str(Path(adapter_dir) / WEIGHTS_FILE))
    check_server(kasa, config, server)
    same_base = BaseCheck(read_base_fingerprint(adapter_dir), adapter_dir, str(base_dir), allow_other_base)
    tensors = list_tensors(base_dir)
    keys = set(tensors)
    cache = SVDCache(svd_cache, base_dir, config) if svd_cache else None
    state = {k: v for k, v in kasa.items() if ".lora_" not in k}  # modules_to_save
    experts = experts_in_checkpoint(base_dir, kasa)
    expert_names = {f"{name}.{p}" for name, _, _, projections in experts for p in projections}
    for name in sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in kasa if ".lora_" in k} - expert_names):
        key = module_key(name, keys)
        if key is None:
            raise ValueError(f"adapter module {name} has no weight in {base_dir}; wrong base model?")
        weight = read_tensor(base_dir, tensors[key + ".weight"], key + ".weight")
        check_adapter_shape(name, weight, kasa, base_dir)
        x, left, right = base_and_tail(weight, key, config, quantization, cache)
        same_base(name, weight, x, quantization)
        state[f"{PREFIX}{name}.lora_A.weight"], state[f"{PREFIX}{name}.lora_B.weight"] = lora_pair(
            kasa, name, config, left, right)
    expert_state, ranks = expert_lora_state(experts, partial(expert_weights, base_dir, tensors), kasa, config,
                                            check=partial(_check_experts, same_base))
    state.update(expert_state)
    peft = json.loads((Path(adapter_dir) / CONFIG_FILE).read_text())
    return state, lora_config(config, peft.get("base_model_name_or_path"), peft.get("task_type"), ranks)


def export_lora_adapter(model: nn.Module, out_dir: str | os.PathLike, base: Base = None, *,
                        allow_other_base: bool = False, server: str = "peft") -> Optional[Path]:
    """Write the adapted ``model``'s exact rank-2r LoRA to ``out_dir`` (rank 0; collective when the adapter is
    sharded: call on every rank). ``base``: the original model (an nn.Module with the same module names) or its
    checkpoint directory, needed unless every layer keeps its tail as a correction (QKaSA low_rank_correction); it
    must be the base the model was adapted from (``allow_other_base``: a base changed on purpose). ``server="vllm"``
    refuses first what vLLM would not load (:func:`check_server`)."""
    _check_model(model, server)
    check_output_dir(out_dir, is_lora_export_dir, models=[base] if isinstance(base, (str, os.PathLike)) else [])
    lora = lora_state_from_model(model, base, allow_other_base=allow_other_base, server=server)
    return None if lora is None else _write(out_dir, *lora)


def _check_model(model: nn.Module, server: str) -> tuple[KaSAConfig, Optional[dict]]:
    """Refuse what ``server`` would not load and a requantized base; (the adapter's config, its base quantization)."""
    config = get_config(model)
    check_server([PREFIX + key for key, _ in adapter_param_items(model)], config, server)
    quantization = base_quantization(model)
    _refuse_requantize(config, quantization)
    return config, quantization


def lora_state_from_model(model: nn.Module, base: Base = None, *, allow_other_base: bool = False,
                          server: str = "peft") -> Optional[tuple[dict[str, torch.Tensor], dict]]:
    """The adapted ``model``'s rank-2r LoRA, in memory on rank 0: (PEFT state dict, PEFT LoraConfig fields); None on
    the other ranks (collective when the adapter is sharded). See :func:`export_lora_adapter`."""
    config, quantization = _check_model(model, server)
    kasa = gathered_adapter_state(model)
    if rank() != 0:
        return None
    tensors = list_tensors(base) if isinstance(base, (str, os.PathLike)) else None
    keys = set(tensors) if tensors is not None else set()
    recorded = getattr(model, FINGERPRINT_ATTR, None)
    same_base = BaseCheck({"base": adapter_metadata(model)["base_model_name_or_path"],
                           "digest": fingerprint.digest(recorded), "layers": recorded} if recorded else None,
                          "export_lora_adapter", str(base), allow_other_base, fix="allow_other_base=True")
    state = {k: v for k, v in kasa.items() if ".lora_" not in k}
    for name, layer in kasa_layers(model):
        if layer.tail_left is not None:
            left, right = layer.tail_left, layer.tail_right
        elif base is None:
            raise ValueError(f"{name}: the truncated base no longer holds the dropped tail; pass base= the original "
                             "model or its checkpoint directory")
        else:
            if tensors is None:
                weight = base.get_submodule(name).weight.detach()
            elif (key := module_key(name, keys)) is None:
                raise ValueError(f"{name} has no weight in {base}; wrong base model?")
            else:
                weight = read_tensor(base, tensors[key + ".weight"], key + ".weight")
            check_adapter_shape(name, weight, kasa, base)
            x, left, right = base_and_tail(weight, name if tensors is None else key, config, quantization)
            same_base(name, weight, x, quantization)
        state[f"{PREFIX}{name}.lora_A.weight"], state[f"{PREFIX}{name}.lora_B.weight"] = lora_pair(
            kasa, name, config, left.cpu(), right.cpu())
    if isinstance(base, nn.Module):
        modules = [(name, base.get_submodule(name), layer.layout, tuple(layer.lora)) for name, layer in expert_layers(model)]
        weights = lambda name, layout, p: projection_weight(base.get_submodule(name), layout, p).detach()  # noqa: E731
    else:
        modules, weights = experts_in_checkpoint(base, kasa), partial(expert_weights, base, tensors)
    experts, ranks = expert_lora_state(modules, weights, kasa, config, check=partial(_check_experts, same_base))
    state.update(experts)
    meta = adapter_metadata(model)
    return state, lora_config(config, meta["base_model_name_or_path"], meta["task_type"], ranks)
