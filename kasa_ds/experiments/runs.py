"""Training runs of the comparisons: one (method, seed, lr) run each, resumable result files, the zero-shot baseline."""

from __future__ import annotations

import argparse
import json
import math
import time
from functools import partial
from pathlib import Path

import torch

from ..progress import progress
from ..training.data import (
    ClassificationDataset,
    collate,
    eval_subset,
    global_batches,
    load_records,
)
from ..training.evaluation import evaluate
from ..training.models import load_tokenizer
from ..training.precision import lr_factor
from .methods import TARGETS, adapt, build_classifier
from .socialiqa import answer_tokens, load_items, sequences
from .split_model import Head, Split, cached_prefix, cut_to_top, load_causal_lm


def run_one(method: str, seed: int, cfg, a) -> dict:
    t = cfg.train
    tokenizer = load_tokenizer(cfg.model)
    make = partial(ClassificationDataset, tokenizer=tokenizer, max_length=cfg.model.max_length,
                   text_field=cfg.data.text_field, label_field=cfg.data.label_field, num_labels=cfg.model.num_labels)
    train_set = make(load_records(cfg.data.train))
    eval_set = make(eval_subset(load_records(cfg.data.eval), a.max_eval))
    batch_of = partial(collate, pad_id=tokenizer.pad_token_id)
    model, params, reg_fn = build_classifier(method, cfg, a.r or cfg.kasa.r, seed, tokenizer.pad_token_id)
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


def train_one(method: str, seed: int, lr: float, a, splits: dict, below: int, device) -> dict:
    """Adapt, train one schedule on the train split, score validation and test; the run's record."""
    train, val, test = splits["train"], splits["validation"], splits["test"]
    model = cut_to_top(load_causal_lm(a.model, device), below)
    head = Head(model, getattr(torch, a.head_dtype))
    params, regularizer = adapt(method, model, a.r, seed)
    steps = max(1, math.ceil(a.epochs * len(train) / a.batch))
    warmup = int(a.warmup * steps)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    shuffle = torch.Generator().manual_seed(seed)  # the same batches for every method of a seed
    order = torch.cat([torch.randperm(len(train), generator=shuffle) for _ in range(math.ceil(a.epochs))]).tolist()
    curve = [{"step": 0, "val_accuracy": val.evaluate(model, head, a.batch, device)["accuracy"]}]
    losses, tic = [], time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        loss = train.loss(model, head, order[(step - 1) * a.batch:step * a.batch], device)
        total = loss + regularizer(model) if regularizer else loss
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 5))
        if step % a.eval_every == 0 or step == steps:
            curve.append({"step": step, "val_accuracy": val.evaluate(model, head, a.batch, device)["accuracy"]})
    seconds = time.perf_counter() - tic
    scored = test.evaluate(model, head, a.batch, device)
    return {"method": method, "seed": seed, "lr": lr, "accuracy": scored["accuracy"],
            "test_option_loss": scored["loss"],
            "val_accuracy": curve[-1]["val_accuracy"], "trainable_params": sum(p.numel() for p in params),
            "steps": steps, "train_seconds": round(seconds, 1), "train_loss": losses, "curve": curve,
            "predictions": scored["predictions"]}


def settings_of(a, below: int, n_layers: int) -> dict:
    data = a.data or ("socialiqa (evals 3.0.1.post1" + (" / bigbench 1.0.0)" if a.test_set == "bigbench" else ")"))
    return {"model": str(Path(a.model).resolve()), "data": data, "test_set": a.test_set, "format": a.format,
            "head_dtype": a.head_dtype, "adapted_layers": list(range(below, n_layers)), "r": a.r,
            "targets": list(TARGETS), "epochs": a.epochs, "batch": a.batch, "warmup": a.warmup,
            "eval_every": a.eval_every, "max_test": a.max_test, "torch": torch.__version__}


def build_splits(a, below: int, device) -> dict[str, Split]:
    """The train/validation/test items as cached layer inputs (the frozen layers run once for every sequence)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    letters = answer_tokens(tokenizer) if a.format == "letter" else None
    items = load_items(a)
    seqs = {name: [sequences(i, a.format, tokenizer) for i in its] for name, its in items.items()}
    flat = [seq for per_split in seqs.values() for per_item in per_split for seq in per_item]
    print(", ".join(f"{len(v)} {k}" for k, v in items.items()) + f" items ({len(flat)} sequences, {a.format} format)",
          flush=True)
    states = cached_prefix(a, below, [ids for ids, _ in flat], device)
    splits, at = {}, 0
    for name, its in items.items():
        n = sum(len(per_item) for per_item in seqs[name])
        splits[name], at = Split(its, a.format, states[at:at + n], seqs[name], letters), at + n
    return splits


def zero_shot(a, splits: dict, below: int, device) -> dict:
    """The untouched model on the test and validation splits; with a 16-bit head, also the float32 head's test
    accuracy and the fraction of test predictions both heads agree on."""
    base = cut_to_top(load_causal_lm(a.model, device), below)
    head = Head(base, getattr(torch, a.head_dtype))
    out = {**splits["test"].evaluate(base, head, a.batch, device),
           "val_accuracy": splits["validation"].evaluate(base, head, a.batch, device)["accuracy"]}
    if a.head_dtype != "float32":
        exact = splits["test"].evaluate(base, Head(base, torch.float32), a.batch, device)
        same = sum(x == y for x, y in zip(exact["predictions"], out["predictions"])) / len(out["predictions"])
        out.update(float32_head_accuracy=exact["accuracy"], float32_head_agreement=same)
    print(f"zero-shot: test accuracy {out['accuracy']:.4f}" + (
        f" (float32 head {out['float32_head_accuracy']:.4f}, {100 * out['float32_head_agreement']:.1f} % of the "
        "predictions the same)" if "float32_head_agreement" in out else ""), flush=True)
    return out


def save(result: dict, out: Path) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "results.json")


def fixed_rates(a) -> dict[str, float]:
    """``--fixed-lr kasa=1e-3 lora=3e-4`` → {method: rate}, covering every --methods entry (else one error line)."""
    try:
        fixed = {m: float(lr) for m, lr in (item.split("=", 1) for item in a.fixed_lr)}
    except ValueError:
        raise SystemExit(f"error: --fixed-lr {' '.join(a.fixed_lr)}: write METHOD=LR, e.g. kasa=1e-3") from None
    if fixed and set(fixed) != set(a.methods):
        raise SystemExit(f"error: --fixed-lr names {sorted(fixed)} but --methods is {a.methods}: give one rate per "
                         "method")
    return fixed


def run_jobs(result: dict, jobs: list[tuple], a, splits: dict, below: int, device, out: Path) -> None:
    """Run the (method, seed, lr) jobs not yet in ``result``, saving results.json after each."""
    done = {(r["method"], r["seed"], r["lr"]) for r in result["runs"]}
    todo = [j for j in dict.fromkeys(jobs) if j not in done]
    bar = progress(todo, desc="runs", unit="run")
    for method, seed, lr in bar:
        run = train_one(method, seed, lr, a, splits, below, device)
        result["runs"].append(run)
        save(result, out)
        bar.write(f"{method} seed {seed} lr {lr:g}: validation {run['val_accuracy']:.4f}, test {run['accuracy']:.4f} "
                  f"({run['train_seconds']:.0f} s, {run['steps']} steps)")

