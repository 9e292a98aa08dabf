"""The comparisons as text: the results table and the LLM comparison report with its pre-registered decision."""

from __future__ import annotations

import math
import statistics

from .stats import final_runs


def print_table(table: dict) -> None:
    print(f"{'method':<15}{'trainable':>12}  {'eval accuracy':>17}  {'eval loss':>17}  seeds")
    for method, row in table.items():
        acc, loss = row["accuracy"], row["loss"]
        print(f"{method:<15}{row['trainable_params']:>12,}  {acc['mean']:.4f} ± {acc['std']:.4f}  "
              f"{loss['mean']:.4f} ± {loss['std']:.4f}  {len(row['seeds'])}")


def report(result: dict) -> str:
    """Markdown for docs/RESULTS.md: zero-shot, rate selection, test accuracy per method, paired differences."""
    names = {"kasa": "KaSA (kasa_ds)", "lora": "LoRA (PEFT)", "pissa": "PiSSA (PEFT)", "dora": "DoRA (PEFT)",
             "milora": "MiLoRA-style (PEFT LoRA, minor-triplet init)"}
    z, settings = result["zero_shot"], result["protocol"]["settings"]
    layers = settings["adapted_layers"]
    lines = [f"Format: {settings.get('format', 'letter')}; test set: {settings.get('test_set', 'bigbench')}; adapted "
             f"decoder layers {layers[0]}-{layers[-1]}; {settings['epochs']:g} epochs of batch {settings['batch']}; "
             f"LM head in {settings.get('head_dtype', 'float32')}.", "",
             f"Zero-shot base model: test accuracy **{z['accuracy']:.4f}**, validation {z['val_accuracy']:.4f} "
             f"(chance ≈ 0.333)" + (f"; with a float32 head {z['float32_head_accuracy']:.4f}, "
                                    f"{100 * z['float32_head_agreement']:.1f} % of the test predictions the same."
                                    if "float32_head_agreement" in z else "."), ""] + selection_lines(result, names)
    rate = "the fixed rate" if result["protocol"].get("fixed_lr") else "the selected rate"
    lines += ["", f"Test accuracy ({result['protocol']['items']['test']:,} items) at {rate}:", "",
              "| method | trainable params | lr | seeds | accuracy (mean ± std) | per seed | train s/run |",
              "|---|---|---|---|---|---|---|"]
    for method, runs in final_runs(result).items():
        acc = [r["accuracy"] for r in runs]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        lines.append(f"| {names[method]} | {runs[0]['trainable_params']:,} | {runs[0]['lr']:g} | {len(runs)} | "
                     f"{statistics.fmean(acc):.4f} ± {std:.4f} | {' / '.join(f'{x:.4f}' for x in acc)} | "
                     f"{statistics.fmean(r['train_seconds'] for r in runs):.0f} |")
    lines += ["", "KaSA minus each method, paired by seed (accuracy points; McNemar pools the item predictions of "
              "those seeds):", "", "| vs | seeds | mean difference | 95 % CI | paired t-test p | KaSA-only / "
              "other-only correct | McNemar p |", "|---|---|---|---|---|---|---|"]
    for other, row in result["paired"].items():
        ci = "[{:+.2f}, {:+.2f}]".format(*(100 * x for x in row["ci95"])) if "ci95" in row else "–"
        lines.append(f"| {names[other]} | {len(row['seeds'])} | {100 * row['mean']:+.2f} | {ci} | "
                     f"{row.get('t_test_p', float('nan')):.3f} | {row['mcnemar_base_only']} / "
                     f"{row['mcnemar_other_only']} | {row['mcnemar_p']:.3f} |")
    if "lora" in result["paired"]:
        lines += ["", f"Pre-registered decision, KaSA vs LoRA: **{decision(result['paired']['lora'])}**."]
    return "\n".join(lines) + "\n"


def decision(row: dict) -> str:
    """The protocol's rule: better (worse) when the 95 % interval of KaSA − LoRA lies above (below) 0 and McNemar's
    p < 0.05; otherwise no difference resolved, with the differences the interval leaves possible."""
    low, high = row.get("ci95", (-math.inf, math.inf))
    interval = f"KaSA − LoRA between {100 * low:+.2f} and {100 * high:+.2f} points"
    if low > 0 or high < 0:
        if row["mcnemar_p"] < 0.05:
            return "KaSA better" if low > 0 else "KaSA worse"
        return (f"no difference resolved by the rule: the 95 % interval lies {'above' if low > 0 else 'below'} 0 "
                f"({interval}) but McNemar's p = {row['mcnemar_p']:.3f} ≥ 0.05")
    return f"no difference resolved at this size ({interval})"


def selection_lines(result: dict, names: dict) -> list[str]:
    """The validation accuracy of every selection run (markdown table), or the fixed rates."""
    protocol = result["protocol"]
    if protocol.get("fixed_lr"):
        fixed = ", ".join(f"{names[m]} {lr:g}" for m, lr in protocol["fixed_lr"].items())
        return [f"Rates fixed, no selection: {fixed}."]
    lines = [f"Learning-rate selection (validation accuracy, seed {protocol['selection_seed']}; **bold** = selected):",
             "", "| method | " + " | ".join(f"lr {lr:g}" for lr in protocol["lrs"]) + " |",
             "|---|" + "---|" * len(protocol["lrs"])]
    for method in protocol["methods"]:
        cells = []
        for lr in protocol["lrs"]:
            run = next((r for r in result["runs"] if (r["method"], r["seed"], r["lr"]) ==
                        (method, protocol["selection_seed"], lr)), None)
            text = f"{run['val_accuracy']:.4f}" if run else "–"
            cells.append(f"**{text}**" if lr == result["selected_lr"].get(method) else text)
        lines.append(f"| {names[method]} | " + " | ".join(cells) + " |")
    return lines

