"""Datasets for the recipe: sequence classification and Alpaca-style instruction tuning (prompt masked from loss).

Records come from .jsonl, .json (a list of objects), .csv, or a directory written by ``datasets.save_to_disk``.
Batches are padded to the longest example; labels use -100 where no loss is taken.
"""

from __future__ import annotations

import bisect
import csv
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from .chat import CONVERSATIONAL, IGNORE_INDEX, ChatError, detect_format, encode_conversation, to_messages
ALPACA_PROMPT = ("Below is an instruction that describes a task{with_input}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")


class DataError(ValueError):
    """A malformed data file or record: one line naming the file, the line/row and the fix."""


def load_records(path: str) -> list[dict[str, Any]]:
    """Every record of a .jsonl/.json/.csv file or a ``save_to_disk`` directory; DataError naming the file and line
    for invalid JSON, non-UTF-8 bytes, a non-object record or an empty file."""
    records = _read_records(path)
    if not records:
        raise DataError(f"{path}: no records (the file is empty); point data.train / data.eval at your data")
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{path}: record {bad + 1} is a {type(records[bad]).__name__}, not an object with fields")
    return records


def _read_records(path: str) -> list:
    if os.path.isdir(path):
        try:
            import datasets
        except ImportError:
            raise ImportError(f"{path} is a directory: reading a saved HF dataset needs `pip install datasets`") \
                from None
        data = datasets.load_from_disk(path)
        if isinstance(data, datasets.DatasetDict):
            raise ValueError(f"{path} holds a DatasetDict with splits {list(data)}: point at one split's directory")
        return [dict(row) for row in data]
    if path.endswith(".jsonl"):
        records = []
        for number, line in enumerate(_text(path).splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}); fix or remove "
                                    "that line") from None
        return records
    if path.endswith(".json"):
        try:
            data = json.loads(_text(path))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records")
        return data
    if path.endswith(".csv"):
        return list(csv.DictReader(_text(path).splitlines()))
    raise ValueError(f"{path}: unsupported data format; use .jsonl, .json, .csv or a datasets.save_to_disk directory")


def _text(path: str) -> str:
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); re-encode "
                        "the file as UTF-8") from None


def check_records(records: list[dict], path: str, task: str, text_field: str = "text", label_field: str = "label",
                  fmt: str = "auto") -> str:
    """Every record has what its task and format need, with the right types; DataError naming the file and record.
    Returns the format (``auto`` resolved from the first record, kasa_ds.training.chat)."""
    if task == "causal_lm":
        fmt = detect_format(records[0], f"{path}: record 1") if fmt == "auto" else fmt
        for number, record in enumerate(records, start=1):
            try:
                check_causal_record(record, fmt, f"{path}: record {number}")
            except ChatError as e:
                raise DataError(str(e)) from None
        return fmt
    for number, record in enumerate(records, start=1):
        missing = [k for k in (text_field, label_field) if k not in record]
        if missing:
            raise DataError(f"{path}: record {number} lacks {missing} (its fields: {sorted(record)}); set "
                            "data.text_field / data.label_field")
        if isinstance(record[label_field], bool) or not str(record[label_field]).lstrip("-").isdigit():
            raise DataError(f"{path}: record {number}: label {record[label_field]!r} is not an integer class")
    return fmt


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
    """(text, integer label) pairs → {input_ids, attention_mask, labels}."""

    def __init__(self, records: list[dict], tokenizer, max_length: int, text_field: str, label_field: str,
                 num_labels: int) -> None:
        for i, rec in enumerate(records[:1] + records[-1:]):
            missing = [k for k in (text_field, label_field) if k not in rec]
            if missing:
                raise ValueError(f"data record lacks field(s) {missing}; set data.text_field / data.label_field "
                                 f"(record keys: {sorted(rec)})")
        self.encodings = tokenizer([str(r[text_field]) for r in records], truncation=True, max_length=max_length)
        self.labels = [int(r[label_field]) for r in records]
        bad = sorted({lab for lab in self.labels if not 0 <= lab < num_labels})
        if bad:
            raise ValueError(f"labels {bad[:5]} are outside [0, {num_labels}); set model.num_labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": self.encodings["input_ids"][i], "labels": self.labels[i]}


class CausalLMDataset(torch.utils.data.Dataset):
    """Causal-LM examples (input_ids, labels) from records of one format (kasa_ds.training.chat).

    Longer than ``max_length``: truncated (``overlong="truncate"``, counted in ``truncated``) or dropped; an example
    whose kept part has no label (its prompt fills max_length) is dropped; both counted in ``dropped``.
    """

    def __init__(self, records: list[dict], tokenizer, max_length: int, fmt: str = "alpaca",
                 train_on_prompt: bool = False, overlong: str = "truncate", source: str = "data") -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; causal-LM training needs one to end responses")
        self.examples: list[tuple[list[int], list[int]]] = []
        self.truncated = self.dropped = 0
        for number, record in enumerate(records, start=1):
            ids, labels = encode_record(record, fmt, tokenizer, train_on_prompt, f"{source}: record {number}")
            if len(ids) > max_length:
                if overlong == "drop":
                    self.dropped += 1
                    continue
                ids, labels = ids[:max_length], labels[:max_length]
                self.truncated += 1
            if all(lab == IGNORE_INDEX for lab in labels):
                self.dropped += 1  # the prompt alone fills max_length: nothing to learn from
                continue
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


def encode_record(record: dict, fmt: str, tokenizer, train_on_prompt: bool, where: str) -> tuple[list, list]:
    """(input_ids, labels) of one record, untruncated."""
    eos = [tokenizer.eos_token_id]
    if fmt in CONVERSATIONAL and (fmt != "alpaca" or tokenizer.chat_template):
        if not tokenizer.chat_template:
            raise ChatError(f"data.format={fmt} needs a chat template and the tokenizer has none; set "
                            "data.chat_template to a Jinja file or string")
        return encode_conversation(tokenizer, to_messages(record, fmt, where), train_on_prompt, where)
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
    is therefore that of the same examples run unpacked.
    """

    def __init__(self, examples: CausalLMDataset, max_length: int) -> None:
        self.rows = pack([examples[i] for i in range(len(examples))], max_length)
        self.examples = len(examples)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.rows[i]


def pack(items: list[dict], max_length: int) -> list[dict]:
    """Rows {input_ids, labels, position_ids} holding every item whole; each row ≤ max_length tokens."""
    order = sorted(range(len(items)), key=lambda i: (-len(items[i]["input_ids"]), i))
    rows: list[dict] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: best fit = the smallest room that fits
    for i in order:
        ids, labels = items[i]["input_ids"], items[i]["labels"]
        at = bisect.bisect_left(free, (len(ids), -1))
        if at == len(free):
            rows.append({"input_ids": [], "labels": [], "position_ids": []})
            room, row = max_length, len(rows) - 1
        else:
            room, row = free.pop(at)
        rows[row]["input_ids"] += ids
        rows[row]["labels"] += [IGNORE_INDEX] + list(labels[1:])
        rows[row]["position_ids"] += list(range(len(ids)))
        if room - len(ids) > 0:
            bisect.insort(free, (room - len(ids), row))
    return rows


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


def eval_subset(records: list[dict], limit: Optional[int]) -> list[dict]:
    return records if limit is None else records[:limit]
