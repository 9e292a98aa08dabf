"""``kasa-export`` (``tools/export_adapter.py``): export the PEFT-format KaSA adapter of a training run or checkpoint (ZeRO-0/2/3, TP alike), or its exact LoRA.

Checkpoints hold the adapter already gathered on rank 0 at save time (only adapter tensors are ever gathered, never
the model), so exporting the KaSA adapter is a validated copy of its files (kasa_ds_config.json included):

    python tools/export_adapter.py outputs/run                          # newest complete checkpoint of a run
    python tools/export_adapter.py outputs/run/checkpoints/step-0000400 --out my-adapter

``--as-lora --base ORIGINAL`` writes instead a plain PEFT LoRA adapter of rank 2r on the original, untruncated base
(W_world + ΔW = W + B·A exactly; see kasa_ds.io.lora), which LoRA servers such as vLLM load; the dropped tails are
recomputed from ORIGINAL one weight at a time (or read from --svd-cache):

    python tools/export_adapter.py outputs/run --as-lora --base /models/llama --out my-lora

``--as-gguf --base ORIGINAL`` writes the same LoRA as a llama.cpp adapter GGUF (see kasa_ds.io.gguf_lora), for
llama.cpp (``--lora``) and Ollama (``ADAPTER``) over the original base converted by llama.cpp's convert_hf_to_gguf.py:

    python tools/export_adapter.py outputs/run --as-gguf --base /models/llama --out my-lora.gguf
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Optional, Sequence

from safetensors import safe_open

from ..cli import bad_input_fails, fail
from ..io.adapter import ADAPTER_FILES, WEIGHTS_FILE, is_kasa_adapter_dir, read_adapter_config
from ..io.files import atomic_directory, check_output_dir
from ..io.gguf_lora import DTYPES, export_gguf_files
from ..io.lora import SERVERS, VLLM_MAX_LORA_RANKS, export_lora_files, is_lora_export_dir, vllm_max_lora_rank
from ..training.checkpoint import latest_checkpoint


def adapter_source(source: Path) -> Path:
    """The adapter directory behind ``source``: a run's newest complete checkpoint, a checkpoint, or an adapter."""
    if (source / "checkpoints").is_dir():
        ckpt = latest_checkpoint(source)
        if ckpt is None:
            fail(f"{source} has no complete checkpoint")
        source = ckpt
    read_adapter_config(source)  # raises with a clear message if this is not an adapter directory
    with safe_open(str(source / WEIGHTS_FILE), "pt") as f:
        empty = [k for k in f.keys() if 0 in f.get_slice(k).get_shape()]
    if empty:
        fail(f"{source} holds empty adapter tensors ({empty[:2]}): not a gathered adapter")
    return source


def export(source: Path, out: Path) -> Path:
    """Copy the adapter behind ``source`` to ``out``: a new directory or an earlier exported adapter, never the run,
    its checkpoints or the source itself."""
    with bad_input_fails():
        check_output_dir(out, is_kasa_adapter_dir, sources=[source])
        source = adapter_source(source)
    with atomic_directory(out) as tmp:
        for name in ADAPTER_FILES:  # kasa_ds_config.json too: solver, quant mode and base quantization
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
    return out


def export_lora(source: Path, out: Path, base: Path, svd_cache: Path | None = None,
                allow_other_base: bool = False, server: str = "peft") -> Path:
    if not (base / "config.json").is_file():
        fail(f"--base {base}: not a model directory with config.json (the original, untruncated checkpoint the "
             "adapter was trained from)")
    with bad_input_fails():
        check_output_dir(out, is_lora_export_dir, sources=[source])  # never the run or checkpoint itself
        return export_lora_files(adapter_source(source), out, base, svd_cache, allow_other_base, server)


def export_gguf(source: Path, out: Path, base: Path, svd_cache: Path | None = None, allow_other_base: bool = False,
                dtype: str = "f32") -> Path:
    if not (base / "config.json").is_file():
        fail(f"--base {base}: not a model directory with config.json (the original, untruncated checkpoint the "
             "adapter was trained from)")
    with bad_input_fails():
        return export_gguf_files(adapter_source(source), out, base, svd_cache, allow_other_base, dtype)


def main(argv: Optional[Sequence[str]] = None) -> Path:
    p = argparse.ArgumentParser(prog="kasa-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="a run's output_dir, one checkpoint directory, or an adapter directory")
    p.add_argument("--out", type=Path, help="destination (default: <source>/exported-adapter, exported-lora or "
                                            "exported-lora.gguf)")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--as-lora", action="store_true", help="write a plain rank-2r PEFT LoRA on the original base")
    form.add_argument("--as-gguf", action="store_true",
                      help="write the rank-2r LoRA as a llama.cpp adapter GGUF (llama.cpp --lora, Ollama ADAPTER)")
    p.add_argument("--base", type=Path, help="with --as-lora/--as-gguf: the original model directory (safetensors)")
    p.add_argument("--svd-cache", type=Path,
                   help="with --as-lora/--as-gguf: a precomputed truncation (tools/precompute_svd.py)")
    p.add_argument("--allow-other-base", action="store_true",
                   help="with --as-lora/--as-gguf: a base other than the one the adapter recorded (changed on purpose)")
    p.add_argument("--gguf-dtype", choices=sorted(DTYPES), default="f32", help="with --as-gguf: the tensors' type")
    p.add_argument("--server", choices=SERVERS, default="peft",
                   help="with --as-lora: refuse first what this server would not load (vllm: a rank 2r above 512, "
                        "modules_to_save but a classification head)")
    a = p.parse_args(argv)
    if (a.as_lora or a.as_gguf) and a.base is None:
        p.error(f"{'--as-lora' if a.as_lora else '--as-gguf'} needs --base: the original checkpoint the dropped tails "
                "are recomputed from")
    if a.as_gguf:
        out = export_gguf(a.source, a.out or a.source / "exported-lora.gguf", a.base, a.svd_cache, a.allow_other_base,
                          a.gguf_dtype)
        print(f"BASE.gguf below: {a.base} converted by llama.cpp's convert_hf_to_gguf.py (any precision)\n"
              f"llama.cpp: llama-cli -m BASE.gguf --lora {out}\n"
              f"Ollama Modelfile: FROM BASE.gguf, then ADAPTER {out}")
    elif a.as_lora:
        out = export_lora(a.source, a.out or a.source / "exported-lora", a.base, a.svd_cache, a.allow_other_base,
                          a.server)
        rank = 2 * read_adapter_config(adapter_source(a.source)).r
        if rank <= VLLM_MAX_LORA_RANKS[-1]:
            print(f"serve with vLLM: vllm serve {a.base} --enable-lora --max-lora-rank {vllm_max_lora_rank(rank)} "
                  f"--lora-modules NAME={out}")
    else:
        out = export(a.source, a.out or a.source / "exported-adapter")
    print(out)
    return out
