"""``kasa-merge`` (``tools/merge.py``): merge a KaSA adapter into its base checkpoint, streamed.

    kasa-merge --base BASE_DIR --adapter ADAPTER_DIR --out MERGED_DIR [--dtype bfloat16] [--svd-cache CACHE_DIR]
               [--max-shard-gb 5]

See :mod:`kasa_ds.io.merged_checkpoint` for what is written and how quantized bases are handled.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..io.merged_checkpoint import merge_checkpoint

merge = merge_checkpoint  # the name tools/merge.py always had


def main(argv: Optional[Sequence[str]] = None) -> Path:
    p = argparse.ArgumentParser(prog="kasa-merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--adapter", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--svd-cache", type=Path)
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--allow-other-base", action="store_true",
                   help="merge into a base other than the one the adapter recorded (a base you changed on purpose)")
    a = p.parse_args(argv)
    out = merge_checkpoint(a.base, a.adapter, a.out, getattr(torch, a.dtype), a.svd_cache,
                           int(a.max_shard_gb * (1 << 30)), allow_other_base=a.allow_other_base)
    print(out)
    return out
