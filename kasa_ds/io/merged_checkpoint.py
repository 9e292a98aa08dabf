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

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..cli import bad_input_fails, fail
from ..progress import progress
from .adapter import PREFIX, WEIGHTS_FILE, check_finite, read_adapter_config, read_base_quantization
from .files import atomic_directory, check_output_dir
from .hf_checkpoint import ShardWriter, iter_tensors, list_tensors, module_key
from .svd_cache import SVDCache
from .tails import base_and_tail, roundtrip_of

COPY_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
              "generation_config.json", "merges.txt", "vocab.json", "added_tokens.json")


def merge_checkpoint(base: Path, adapter: Path, out: Path, dtype: torch.dtype = torch.bfloat16,
                     svd_cache: Path | None = None, max_shard_bytes: int = 5 << 30) -> Path:
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
    tensors = list_tensors(base)
    keys = set(tensors)
    ad = load_file(str(adapter / WEIGHTS_FILE))  # adapter-sized: r·(m+n) per layer
    with bad_input_fails():
        check_finite(ad, str(adapter / WEIGHTS_FILE))
    modules = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in ad if ".lora_" in k})
    plan = {}  # checkpoint module name -> adapter module name
    for name in modules:
        ck = module_key(name, keys)
        if ck is None:
            fail(f"adapter module {name} has no weight in {base}; wrong base model?")
        plan[ck] = name
    saved = {k[len(PREFIX):]: v for k, v in ad.items() if ".lora_" not in k}  # modules_to_save tensors
    cache = SVDCache(svd_cache, base, config) if svd_cache else None
    with atomic_directory(out) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        bar = progress(total=len(tensors), desc="merge", unit="tensor")
        for key, tensor in iter_tensors(base):
            name = key.removesuffix(".weight")
            if key.endswith(".weight") and name in plan:
                tensor = _merged(tensor, name, plan[name], ad, config, cache, quantization)
            else:
                saved_key = next((k for k in saved if k == key or k.split(".", 1)[-1] == key), None)
                if saved_key is not None:  # a modules_to_save tensor trained with the adapter
                    tensor = saved.pop(saved_key)
            writer.add(key, tensor.to(dtype) if tensor.is_floating_point() else tensor)
            bar.update(1)
        for key, tensor in saved.items():  # modules_to_save absent from the base (a new classification head)
            writer.add(key, tensor.to(dtype))
        writer.close()
        bar.close()
        hf_config = json.loads((base / "config.json").read_text())
        hf_config["torch_dtype"] = hf_config["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        for name in COPY_FILES:
            if (base / name).is_file():
                shutil.copy2(base / name, tmp / name)
    return out


def _merged(weight: torch.Tensor, ck_name: str, ad_name: str, ad: dict, config, cache, quantization=None):
    """W_world + ΔW of one weight, with W_world exactly as training had it (a quantized base rebuilt, then the
    tail removed; requantize: quantized again)."""
    x, left, right = base_and_tail(weight, ck_name, config, quantization, cache)
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
