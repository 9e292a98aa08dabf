#!/usr/bin/env python
"""Per-GPU memory plan of a KaSA or QKaSA run from a HF config.json alone (the ``kasa-plan-memory`` command).

    python tools/plan_memory.py --model configs/models/llama-3-70b --gpus 64 --zero 3 --seq-len 4096 --gpu-gib 80

The code is kasa_ds.commands.plan_memory; the model of bytes is kasa_ds.training.memory_plan.
"""

from kasa_ds.commands.plan_memory import main

if __name__ == "__main__":
    main()
