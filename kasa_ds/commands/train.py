"""``kasa-train`` (``launch/train.py``): the recipe's command line.

    kasa-train --config my.yaml [section.key=value ...]
    deepspeed --num_gpus 8 $(which kasa-train) --ds_config ds_configs/zero2.json --config my.yaml
    python3 launch/train.py                      # in a checkout: the embedded default (configs/default.yaml)

Everything the recipe does is kasa_ds.training.recipe; this module parses arguments, reads the config (one
``error:`` line and exit 2 on bad input, before anything loads) and leaves the processes cleanly.
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterable, Optional, Sequence

from ..comm.processes import exit_now, launcher_world_size
from ..training.config import ConfigError, load_train_config
from ..training.recipe import run_recipe


def parse_args(argv: Optional[Sequence[str]], default_config: Optional[str] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kasa-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=default_config,
                   help="YAML recipe config" + (f" (default: {default_config})" if default_config else ""))
    p.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", help="DeepSpeed JSON config")
    p.add_argument("--output_dir", help="where metrics, checkpoints and the adapter go (overrides output_dir)")
    p.add_argument("--resume", help="auto | none | <checkpoint dir> (overrides resume)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.lr=3e-4")
    return p.parse_intermixed_args(argv)


def main(argv: Optional[Sequence[str]] = None, *, default_config: Optional[str] = None,
         base_dirs: Iterable[str] = ()) -> int:
    """Run the recipe; returns its exit code. ``default_config``: the YAML used when no --config is given;
    ``base_dirs``: where relative paths are looked for after the working directory (a checkout)."""
    args = parse_args(argv, default_config)
    overrides = list(args.overrides)
    for key in ("ds_config", "output_dir", "resume"):
        if getattr(args, key) is not None:
            overrides.append(f"{key}={getattr(args, key)}")
    try:
        if args.config is None:
            raise ConfigError("no --config: pass a recipe YAML (a checkout's configs/default.yaml runs the embedded "
                              "default; python3 launch/train.py uses it with no --config)")
        cfg = load_train_config(args.config, overrides, base_dirs)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_recipe(cfg)


def run(argv: Optional[Sequence[str]] = None, **kwargs) -> None:
    """The process entry point: run, then exit (the fast exit after a multi-rank run)."""
    rc = main(argv, **kwargs)
    if launcher_world_size() > 1:
        exit_now(rc)
    sys.exit(rc)
