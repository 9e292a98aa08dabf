"""What KaSA's truncation alone costs a model, before any training: held-out loss untouched vs truncated.

KaSA drops each target's r smallest singular triplets, assuming they carry little. On small models with grouped-query
attention that can be false (SmolLM2-135M: its 192×576 v_proj loses up to 1% of its energy at r = 8 and the loss
jumps), so measure before choosing targets and r:

    python3 tools/truncation_cost.py --model ~/.cache/kasa_ds/models/smollm2-135m-instruct \\
        --data ~/.cache/kasa_ds/data/chatterbot/eval.jsonl --examples 32 \\
        --variant all:8:q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --variant no-kv:8:q_proj,o_proj,...

Each ``--variant NAME:R:TARGETS`` is truncated from the same untouched model (ΔW = 0: the adapter changes nothing
yet); the loss is the token mean over the assistant turns of messages-format records (kasa_ds.training.chat).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path


import torch

from kasa_ds import KaSAConfig, apply_kasa
from kasa_ds.cli import bad_input_fails, positive_int
from kasa_ds.training.chat import IGNORE_INDEX, encode_conversation
from kasa_ds.training.data import load_records


def held_out_loss(model, examples) -> float:
    total = tokens = 0.0
    with torch.no_grad():
        for ids, labels in examples:
            n = sum(1 for label in labels[1:] if label != IGNORE_INDEX)
            total += model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item() * n
            tokens += n
    return total / tokens


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--data", required=True, help="messages-format JSONL (e.g. tools/make_chat_data.py's eval.jsonl)")
    p.add_argument("--examples", type=positive_int, default=32)
    p.add_argument("--variant", action="append", required=True, help="NAME:R:comma-separated targets")
    a = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with bad_input_fails():
        variants = [(name, int(r), targets.split(",")) for name, r, targets in (v.split(":") for v in a.variant)]
        tokenizer = AutoTokenizer.from_pretrained(a.model)
        examples = [encode_conversation(tokenizer, r["messages"]) for r in load_records(a.data)[:a.examples]]
    base = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    results = {"untouched": {"loss": held_out_loss(base, examples)}}
    print(f"untouched: held-out loss {results['untouched']['loss']:.4f}")
    for name, r, targets in variants:
        model = copy.deepcopy(base)
        report = apply_kasa(model, KaSAConfig(r=r, target_modules=targets), show_progress=False)
        model.eval()
        worst = max(report.layers, key=lambda layer: layer.tail_energy)
        results[name] = {"r": r, "targets": targets, "loss": held_out_loss(model, examples),
                         "max_tail_energy": worst.tail_energy, "worst_layer": worst.name}
        print(f"{name}: r={r}, {len(report.layers)} layers: held-out loss {results[name]['loss']:.4f} (largest "
              f"dropped energy {worst.tail_energy:.2e} in {worst.name})")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
