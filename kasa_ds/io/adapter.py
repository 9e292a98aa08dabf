"""save_adapter / load_adapter in PEFT's on-disk format for its KaSA variant.

A directory with
    adapter_config.json         LoraConfig fields with ``kasa_config: {beta, gamma}`` (peft_type LORA)
    kasa_ds_config.json         what PEFT's format has no field for: svd_solver, adapter_dtype, quant_mode and, for
                                a 4-bit base, base_quantization (how to rebuild it from the 16-bit checkpoint)
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight (r, n)
                                base_model.model.<module>.lora_B.weight (m, r)
                                base_model.model.<module>.lora_diag     (r,)
                                base_model.model.<module_to_save>.<param>
The truncated base is not stored: like PEFT, loading re-runs the truncation on the original base weights.
:func:`write_adapter` is the one writer: save_adapter, recipe checkpoints and exports all go through it.
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

from ..comm.collectives import rank
from ..config import EXTRA_FIELDS, KaSAConfig
from ..core.experts import expert_layers
from ..core.layer import kasa_layers
from ..core.types import AdapterTensor, KaSAReport
from ..core import fingerprint
from ..inject import (CONFIG_ATTR, FINGERPRINT_ATTR, across_stages, adapter_module_name, apply_kasa, base_fingerprint,
                      find_expert_targets, find_targets, get_config, modules_to_save)
from ..registry import by_placement, format_of, full_shape, placement_of
from .files import atomic_directory, check_output_dir

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
EXTRA_FILE = "kasa_ds_config.json"
EXTRA_KEYS = EXTRA_FIELDS
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, EXTRA_FILE)


def adapter_tensors(model: nn.Module) -> list[AdapterTensor]:
    """Every adapter and modules_to_save parameter with its layer, keyed without PEFT's prefix (modules as
    :func:`~kasa_ds.inject.adapter_module_name` names them), in a fixed order."""
    config = get_config(model)
    items = [AdapterTensor(f"{adapter_module_name(model, name)}.{pname}", p, layer, pname)
             for name, layer in [*kasa_layers(model), *expert_layers(model)] for pname, p in layer.adapter_parameters()]
    for name in modules_to_save(model, config):
        items += [AdapterTensor(f"{name}.{pname}", p) for pname, p in model.get_submodule(name).named_parameters()]
    return items


def adapter_param_items(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name without PEFT's prefix, parameter) for every adapter and modules_to_save parameter, in a fixed order."""
    return [(item.key, item.param) for item in adapter_tensors(model)]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors this rank holds, under PEFT's key names, detached on CPU (partitioned or TP-sharded
    tensors as held: use :func:`gathered_adapter_state` for full shapes)."""
    return {PREFIX + key: p.detach().to("cpu").contiguous() for key, p in adapter_param_items(model)}


def gathered_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole adapter under PEFT's keys with full shapes, on rank 0 at least (every rank for TP, {} on the other
    ranks under ZeRO-3). Collective when the adapter is sharded: call it on every rank."""
    items = adapter_tensors(model)
    state: dict[str, torch.Tensor] = {}
    for placement, group in by_placement(items):  # the registry's order on every rank
        state.update(placement.gather_adapter(group))
    return across_stages(model, {PREFIX + item.key: state[item.key] for item in items if item.key in state})


def adapter_metadata(model: nn.Module) -> dict:
    """What :func:`write_adapter` needs from the model besides its tensors."""
    hf_config = getattr(model, "config", None)
    return {"base_model_name_or_path": getattr(hf_config, "_name_or_path", None) or None,
            "task_type": _infer_task_type(model), "base_quantization": base_quantization(model),
            "base_fingerprint": getattr(model, FINGERPRINT_ATTR, None)}


def write_adapter(directory: str | os.PathLike, state: dict[str, torch.Tensor], config: KaSAConfig, *,
                  base_model_name_or_path: Optional[str] = None, task_type: Optional[str] = None,
                  base_quantization: Optional[dict] = None, base_fingerprint: Optional[dict] = None) -> None:
    """Write the three adapter files into an existing ``directory`` (the caller makes the write atomic);
    ``base_fingerprint``: the sampled base weights (kasa_ds.core.fingerprint) the adapter belongs to."""
    empty = [k for k, v in state.items() if v.numel() == 0]
    if not state or empty:
        raise RuntimeError(f"refusing to write an adapter with empty tensors ({empty[:3] or 'no tensors'}): the "
                           "parameters look partitioned; gather them first (kasa_ds.io.adapter.gathered_adapter_state)")
    directory = Path(directory)
    check_finite(state, f"adapter for {directory}")  # a diverged run never writes an adapter or checkpoint
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_peft_dict(base_model_name_or_path, task_type), indent=2))
    extra = {k: getattr(config, k) for k in EXTRA_KEYS}
    if base_quantization is not None:
        extra["base_quantization"] = base_quantization
    if base_fingerprint:
        extra["base_fingerprint"] = {"base": base_model_name_or_path, "digest": fingerprint.digest(base_fingerprint),
                                     "layers": base_fingerprint}
    (directory / EXTRA_FILE).write_text(json.dumps(extra, indent=1))


def is_kasa_adapter_dir(path: Path) -> bool:
    """A KaSA adapter directory (kasa_ds's or PEFT's): an adapter_config.json with a kasa_config."""
    try:
        return bool(json.loads((Path(path) / CONFIG_FILE).read_text()).get("kasa_config"))
    except (OSError, ValueError):
        return False


def save_adapter(model: nn.Module, path: str | os.PathLike, *, state: Optional[dict[str, torch.Tensor]] = None,
                 base_model_name_or_path: Optional[str] = None, task_type: Optional[str] = None) -> Optional[Path]:
    """Write the adapter of ``model`` to directory ``path`` atomically (a temporary sibling renamed into place).

    ``path`` may hold an earlier KaSA adapter (it is replaced whole); any other non-empty directory is refused.
    By default the adapter is gathered through each tensor's placement (:func:`gathered_adapter_state`: collective
    when it is sharded, so call it on every rank; rank 0 writes and the others return None); ``state`` passes
    tensors the caller already gathered.
    """
    check_output_dir(path, is_kasa_adapter_dir, what="adapter directory")
    meta = adapter_metadata(model)
    meta["base_model_name_or_path"] = base_model_name_or_path or meta["base_model_name_or_path"]
    meta["task_type"] = task_type or meta["task_type"]
    if state is None:
        state = gathered_adapter_state(model)
        if rank() != 0:
            return None
    with atomic_directory(path) as tmp:
        write_adapter(tmp, state, get_config(model), **meta)
    return Path(path)


def base_quantization(model: nn.Module) -> Optional[dict]:
    """How the adapted layers' bases were quantized (their format's metadata), or None for float bases."""
    for _, layer in kasa_layers(model):
        meta = format_of(layer.base_layer).metadata(layer.base_layer, model)
        if meta is not None:
            return meta
    return None


def read_base_quantization(path: str | os.PathLike) -> Optional[dict]:
    extra = Path(path) / EXTRA_FILE
    return json.loads(extra.read_text()).get("base_quantization") if extra.is_file() else None


def read_base_fingerprint(path: str | os.PathLike) -> Optional[dict]:
    """The recorded base of an adapter directory ({"base", "digest", "layers"}), or None (PEFT's, or older)."""
    extra = Path(path) / EXTRA_FILE
    return json.loads(extra.read_text()).get("base_fingerprint") if extra.is_file() else None


def check_same_base(recorded: Optional[dict], observed: Optional[dict[str, dict]], where, this_base: str, *,
                    allow_other_base: bool = False, fix: str = "allow_other_base=True") -> None:
    """Refuse an adapter whose recorded base (``recorded``: :func:`read_base_fingerprint`) is not ``observed`` (the
    base at hand: {weight: sampled values}), naming both bases. Nothing to compare (an adapter without a record):
    accepted."""
    if allow_other_base or not recorded or not observed:
        return
    differ = fingerprint.compare(recorded["layers"], observed)
    if differ:
        name, diff = next(iter(differ.items()))
        raise ValueError(f"{where}: the adapter belongs to another base: {len(differ)} of the "
                         f"{len(set(recorded['layers']) & set(observed))} adapted weights compared differ from the "
                         f"weights it was trained on (e.g. {name}: {100 * diff:.3g} % apart); its base: "
                         f"{recorded.get('base') or '?'} (fingerprint {recorded.get('digest')}), this base: {this_base} "
                         f"(fingerprint {fingerprint.digest(observed)}). A KaSA adapter only fits the exact base it "
                         f"truncated: use that base, or pass {fix} for a base you changed on purpose")


#: KaSAConfig fields that change what an adapter computes: loading into a model adapted otherwise is refused
COMPUTE_FIELDS = ("r", "alpha", "target_modules", "exclude_modules", "modules_to_save", "quant_mode")


def config_differences(theirs: KaSAConfig, ours: KaSAConfig, fields=COMPUTE_FIELDS) -> list[str]:
    """``field: theirs vs ours`` for every field in which two adapter configs disagree."""
    a, b = theirs.to_dict(), ours.to_dict()
    return [f"{k}={a[k]!r} vs {b[k]!r}" for k in fields if a[k] != b[k]]


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
                 show_progress: bool = True, allow_other_base: bool = False) -> Optional[KaSAReport]:
    """Load a PEFT-format KaSA adapter into ``model``; the model keeps its training/eval mode.

    On a model without KaSA layers (the original base), the adapter's config is applied first, which truncates the
    base weights exactly as PEFT does on load; on an already adapted model only the weights are replaced. The
    adapter must belong to this base: its recorded base weights (kasa_ds_config.json) are compared with the model's
    before anything changes (``allow_other_base=True``: a base changed on purpose). Returns the KaSAReport of the
    injection, or None if the model was already adapted.
    """
    config = read_adapter_config(path)
    if svd_solver is not None:
        config.svd_solver = svd_solver
    state = read_adapter_tensors(path)
    recorded = read_base_fingerprint(path)
    this_base = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    was_training = model.training
    report = None
    if getattr(model, CONFIG_ATTR, None) is None:
        targets = check_fits(model, config, state, path)  # before anything is truncated: a misfit changes nothing
        observed = base_fingerprint(targets, model, find_expert_targets(model, config))
        check_same_base(recorded, observed, path, this_base, allow_other_base=allow_other_base)
        report = apply_kasa(model, config, show_progress=show_progress, fingerprint=observed)
    else:
        differ = config_differences(config, model.kasa_config)
        if differ:
            raise ValueError(f"adapter at {path} was trained with other settings than this model was adapted with "
                             f"({'; '.join(differ)}): load it into the original base instead")
        check_same_base(recorded, getattr(model, FINGERPRINT_ATTR, None), path, this_base,
                        allow_other_base=allow_other_base)
    load_adapter_state(model, state)
    model.train(was_training)
    return report


def check_fits(model: nn.Module, config: KaSAConfig, state: dict[str, torch.Tensor], path) -> list:
    """The adapter ``state`` (config ``config``) fits the unadapted ``model``: the same keys as the targets and
    modules_to_save it would get, full shapes, finite values. Raises ValueError naming the file; changes nothing.
    Returns the targets."""
    targets = find_targets(model, config)  # validates r and every target first
    expected = {}
    for t in targets:
        m, n = t.shape
        key = f"{PREFIX}{adapter_module_name(model, t.name)}."
        expected.update({key + "lora_A.weight": (config.r, n), key + "lora_B.weight": (m, config.r),
                         key + "lora_diag": (config.r,)})
    for t in find_expert_targets(model, config):
        for p in t.projections:
            (m, n), e, key = t.layout.shape(p), t.layout.num_experts, f"{PREFIX}{t.name}.{p}."
            expected.update({key + "lora_A.weight": (e, config.r, n), key + "lora_B.weight": (e, m, config.r),
                             key + "lora_diag": (e, config.r)})
    for name in modules_to_save(model, config):
        expected.update({f"{PREFIX}{name}.{p}": full_shape(v)
                         for p, v in model.get_submodule(name).named_parameters()})
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(across_stages(model, expected)))  # another pipeline stage's are expected
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: the adapter does not fit this model ({len(missing)} missing keys, e.g. "
                         f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}; {len(wrong)} of another "
                         f"shape, e.g. {wrong[:2]}): was it trained on another base or with other target_modules? The "
                         "model was left unchanged")
    check_finite(state, f"{path}/{WEIGHTS_FILE}")
    return targets


def read_adapter_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors of an adapter directory; a truncated or garbled file is one error naming it."""
    file = Path(path) / WEIGHTS_FILE
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises several error types for truncated or garbled files
        raise ValueError(f"{file} is not a readable safetensors file ({type(e).__name__}: {e}); write the adapter "
                         "again") from None


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse NaN/inf adapter tensors, naming the file and the first bad tensor."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{where}: {len(bad)} tensor(s) hold NaN or inf (e.g. {bad[0]}); the training that wrote them "
                         "diverged: use an earlier checkpoint, or a lower train.lr")


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy PEFT-keyed adapter tensors into ``model``; every adapter parameter must be present, nothing extra.

    Each tensor's placement cuts the full-shape value to what this rank holds (a TP shard, say), so an adapter
    trained at any TP size (or on one process, or by PEFT) loads at any other."""
    items = {PREFIX + item.key: item for item in adapter_tensors(model)}
    expected = set(items)
    every_stage = across_stages(model, dict.fromkeys(expected))  # another pipeline stage's keys are expected too
    unexpected = [k for k in state if k not in every_stage]
    missing = [k for k in expected if k not in state]
    if unexpected or missing:
        raise ValueError(f"adapter does not fit this model: {len(missing)} missing keys (e.g. {missing[:2]}), "
                         f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]}); was it trained on another "
                         "architecture or with other target_modules?")
    check_finite(state, "adapter state")
    with torch.no_grad():
        for key, value in state.items():
            item = items.get(key)
            if item is None:
                continue  # another pipeline stage's tensor
            param = item.param
            value = placement_of(item).load_adapter_tensor(item, value)
            if tuple(param.shape) != tuple(value.shape):
                raise ValueError(f"{key}: adapter tensor has shape {tuple(value.shape)}, model expects "
                                 f"{tuple(param.shape)}")
            param.copy_(value.to(param.dtype))


def _infer_task_type(model: nn.Module) -> Optional[str]:
    cls = type(model).__name__
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if cls.endswith("CausalLM"):  # HF's *ForCausalLM, and kasa_ds's MegatronCausalLM
        return "CAUSAL_LM"
    return None
