#!/usr/bin/env python
"""KaSA vs LoRA, PiSSA, MiLoRA and full fine-tuning on one real task, several seeds; plus the KaSA ablation.

    python tools/compare_methods.py                                 # methods, 3 seeds, the embedded default's task
    python tools/compare_methods.py --methods kasa_no_trunc kasa_no_reg kasa_r4 kasa_r16 --out docs/results/ablation
    python tools/compare_methods.py --seeds 0 --steps 5 --eval-every 5 --max-eval 32   # smoke

The code is the package kasa_ds.experiments; its runner kasa_ds.experiments.compare_methods documents the methods
and what is written (--help). Without --config it runs this checkout's configs/default.yaml.
"""

from pathlib import Path

from kasa_ds.experiments.compare_methods import main

CHECKOUT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    main(default_config=str(CHECKOUT / "configs" / "default.yaml"), base_dirs=[str(CHECKOUT)])
