"""A causal LM split for CPU runs: the frozen decoder layers below the adapted ones run once per sequence and their hidden states are cached; the top layers and the head score options from them (checked equal to the whole model)."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path

import torch

from ..progress import progress
from .socialiqa import LETTERS


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

