"""QKaSA modes on real pretrained weights: how far each effective 4-bit base is from the float32 W_world, and the
eval loss after a short fine-tune in each mode.

    python tools/qkasa_modes.py                       # MiniLM (the embedded default), NF4 + double quant, r = 8
    python tools/qkasa_modes.py --finetune-steps 100  # + the recipe in each mode on the bundled data

Effective base per mode (Q = 4-bit quantization, D = dequantization, tail(X) = X's dropped rank-r part):
    requantize           D(Q(X − tail(X)))
    low_rank_correction  D(Q(W)) − tail(X)
with X = D(Q(W)) when only the 4-bit checkpoint is at hand, or X = W when the 16-bit weights are (while loading).
Error: ‖effective − W_world‖_F / ‖W_world‖_F with W_world = W − tail(W) in float32, averaged over the targets.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


import torch


def quantize(w: torch.Tensor, quant_type: str) -> torch.Tensor:
    """D(Q(w)) with bitsandbytes blockwise 4-bit quantization (block 64, double quantization)."""
    import bitsandbytes.functional as bnbF

    q, state = bnbF.quantize_4bit(w.contiguous(), blocksize=64, quant_type=quant_type, compress_statistics=True)
    return bnbF.dequantize_4bit(q, state).float()


def weight_errors(r: int, quant_type: str, targets: tuple[str, ...]) -> dict:
    from safetensors.torch import load_file

    from kasa_ds.training.assets import embedded_model_dir
    from kasa_ds.core.truncation import tail_factors

    def tail(x):
        t = tail_factors(x, r, "gram")
        return (t.left @ t.right).float()

    state = load_file(str(embedded_model_dir() / "model.safetensors"))
    errors: dict[str, list[float]] = {}
    for key, w in state.items():
        if not (key.endswith(".weight") and w.dim() == 2 and any(f".{t}." in key + "." for t in targets)):
            continue
        w = w.float()
        world = w - tail(w)
        dq = quantize(w, quant_type)
        candidates = {
            "plain 4-bit base, no truncation": dq,
            "requantize (from 4-bit)": quantize(dq - tail(dq), quant_type),
            "low_rank_correction (from 4-bit)": dq - tail(dq),
            "requantize (from 16-bit)": quantize(world, quant_type),
            "low_rank_correction (from 16-bit)": dq - tail(w),
        }
        for name, eff in candidates.items():
            errors.setdefault(name, []).append(((eff - world).norm() / world.norm()).item())
    return {name: statistics.mean(v) for name, v in errors.items()} | {"matrices": len(next(iter(errors.values())))}


CHECKOUT = Path(__file__).resolve().parents[1]  # the embedded default: this checkout's configs/default.yaml


def finetune(mode: str, steps: int, out: Path, seed: int = 0, max_eval=None) -> dict:
    from kasa_ds.training.config import load_train_config
    from kasa_ds.training.recipe import run_recipe

    run_dir = out / f"{mode}-seed{seed}"
    rc = run_recipe(load_train_config(str(CHECKOUT / "configs" / "default.yaml"), [
        f"output_dir={run_dir}", "resume=none", "model.quantize=nf4", f"kasa.quant_mode={mode}",
        f"train.max_steps={steps}", "train.eval_every=100000", "train.save_every=100000", f"train.seed={seed}",
        f"kasa.init_seed={seed}", *([f"data.max_eval_examples={max_eval}"] if max_eval else [])],
        base_dirs=[str(CHECKOUT)]))
    assert rc == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "eval"][-1]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    p.add_argument("--finetune-steps", type=int, default=0)
    p.add_argument("--max-eval", type=int, help="cap on eval examples (default: all 400)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="fine-tune seeds (data order and adapter init)")
    p.add_argument("--out", default="outputs/qkasa_modes")
    p.add_argument("--json")
    a = p.parse_args(argv)
    result = {"weight_error": weight_errors(a.r, a.quant_type, ("query", "key", "value", "dense"))}
    print(f"MiniLM, {a.quant_type} + double quant, r={a.r}: mean relative error of the effective base vs float32 "
          f"W_world over {result['weight_error'].pop('matrices')} matrices")
    for name, err in result["weight_error"].items():
        print(f"  {name:36s} {err:.4f}")
    if a.finetune_steps:
        modes = ("low_rank_correction", "requantize")
        runs = {m: [finetune(m, a.finetune_steps, Path(a.out), s, a.max_eval) for s in a.seeds] for m in modes}
        result["finetune"] = {m: {"seeds": a.seeds, "loss": [ev["loss"] for ev in evs],
                                  "accuracy": [ev["accuracy"] for ev in evs]} for m, evs in runs.items()}

        def mean_std(values):
            return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"

        for mode, r in result["finetune"].items():
            print(f"  fine-tune {a.finetune_steps} steps, {mode:20s} ({len(a.seeds)} seeds): eval loss "
                  f"{mean_std(r['loss'])}, accuracy {mean_std(r['accuracy'])}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
