"""Export the PEFT-format KaSA adapter of a training run or checkpoint (ZeRO-0/2/3 alike).

Checkpoints hold the adapter already gathered on rank 0 at save time (only adapter tensors are ever gathered, never
the model), so exporting is a validated copy:

    python tools/export_adapter.py outputs/run                          # newest complete checkpoint of a run
    python tools/export_adapter.py outputs/run/checkpoints/step-0000400 --out my-adapter
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kasa_ds.adapter_io import CONFIG_FILE, WEIGHTS_FILE, read_adapter_config  # noqa: E402
from kasa_ds.checkpoint import latest_checkpoint  # noqa: E402
from kasa_ds.utils import atomic_directory  # noqa: E402


def export(source: Path, out: Path) -> Path:
    if (source / "checkpoints").is_dir():
        ckpt = latest_checkpoint(source)
        if ckpt is None:
            raise SystemExit(f"error: {source} has no complete checkpoint")
        source = ckpt
    read_adapter_config(source)  # raises with a clear message if this is not an adapter directory
    from safetensors import safe_open

    with safe_open(str(source / WEIGHTS_FILE), "pt") as f:
        empty = [k for k in f.keys() if 0 in f.get_slice(k).get_shape()]
    if empty:
        raise SystemExit(f"error: {source} holds empty adapter tensors ({empty[:2]}): not a gathered adapter")
    with atomic_directory(out) as tmp:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy2(source / name, tmp / name)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="a run's output_dir or one checkpoint directory")
    p.add_argument("--out", type=Path, help="destination (default: <source>/exported-adapter)")
    a = p.parse_args()
    print(export(a.source, a.out or a.source / "exported-adapter"))
