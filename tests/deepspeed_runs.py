"""Shared by the DeepSpeed tests (tests/training/test_deepspeed.py, tests/placements/test_qkasa_zero3.py): the
recipe through the real deepspeed launcher on the CPU accelerator, and what its runs wrote."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
COMMON = ["model.task=seq_cls", "data.train=data/rotten_tomatoes/train.jsonl", "data.eval=data/rotten_tomatoes/eval.jsonl",
          "data.max_eval_examples=32", "kasa.modules_to_save=[score]", "kasa.dropout=0.0", "train.max_steps=3",
          "train.save_every=3", "train.log_every=1", "model.max_length=48"]


def launch(args, world: int, tmp: Path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    if world == 1:
        cmd = [sys.executable, str(REPO / "launch/train.py"), *args]
    else:
        cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(world),
               "--master_port", str(free_port()), str(REPO / "launch/train.py"), *args]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(out: Path, key: str = "loss"):
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r["split"] == "train"]


def fully_partitioned_zero3(tmp: Path) -> Path:
    """ds_configs/zero3.json with the persistence threshold at 0, so adapters are really partitioned too."""
    ds = json.loads((REPO / "ds_configs/zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp / "zero3_all_partitioned.json"
    path.write_text(json.dumps(ds))
    return path
