"""Examples for the recipe: record checks, encoding (sequence classification; causal LM with the prompt masked from
the loss), packing, batching and the global batch order.

Records come from kasa_ds.training.sources (files, globs, save_to_disk directories); the recipe tokenizes them once
into a cache (kasa_ds.training.tokenized); the in-memory datasets here serve small data and tools. Batches are
padded to the longest example; labels use -100 where no loss is taken.
"""

from __future__ import annotations

import bisect
from typing import Any, Iterable, Iterator, Optional

import torch

from .chat import CONVERSATIONAL, IGNORE_INDEX, ChatError, detect_format, encode_conversation, to_messages
from .sources import DataError, resolve

ALPACA_PROMPT = ("Below is an instruction that describes a task{with_input}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")


def load_records(path: str) -> list[dict[str, Any]]:
    """Every record of a data setting (file, glob, save_to_disk directory) as Python objects: for small data (the
    recipe streams through kasa_ds.training.tokenized instead). DataError naming the file and line."""
    records = [record for _, record in resolve(path).records()]
    if not records:
        raise DataError(f"{path}: no records (the file is empty); point data.train / data.eval at your data")
    return records


def check_records(records: list[dict], path: str, task: str, text_field: str = "text", label_field: str = "label",
                  fmt: str = "auto", num_labels: Optional[int] = None) -> str:
    """check_stream over in-memory records ("path: record N")."""
    pairs = ((f"{path}: record {number}", record) for number, record in enumerate(records, start=1))
    return check_stream(pairs, path, task, text_field, label_field, fmt, num_labels)[0]


def check_stream(pairs: Iterable[tuple[str, dict]], path: str, task: str, text_field: str = "text",
                 label_field: str = "label", fmt: str = "auto", num_labels: Optional[int] = None) -> tuple[str, int]:
    """Every (where, record) has what its task and format need, with the right types; DataError naming where and the
    fix, at the first bad record. Returns (format, number of records); ``auto`` is resolved from the first record."""
    count = 0
    for count, (where, record) in enumerate(pairs, start=1):
        try:
            if task != "causal_lm":
                check_classification_record(record, text_field, label_field, num_labels, where)
                continue
            fmt = detect_format(record, where) if fmt == "auto" else fmt
            check_causal_record(record, fmt, where)
        except ChatError as e:
            raise DataError(str(e)) from None
    if count == 0:
        raise DataError(f"{path}: no records (the file is empty); point data.train / data.eval at your data")
    return fmt, count


def check_classification_record(record: dict, text_field: str, label_field: str, num_labels: Optional[int],
                                where: str) -> None:
    missing = [k for k in (text_field, label_field) if k not in record]
    if missing:
        raise DataError(f"{where} lacks {missing} (its fields: {sorted(record)}); set data.text_field / "
                        "data.label_field")
    label = record[label_field]
    if isinstance(label, bool) or not str(label).lstrip("-").isdigit():
        raise DataError(f"{where}: label {label!r} is not an integer class")
    if num_labels is not None and not 0 <= int(label) < num_labels:
        raise DataError(f"{where}: label {label} is outside [0, {num_labels}); set model.num_labels")


CAUSAL_FIELDS = {"alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion"),
                 "text": ("text",), "messages": ("messages",), "sharegpt": ("conversations",)}


def check_causal_record(record: dict, fmt: str, where: str) -> None:
    missing = [k for k in CAUSAL_FIELDS[fmt] if k not in record]
    if missing:
        raise ChatError(f"{where} lacks {missing} (its fields: {sorted(record)}); data.format={fmt} needs "
                        f"{list(CAUSAL_FIELDS[fmt])}")
    if fmt in ("messages", "sharegpt"):
        to_messages(record, fmt, where)
        return
    for key in (*CAUSAL_FIELDS[fmt], "input"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise ChatError(f"{where}: '{key}' is a {type(record[key]).__name__}, not text")
    learned = {"alpaca": "output", "prompt_completion": "completion", "text": "text"}[fmt]
    if not record[learned].strip():
        raise ChatError(f"{where}: empty '{learned}' (nothing to learn); remove the record")


class ClassificationDataset(torch.utils.data.Dataset):
    """(text, integer label) pairs → {input_ids, labels}, in memory (the recipe caches through tokenized.py)."""

    def __init__(self, records: list[dict], tokenizer, max_length: int, text_field: str, label_field: str,
                 num_labels: int) -> None:
        check_records(records, "data", "seq_cls", text_field, label_field, num_labels=num_labels)
        self.examples = [encode_classification(r, tokenizer, max_length, text_field, label_field) for r in records]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ids, label = self.examples[i]
        return {"input_ids": ids, "labels": label}


def encode_classification(record: dict, tokenizer, max_length: int, text_field: str,
                          label_field: str) -> tuple[list[int], int]:
    return tokenizer(str(record[text_field]), truncation=True, max_length=max_length)["input_ids"], \
        int(record[label_field])


class CausalLMDataset(torch.utils.data.Dataset):
    """Causal-LM examples (input_ids, labels) from records of one format (kasa_ds.training.chat), in memory (the
    recipe caches through tokenized.py). Overlong and label-less examples: see encode_example; counted in
    ``truncated`` and ``dropped``."""

    def __init__(self, records: list[dict], tokenizer, max_length: int, fmt: str = "alpaca",
                 train_on_prompt: bool = False, overlong: str = "truncate", source: str = "data") -> None:
        self.examples: list[tuple[list[int], list[int]]] = []
        self.truncated = self.dropped = 0
        for number, record in enumerate(records, start=1):
            ids, labels, fate = encode_example(record, fmt, tokenizer, max_length, train_on_prompt, overlong,
                                               f"{source}: record {number}")
            self.truncated += fate == "truncated"
            self.dropped += fate == "dropped"
            if fate != "dropped":
                self.examples.append((ids, labels))
        if not self.examples:
            raise ValueError(f"{source}: no example has a response token within model.max_length={max_length}; "
                             "raise model.max_length")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids, labels = self.examples[i]
        return {"input_ids": ids, "labels": labels}


class InstructionDataset(CausalLMDataset):
    """Alpaca records {instruction, input?, output}: kasa_ds's Alpaca prompt + response + EOS (a conversation
    through the chat template when the tokenizer has one); loss on the response only."""

    def __init__(self, records: list[dict], tokenizer, max_length: int) -> None:
        super().__init__(records, tokenizer, max_length, fmt="alpaca")


def encode_example(record: dict, fmt: str, tokenizer, max_length: int, train_on_prompt: bool, overlong: str,
                   where: str) -> tuple[list[int], list[int], str]:
    """(input_ids, labels, fate) of one record within ``max_length``: fate "kept"; "truncated" (cut to max_length,
    ``overlong="truncate"``); "dropped" (longer and ``overlong="drop"``, or no label left: the prompt fills
    max_length)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; causal-LM training needs one to end responses")
    ids, labels = encode_record(record, fmt, tokenizer, train_on_prompt, where)
    fate = "kept"
    if len(ids) > max_length:
        if overlong == "drop":
            return ids, labels, "dropped"
        ids, labels, fate = ids[:max_length], labels[:max_length], "truncated"
    if all(lab == IGNORE_INDEX for lab in labels):
        return ids, labels, "dropped"
    return ids, labels, fate


def encode_record(record: dict, fmt: str, tokenizer, train_on_prompt: bool, where: str) -> tuple[list, list]:
    """(input_ids, labels) of one record, untruncated."""
    eos = [tokenizer.eos_token_id]
    if fmt in CONVERSATIONAL and (fmt != "alpaca" or tokenizer.chat_template):
        if not tokenizer.chat_template:
            raise ChatError(f"data.format={fmt} needs a chat template and the tokenizer has none; set "
                            "data.chat_template to a Jinja file or string")
        return encode_conversation(tokenizer, to_messages(record, fmt, where), train_on_prompt, where,
                                   tools=record.get("tools"))
    if fmt == "text":
        ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"] + eos
        return ids, list(ids)
    if fmt == "alpaca":
        prompt, response = format_prompt(record["instruction"], record.get("input") or ""), str(record["output"])
    else:
        prompt, response = record["prompt"], record["completion"]
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + eos
    return p_ids + r_ids, (p_ids if train_on_prompt else [IGNORE_INDEX] * len(p_ids)) + r_ids


class PackedDataset(torch.utils.data.Dataset):
    """Causal-LM examples bin-packed into rows of at most ``max_length`` tokens (best-fit decreasing, deterministic).

    A row is the concatenation of whole examples with ``position_ids`` restarting at 0 for each; given position_ids
    and no attention mask, transformers builds a block-causal mask (no attention across examples). Each example's
    first label is ignored: nothing of its own precedes its first token. The token-weighted loss of a packed batch
    is therefore that of the same examples run unpacked. Only the bins (example indices) are held; rows are built
    when read, so a memory-mapped dataset stays on disk.
    """

    def __init__(self, examples: torch.utils.data.Dataset, max_length: int) -> None:
        lengths = examples.lengths if hasattr(examples, "lengths") else \
            [len(examples[i]["input_ids"]) for i in range(len(examples))]
        self.source, self.bins = examples, pack_bins(lengths, max_length)
        self.examples, self.tokens = len(examples), sum(lengths)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return pack_row([self.source[j] for j in self.bins[i]])


def pack(items: list[dict], max_length: int) -> list[dict]:
    """Rows {input_ids, labels, position_ids} holding every item whole; each row ≤ max_length tokens."""
    return [pack_row([items[j] for j in b]) for b in pack_bins([len(x["input_ids"]) for x in items], max_length)]


def pack_bins(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: bins of item indices whose lengths sum to ≤ max_length (longest first, ties by index)."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted: best fit = the smallest room that fits
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([])
            room, b = max_length, len(bins) - 1
        else:
            room, b = free.pop(at)
        bins[b].append(i)
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], b))
    return bins


def pack_row(items: list[dict]) -> dict[str, list[int]]:
    """One packed row: the items concatenated, position_ids restarting per item, each item's first label ignored."""
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for item in items:
        row["input_ids"] += list(item["input_ids"])
        row["labels"] += [IGNORE_INDEX] + list(item["labels"][1:])
        row["position_ids"] += list(range(len(item["input_ids"])))
    return row


def format_prompt(instruction: str, input_text: str = "") -> str:
    if input_text:
        return ALPACA_PROMPT.format(with_input=", paired with an input that provides further context",
                                    instruction=instruction, input_block=f"### Input:\n{input_text}\n\n")
    return ALPACA_PROMPT.format(with_input="", instruction=instruction, input_block="")


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad input_ids (pad_id), attention_mask (0) and sequence labels (-100) to the longest example. Packed
    rows (with position_ids) get no attention mask: their padding is one more sequence (positions from 0)."""
    if "position_ids" in batch[0]:
        return collate_packed(batch, pad_id)
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    seq_labels = isinstance(batch[0]["labels"], list)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long) if seq_labels else \
        torch.tensor([b["labels"] for b in batch], dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        mask[i, :n] = 1
        if seq_labels:
            labels[i, :n] = torch.tensor(b["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_packed(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.arange(width).repeat(len(batch), 1)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        positions[i, :n] = torch.tensor(b["position_ids"])
        positions[i, n:] = torch.arange(width - n)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "use_cache": False}


def to_device(batch: dict, device: torch.device) -> dict:
    """The collated batch's tensors on ``device`` (flags such as use_cache as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def global_batches(num_examples: int, global_batch: int, seed: int, start_step: int = 0) -> Iterator[list[int]]:
    """Endless stream of global batches of example indices: epoch e is a permutation seeded by (seed, e).

    The stream depends only on (seed, global_batch), never on world size, so each rank takes its slice of the same
    global batch; ``start_step`` skips batches already trained on (resume replays the same order).
    """
    if num_examples < global_batch:
        raise ValueError(f"{num_examples} training examples cannot fill one global batch of {global_batch}")
    per_epoch = num_examples // global_batch  # drop the ragged tail batch of each epoch
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for b in range(offset, per_epoch):
            yield order[b * global_batch:(b + 1) * global_batch].tolist()
        step = (epoch + 1) * per_epoch


def rank_slice(indices: list[int], rank: int, world: int) -> list[int]:
    """This rank's contiguous share of a global batch."""
    per = len(indices) // world
    return indices[rank * per:(rank + 1) * per]


def eval_subset(records, limit: Optional[int]):
    """The first ``limit`` records or examples (all when None): a list or a dataset with ``head``."""
    if limit is None:
        return records
    return records.head(limit) if hasattr(records, "head") else records[:limit]
