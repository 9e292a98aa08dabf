"""save_adapter / load_adapter in PEFT's on-disk format for its KaSA variant.

A directory with
    adapter_config.json         LoraConfig fields with ``kasa_config: {beta, gamma}`` (peft_type LORA)
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight (r, n)
                                base_model.model.<module>.lora_B.weight (m, r)
                                base_model.model.<module>.lora_diag     (r,)
                                base_model.model.<module_to_save>.<param>
The truncated base is not stored: like PEFT, loading re-runs the truncation on the original base weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import KaSAConfig
from .inject import CONFIG_ATTR, KaSAReport, apply_kasa, modules_to_save
from .layer import kasa_layers
from .tp_shard import sharded_factor, split_factor, tp_layers
from .utils import atomic_directory

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
EXTRA_FILE = "kasa_ds_config.json"  # what PEFT's format has no field for (solver, adapter dtype, 4-bit mode)
EXTRA_KEYS = ("svd_solver", "adapter_dtype", "quant_mode")


def adapter_param_items(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name without PEFT's prefix, parameter) for every adapter and modules_to_save parameter, in a fixed order."""
    config = get_config(model)
    items = [(f"{name}.{pname}", p) for name, layer in kasa_layers(model) for pname, p in layer.adapter_parameters()]
    for name in modules_to_save(model, config):
        items += [(f"{name}.{pname}", p) for pname, p in model.get_submodule(name).named_parameters()]
    return items


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's key names, detached on CPU. For ZeRO-3 partitioned parameters use
    kasa_ds.zero.gathered_adapter_state (this function would see the empty local placeholders)."""
    return {PREFIX + key: p.detach().to("cpu").contiguous() for key, p in adapter_param_items(model)}


def save_adapter(model: nn.Module, path: str | os.PathLike, *, state: Optional[dict[str, torch.Tensor]] = None,
                 base_model_name_or_path: Optional[str] = None, task_type: Optional[str] = None) -> Path:
    """Write the adapter of ``model`` to directory ``path`` atomically (a temporary sibling renamed into place).

    ``state`` lets sharded callers pass tensors they gathered themselves (see kasa_ds.zero); by default the model's
    own parameters are taken.
    """
    config = get_config(model)
    state = adapter_state_dict(model) if state is None else state
    empty = [k for k, v in state.items() if v.numel() == 0]
    if not state or empty:
        raise RuntimeError(f"refusing to write an adapter with empty tensors ({empty[:3] or 'no tensors'}): the "
                           "parameters look partitioned; gather them first (kasa_ds.zero.gathered_adapter_state)")
    hf_config = getattr(model, "config", None)
    base = base_model_name_or_path or getattr(hf_config, "_name_or_path", None) or None
    task_type = task_type or _infer_task_type(model)
    with atomic_directory(path) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        with open(tmp / CONFIG_FILE, "w") as f:
            json.dump(config.to_peft_dict(base, task_type), f, indent=2)
        with open(tmp / EXTRA_FILE, "w") as f:
            extra = {k: getattr(config, k) for k in EXTRA_KEYS}
            quantization = base_quantization(model)
            if quantization is not None:
                extra["base_quantization"] = quantization
            json.dump(extra, f, indent=2)
    return Path(path)


def base_quantization(model: nn.Module) -> Optional[dict]:
    """How the adapted layers' 4-bit bases were quantized (what tools/merge.py needs to rebuild them from the 16-bit
    checkpoint), or None for a 16-bit base."""
    from .layer import kasa_layers
    from .quant import is_4bit

    for _, layer in kasa_layers(model):
        if is_4bit(layer.base_layer):
            w = layer.base_layer.weight
            dtype = getattr(getattr(model, "config", None), "dtype", None) or torch.float32
            return {"quant_type": w.quant_type, "double_quant": bool(w.compress_statistics),
                    "blocksize": w.blocksize, "from_dtype": str(dtype).removeprefix("torch.")}
    return None


def read_base_quantization(path: str | os.PathLike) -> Optional[dict]:
    extra = Path(path) / EXTRA_FILE
    return json.loads(extra.read_text()).get("base_quantization") if extra.is_file() else None


def read_adapter_config(path: str | os.PathLike) -> KaSAConfig:
    path = Path(path)
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a KaSA adapter directory: missing {', '.join(missing)}")
    with open(path / CONFIG_FILE) as f:
        config = KaSAConfig.from_peft_dict(json.load(f))
    if (path / EXTRA_FILE).is_file():  # absent in adapters written by PEFT
        with open(path / EXTRA_FILE) as f:
            extra = json.load(f)
        config = dataclasses.replace(config, **{k: v for k, v in extra.items() if k in EXTRA_KEYS})
    return config


def load_adapter(model: nn.Module, path: str | os.PathLike, *, svd_solver: Optional[str] = None,
                 show_progress: bool = True) -> Optional[KaSAReport]:
    """Load a PEFT-format KaSA adapter into ``model``.

    On a model without KaSA layers (the original base), the adapter's config is applied first, which truncates the
    base weights exactly as PEFT does on load; on an already adapted model only the weights are replaced. Returns
    the KaSAReport of the injection, or None if the model was already adapted.
    """
    config = read_adapter_config(path)
    if svd_solver is not None:
        config.svd_solver = svd_solver
    state = load_file(str(Path(path) / WEIGHTS_FILE))
    report = None
    if getattr(model, CONFIG_ATTR, None) is None:
        report = apply_kasa(model, config, show_progress=show_progress)
    elif model.kasa_config.r != config.r:
        raise ValueError(f"adapter at {path} has r={config.r} but the model was adapted with r={model.kasa_config.r}")
    load_adapter_state(model, state)
    return report


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy PEFT-keyed adapter tensors into ``model``; every adapter parameter must be present, nothing extra.

    On a tensor-parallel model a full-shape factor is cut to this rank's shard, so an adapter trained at any TP size
    (or on one process, or by PEFT) loads at any other."""
    expected = {PREFIX + key for key, _ in adapter_param_items(model)}
    unexpected = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state]
    if unexpected or missing:
        raise ValueError(f"adapter does not fit this model: {len(missing)} missing keys (e.g. {missing[:2]}), "
                         f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]}); was it trained on another "
                         "architecture or with other target_modules?")
    params = dict(model.named_parameters())
    shards = _tp_shards(model)
    with torch.no_grad():
        for key, value in state.items():
            param = params[key[len(PREFIX):]]
            if key[len(PREFIX):] in shards and tuple(param.shape) != tuple(value.shape):
                value = split_factor(value, shards[key[len(PREFIX):]], shards[key[len(PREFIX):]].tp_rank)
            if tuple(param.shape) != tuple(value.shape):
                raise ValueError(f"{key}: adapter tensor has shape {tuple(value.shape)}, model expects "
                                 f"{tuple(param.shape)}")
            param.copy_(value.to(param.dtype))


def _tp_shards(model: nn.Module) -> dict:
    """Parameter name → ShardSpec for every tensor-parallel layer's split factor (a full adapter is cut on load)."""
    return {f"{name}.{sharded_factor(layer.spec)}": layer.spec for name, layer in tp_layers(model)}


def get_config(model: nn.Module) -> KaSAConfig:
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError("model has no KaSA adapter: call kasa_ds.apply_kasa(model, config) or load_adapter first")
    return config


def _infer_task_type(model: nn.Module) -> Optional[str]:
    cls = type(model).__name__
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if cls.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    return None
