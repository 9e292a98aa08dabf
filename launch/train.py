#!/usr/bin/env python
"""KaSA fine-tuning recipe: one entry point for a single process and for the DeepSpeed launcher (and mpirun).

    python launch/train.py                                   # embedded default: MiniLM on Rotten Tomatoes, CPU
    python launch/train.py --config configs/x.yaml train.lr=3e-4 kasa.r=16
    deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/zero2.json --config configs/x.yaml

Steps, in order: validate config → set up processes → tokenizer, data → model → KaSA (truncate + inject) →
resume → eval → train (task loss + KaSA regularizer) with checkpoints → eval → adapter in <output_dir>/adapter.
The recipe itself is kasa_ds.training.recipe.Recipe; this file parses the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kasa_ds.training.config import ConfigError, load_train_config  # noqa: E402
from kasa_ds.training.recipe import run_recipe  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML recipe config (defaults: the embedded MiniLM / Rotten Tomatoes run)")
    p.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", help="DeepSpeed JSON config")
    p.add_argument("--output_dir", help="where metrics, checkpoints and the adapter go (overrides output_dir)")
    p.add_argument("--resume", help="auto | none | <checkpoint dir> (overrides resume)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.lr=3e-4")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    for key in ("ds_config", "output_dir", "resume"):
        if getattr(args, key) is not None:
            overrides.append(f"{key}={getattr(args, key)}")
    try:
        cfg = load_train_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_recipe(cfg)


def exit_now(code: int) -> None:
    """Leave without running C++ static destructors once a multi-rank run is over (its files are written and
    renamed, its metrics closed, its process group destroyed): with a 4-bit base under ZeRO-3, a rank otherwise
    sometimes aborts in interpreter teardown ("terminate called without an active exception", seen in 1 of ~6
    otherwise successful runs), turning a finished run into a failed job."""
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")  # under mpirun: finalize MPI, as its atexit hook would, or mpirun fails the job
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)


if __name__ == "__main__":
    rc = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_now(rc)
    sys.exit(rc)
