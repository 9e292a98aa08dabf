#!/usr/bin/env python
"""KaSA fine-tuning recipe: one entry point for a single process and for the DeepSpeed launcher (and mpirun).

    python launch/train.py                                   # embedded default: MiniLM on Rotten Tomatoes, CPU
    python launch/train.py --config configs/x.yaml train.lr=3e-4 kasa.r=16
    deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/zero2.json --config configs/x.yaml

Steps, in order: validate config → set up processes → tokenizer, data → model → KaSA (truncate + inject) →
resume → eval → train (task loss + KaSA regularizer) with checkpoints → eval → adapter in <output_dir>/adapter.
The recipe is kasa_ds.training.recipe.Recipe and the command line kasa_ds.commands.train (``kasa-train``, installed
with the package); this file adds what a checkout has: configs/default.yaml when no --config is given, and relative
paths (configs/, data/, ds_configs/) found from any working directory.
"""

from pathlib import Path

from kasa_ds.commands import train

CHECKOUT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(CHECKOUT / "configs" / "default.yaml")


def main(argv=None) -> int:
    """The recipe's exit code (kasa_ds.commands.train.main with this checkout's default config and paths)."""
    return train.main(argv, default_config=DEFAULT_CONFIG, base_dirs=[str(CHECKOUT)])


if __name__ == "__main__":
    train.run(default_config=DEFAULT_CONFIG, base_dirs=[str(CHECKOUT)])
