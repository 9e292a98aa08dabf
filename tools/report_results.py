#!/usr/bin/env python
"""Markdown tables (mean ± std over seeds, per-seed values) from tools/compare_methods.py results.json files.

    python tools/report_results.py docs/results/methods/results.json docs/results/ablation/results.json

docs/RESULTS.md's tables are this tool's output for the committed results.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

NAMES = {"kasa": "KaSA (kasa_ds)", "lora": "LoRA (PEFT)", "pissa": "PiSSA (PEFT)", "milora": "MiLoRA-style",
         "full": "full fine-tuning", "kasa_no_trunc": "KaSA without truncation",
         "kasa_no_reg": "KaSA without β, γ terms", "kasa_r4": "KaSA r = 4", "kasa_r16": "KaSA r = 16"}


def table(result: dict) -> str:
    runs = result["runs"]
    lines = ["| method | trainable params | seeds | accuracy (mean ± std) | eval loss (mean ± std) "
             "| accuracy per seed | best accuracy on the curve (mean) |",
             "|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
        acc = [r["final"]["accuracy"] for r in mine]
        loss = [r["final"]["loss"] for r in mine]
        best = [max(p["accuracy"] for p in r["curve"]) for r in mine]

        def ms(v):
            return f"{statistics.mean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.4f}"

        lines.append(f"| {NAMES.get(method, method)} | {mine[0]['trainable_params']:,} | {len(mine)} | {ms(acc)} | "
                     f"{ms(loss)} | {' / '.join(f'{a:.4f}' for a in acc)} | {statistics.mean(best):.4f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+")
    a = p.parse_args(argv)
    for path in a.results:
        result = json.loads(Path(path).read_text())
        print(f"{path} ({result['steps']} steps, r = {result['r']}, {result['date']}, torch {result['torch']}):\n")
        print(table(result) + "\n")


if __name__ == "__main__":
    main()
