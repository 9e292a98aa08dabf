"""KaSA initialization time: kasa_ds vs PEFT's KaSA variant on the same randomly initialized Llama, in one run.

Both start from identical weights; runs are interleaved (PEFT, kasa_ds, PEFT, ...) and the medians compared. The
error of each is the largest relative Frobenius error of a truncated weight against the float64 full-SVD truncation
of the original weight.

    python tools/bench_init.py                       # hidden 1024, ff 2816, 4 layers, 7 targets, r = 16
    python tools/bench_init.py --smoke               # tiny shapes, one repeat (what the tests run)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(hidden: int, ff: int, layers: int, heads: int, kv_heads: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def init_peft(model, r: int, solver: str):
    from peft import KasaConfig, LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                            kasa_config=KasaConfig()))


def init_kasa_ds(model, r: int, solver: str):
    from kasa_ds import KaSAConfig, apply_kasa

    apply_kasa(model, KaSAConfig(r=r, alpha=2 * r, target_modules=TARGETS, svd_solver=solver), show_progress=False)
    return model


def truncated_weights(model) -> dict[str, torch.Tensor]:
    """Target name (as in the base model) → its base weight, for a PEFT- or kasa_ds-adapted model."""
    out = {}
    for name, p in model.named_parameters():
        if name.endswith("base_layer.weight"):
            key = name.removeprefix("base_model.model.").removesuffix(".base_layer.weight")
            out[key] = p.detach()
    return out


def max_rel_error(weights: dict[str, torch.Tensor], references: dict[str, torch.Tensor]) -> float:
    return max(((weights[k].double() - ref).norm() / ref.norm()).item() for k, ref in references.items())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ff", type=int, default=2816)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--solver", default="auto", help="kasa_ds svd_solver")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if a.smoke:
        a.hidden, a.ff, a.layers, a.heads, a.kv_heads, a.r, a.repeats = 64, 176, 1, 4, 4, 4, 1

    base = build_model(a.hidden, a.ff, a.layers, a.heads, a.kv_heads)
    from kasa_ds.truncation import reference_world

    references = {n: reference_world(m.weight, a.r) for n, m in base.named_modules()
                  if n.rsplit(".", 1)[-1] in TARGETS}
    times: dict[str, list[float]] = {"peft": [], "kasa_ds": []}
    errors: dict[str, float] = {}
    for rep in range(a.repeats):
        for label, init in (("peft", init_peft), ("kasa_ds", init_kasa_ds)):
            model = copy.deepcopy(base)
            tic = time.perf_counter()
            adapted = init(model, a.r, a.solver)
            times[label].append(time.perf_counter() - tic)
            if rep == 0:
                errors[label] = max_rel_error(truncated_weights(adapted), references)
            del model, adapted
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "config": {"hidden": a.hidden, "ff": a.ff, "layers": a.layers, "targets": len(TARGETS), "r": a.r,
                   "matrices": len(references), "solver": a.solver, "threads": torch.get_num_threads(),
                   "torch": torch.__version__},
        "median_seconds": med, "all_seconds": times, "max_rel_error_vs_fp64": errors,
        "speedup_kasa_ds_over_peft": med["peft"] / med["kasa_ds"],
    }
    print(f"KaSA init, Llama hidden={a.hidden} ff={a.ff} layers={a.layers}, {len(references)} matrices, r={a.r}, "
          f"{torch.get_num_threads()} threads, median of {a.repeats}")
    print(f"{'method':10s} {'seconds':>9s} {'max rel err vs fp64':>20s}")
    for label in ("peft", "kasa_ds"):
        print(f"{label:10s} {med[label]:9.3f} {errors[label]:20.2e}")
    print(f"speedup kasa_ds / PEFT: {result['speedup_kasa_ds_over_peft']:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
