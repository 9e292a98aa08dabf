"""The streamed merge: a KaSA adapter folded into its base checkpoint, W_world + ΔW, tensor by tensor into
safetensors shards (memory: one weight plus one output shard; a 70B merge fits a node's CPU RAM).

The truncation is recomputed per weight with the adapter's solver, or read from a precomputed SVD cache. The output
is a plain HF checkpoint (config, tokenizer, shards + index) that transformers loads with no kasa_ds or PEFT
installed. The base directory is never written to; the output is written to a temporary sibling and renamed.

Adapters trained on a 4-bit or 8-bit base (their kasa_ds_config.json records how it was quantized) are merged into the
16-bit checkpoint they were quantized from: each adapted weight W is quantized and dequantized as during training,
X = D(Q(W)), then W_eff = X − tail(X) (low_rank_correction) or D(Q(X − tail(X))) (requantize), and W_eff + ΔW is
written in the output dtype: the merged model computes what the 4-bit model did, without bitsandbytes.
"""

from __future__ import annotations

import errno
import json
import math
import shutil
from pathlib import Path

import torch

from ..cli import bad_input_fails, fail
from ..progress import progress
from .adapter import (PREFIX, WEIGHTS_FILE, check_finite, read_adapter_config, read_adapter_tensors,
                      read_base_fingerprint, read_base_quantization)
from .expert_checkpoint import expand_experts
from .files import atomic_directory, check_output_dir
from .hf_checkpoint import ShardWriter, iter_tensors, list_tensors, module_key
from .svd_cache import SVDCache
from .tails import BaseCheck, base_and_tail, check_adapter_shape, roundtrip_of

COPY_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
              "generation_config.json", "merges.txt", "vocab.json", "added_tokens.json")


def merge_checkpoint(base: Path, adapter: Path, out: Path, dtype: torch.dtype = torch.bfloat16,
                     svd_cache: Path | None = None, max_shard_bytes: int = 5 << 30,
                     allow_other_base: bool = False) -> Path:
    """Write ``base`` with ``adapter`` merged in to ``out`` (see the module); returns ``out``. Bad input: one
    ``error:`` line and exit 2 (kasa_ds.cli.fail)."""
    base, adapter, out = base.resolve(), adapter.resolve(), out.resolve()
    with bad_input_fails():
        check_output_dir(out, None, sources=[adapter], models=[base])
        config = read_adapter_config(adapter)
        quantization = read_base_quantization(adapter)
    if quantization is not None and svd_cache is not None:
        fail("--svd-cache holds truncations of the 16-bit weights; a QKaSA adapter truncates the "
                         "dequantized 4-bit weights: drop --svd-cache")
    with bad_input_fails():
        tensors = list_tensors(base)  # headers only: a truncated or damaged file is refused here
        ad = read_adapter_tensors(adapter)  # adapter-sized: r·(m+n) per layer
        check_finite(ad, str(adapter / WEIGHTS_FILE))
        ad = expand_experts(ad, set(tensors), base)  # experts: one 2-D adapter per expert, as the file stores them
    same_base = BaseCheck(read_base_fingerprint(adapter), adapter, str(base), allow_other_base)
    modules = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in ad if ".lora_" in k})
    plan = {}  # checkpoint module name -> adapter module name
    for name in modules:
        ck = module_key(name, set(tensors))
        if ck is None:
            fail(f"adapter module {name} has no weight in {base}; wrong base model?")
        plan[ck] = name
    saved = {k[len(PREFIX):]: v for k, v in ad.items() if ".lora_" not in k}  # modules_to_save tensors
    cache = SVDCache(svd_cache, base, config) if svd_cache else None
    try:
        with bad_input_fails():  # raised while the bar was open; printed once it is closed
            _write_merged(base, out, tensors, plan, ad, saved, config, cache, quantization, same_base, dtype,
                          max_shard_bytes)
    except Exception as e:  # writers report a full disk in their own words (safetensors: "os error 28")
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
            fail(f"the disk holding {out} is full ({shutil.disk_usage(out.parent).free / 2 ** 20:.0f} MiB free; the "
                 f"merged checkpoint needs about {_size(tensors, dtype) / 2 ** 30:.1f} GiB): free space or choose "
                 "another --out; nothing was left behind")
        raise
    return out


def _size(tensors, dtype: torch.dtype) -> int:
    return sum(math.prod(t.shape) for t in tensors.values()) * torch.finfo(dtype).bits // 8


def _write_merged(base, out, tensors, plan, ad, saved, config, cache, quantization, same_base, dtype,
                  max_shard_bytes) -> None:
    """The merged shards, config and tokenizer files into a temporary sibling of ``out``, renamed when complete;
    every tensor checked finite before it is written."""
    with atomic_directory(out) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        with progress(total=len(tensors), desc="merge", unit="tensor") as bar:
            _merge_tensors(base, writer, bar, plan, ad, saved, config, cache, quantization, same_base, dtype)
        writer.close()
        hf_config = json.loads((base / "config.json").read_text())
        hf_config["torch_dtype"] = hf_config["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        for name in COPY_FILES:
            if (base / name).is_file():
                shutil.copy2(base / name, tmp / name)


def _merge_tensors(base, writer, bar, plan, ad, saved, config, cache, quantization, same_base, dtype) -> None:
    """Every tensor of the base, merged where the adapter has it, into ``writer``; ValueError on a problem."""
    for key, tensor in iter_tensors(base):
        name = key.removesuffix(".weight")
        if key.endswith(".weight") and name in plan:
            check_adapter_shape(plan[name], tensor, ad, base)
            tensor = _merged(tensor, name, plan[name], ad, config, cache, quantization, same_base)
        else:
            saved_key = next((k for k in saved if k == key or k.split(".", 1)[-1] == key), None)
            if saved_key is not None:  # a modules_to_save tensor trained with the adapter
                tensor = saved.pop(saved_key)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            source = "the base" if name not in plan else "the base or the adapter"
            raise ValueError(f"{key}: the merged tensor holds NaN or inf ({source} in {base} is not finite): "
                             "nothing was written")
        writer.add(key, tensor.to(dtype) if tensor.is_floating_point() else tensor)
        bar.update(1)
    for key, tensor in saved.items():  # modules_to_save absent from the base (a new classification head)
        writer.add(key, tensor.to(dtype))


def _merged(weight: torch.Tensor, ck_name: str, ad_name: str, ad: dict, config, cache, quantization=None,
            same_base=None):
    """W_world + ΔW of one weight, with W_world exactly as training had it (a quantized base rebuilt, then the
    tail removed; requantize: quantized again); ``same_base`` checks the weight is the one the adapter was trained
    on (kasa_ds.io.tails.BaseCheck)."""
    x, left, right = base_and_tail(weight, ck_name, config, quantization, cache)
    if same_base is not None:
        same_base(ad_name, weight, x, quantization)
    world = x - left @ right
    if quantization is not None and config.quant_mode == "requantize":
        world = roundtrip_of(quantization)(world)
    return world + _delta(ad, ad_name, config)


def _delta(ad: dict, ad_name: str, config) -> torch.Tensor:
    """ΔW = (α/r)·ΔU·diag(ΔΣ)·ΔVᵀ of one layer, float32."""
    a = ad[f"{PREFIX}{ad_name}.lora_A.weight"].float()
    b = ad[f"{PREFIX}{ad_name}.lora_B.weight"].float()
    d = ad[f"{PREFIX}{ad_name}.lora_diag"].float()
    return (b * d) @ a * config.scaling
