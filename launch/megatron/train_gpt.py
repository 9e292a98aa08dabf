#!/usr/bin/env python
"""The Megatron road, kept under its former name for one release: the recipe with ``backend=megatron``.

    torchrun --nproc_per_node 3 launch/megatron/train_gpt.py --config configs/smollm2_chat_megatron.yaml
is
    torchrun --nproc_per_node 3 launch/train.py --config configs/smollm2_chat_megatron.yaml backend=megatron

(a Hugging Face checkpoint split by megatron-core tensor parallelism: kasa_ds.training.megatron_model). The former
byte-level GPT demo and its Megatron-LM pickle loader are gone: a config of that form (model.num_layers …,
model.checkpoint) is refused with one error line naming the recipe.
"""

import sys
from pathlib import Path

import yaml

from kasa_ds.commands import train

CHECKOUT = Path(__file__).resolve().parents[2]
FORMER_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
               "seq_length", "checkpoint")


def former_demo_config(argv: list[str]) -> bool:
    """The config (--config FILE) is the former demo's: model.num_layers … or a Megatron-LM model.checkpoint."""
    path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
    if path is None or not Path(path).is_file():
        return False
    model = (yaml.safe_load(Path(path).read_text()) or {}).get("model") or {}
    return any(key in model for key in FORMER_KEYS)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if former_demo_config(argv):
        print("error: launch/megatron/train_gpt.py now runs the recipe on a Hugging Face checkpoint (backend=megatron); "
              "the byte-level GPT demo config (model.num_layers …, model.checkpoint) is gone: set model.path to an HF "
              "model directory, e.g. configs/smollm2_chat_megatron.yaml", file=sys.stderr)
        return 2
    return train.main([*argv, "backend=megatron"], base_dirs=[str(CHECKOUT)])


if __name__ == "__main__":
    if former_demo_config(sys.argv[1:]):
        sys.exit(main())
    train.run([*sys.argv[1:], "backend=megatron"], base_dirs=[str(CHECKOUT)])
