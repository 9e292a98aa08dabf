"""Data through ``datasets``: every file kind, globs of shards and save_to_disk directories give the same examples
as the in-memory path; examples are tokenized once into an Arrow cache beside the data that later runs memory-map,
keyed by everything that decides them; bad sources are one line naming the fix."""

import json
import os
import re
from pathlib import Path

import pytest

from kasa_ds.training.data import CausalLMDataset, DataError
from kasa_ds.training.sources import resolve
from kasa_ds.training.tokenized import Encoding, checked, tokenized

REPO = Path(__file__).resolve().parents[2]
RECORDS = [{"prompt": f"Q{i}: what is {i} plus {i}?", "completion": f" {2 * i}, of course" + " really" * (i % 5)}
           for i in range(24)]
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from make_tiny_llama import build
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build(tmp_path_factory.mktemp("tiny-src"), hidden=32, layers=1, vocab=320))


def write_kinds(root: Path, records: list[dict]) -> dict[str, str]:
    """The same records as JSONL, JSON, CSV, Parquet shards (a glob), an Arrow file and a save_to_disk directory."""
    import datasets

    root.mkdir(parents=True, exist_ok=True)
    (root / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "all.json").write_text(json.dumps(records))
    table = datasets.Dataset.from_list(records)
    table.to_csv(str(root / "all.csv"), index=False)
    half = len(records) // 2
    (root / "shards").mkdir()
    table.select(range(half)).to_parquet(str(root / "shards" / "part-0.parquet"))
    table.select(range(half, len(records))).to_parquet(str(root / "shards" / "part-1.parquet"))
    table.save_to_disk(str(root / "saved"))
    arrow = next((root / "saved").glob("*.arrow"))
    os.link(arrow, root / "all.arrow")
    return {"jsonl": str(root / "all.jsonl"), "json": str(root / "all.json"), "csv": str(root / "all.csv"),
            "parquet glob": str(root / "shards" / "*.parquet"), "arrow": str(root / "all.arrow"),
            "saved": str(root / "saved")}


def test_every_kind_gives_the_in_memory_examples(tmp_path, tokenizer):
    expected = CausalLMDataset(RECORDS, tokenizer, 24, fmt="prompt_completion")
    assert expected.truncated > 0  # the overlong path is exercised too
    encoding = Encoding("causal_lm", "prompt_completion", 24)
    for kind, spec in write_kinds(tmp_path / "data", RECORDS).items():
        source = resolve(spec)
        assert checked(source, tmp_path / "cache" / kind, "causal_lm", "auto", "text", "label", None) == \
            ("prompt_completion", len(RECORDS)), kind
        got = tokenized(source, encoding, tokenizer, tmp_path / "cache" / kind, True, lambda: None)
        assert [got[i] for i in range(len(got))] == [expected[i] for i in range(len(expected))], kind
        assert (got.truncated, got.dropped) == (expected.truncated, expected.dropped), kind
        assert got.lengths == [len(ids) for ids, _ in expected.examples]


def test_the_cache_is_reused_memory_mapped_and_keyed(tmp_path, tokenizer):
    data = Path(write_kinds(tmp_path / "data", RECORDS)["jsonl"])
    source, encoding = resolve(str(data)), Encoding("causal_lm", "prompt_completion", 24)
    cache = source.cache_dir()
    assert cache == data.parent / ".kasa_ds_cache"  # beside the data
    first = tokenized(source, encoding, tokenizer, cache, True, lambda: None)
    again = tokenized(source, encoding, tokenizer, cache, True, lambda: None)
    assert not first.cached and again.cached and again.path == first.path
    assert [again[i] for i in range(len(again))] == [first[i] for i in range(len(first))]
    assert again.table.cache_files == [{"filename": str(first.path)}]  # rows stay in the memory-mapped file
    assert not list(cache.glob("*.partial"))
    other_length = tokenized(source, Encoding("causal_lm", "prompt_completion", 32), tokenizer, cache, True,
                             lambda: None)
    assert not other_length.cached and other_length.truncated < first.truncated
    templated = Encoding("causal_lm", "alpaca", 64)
    tokenizer.chat_template, saved = TEMPLATE, tokenizer.chat_template
    try:
        (tmp_path / "alpaca.jsonl").write_text(json.dumps({"instruction": "hi", "output": "yo"}) + "\n")
        alpaca = resolve(str(tmp_path / "alpaca.jsonl"))
        with_template = tokenized(alpaca, templated, tokenizer, tmp_path / "c2", True, lambda: None)
        tokenizer.chat_template = None
        without = tokenized(alpaca, templated, tokenizer, tmp_path / "c2", True, lambda: None)
        assert not without.cached and without[0] != with_template[0]  # the template is part of the key
    finally:
        tokenizer.chat_template = saved
    with open(data, "a") as f:  # new contents: a new cache, not the stale one
        f.write(json.dumps({"prompt": "Q: new?", "completion": " yes"}) + "\n")
    grown = tokenized(resolve(str(data)), encoding, tokenizer, cache, True, lambda: None)
    assert not grown.cached and len(grown) == len(first) + 1


def test_checks_are_cached_and_bad_rows_are_named(tmp_path):
    import datasets

    bad = RECORDS[:3] + [{"prompt": "Q?", "completion": "  "}]
    datasets.Dataset.from_list(bad).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad.parquet: row 4: empty 'completion'"):
        checked(resolve(str(tmp_path / "bad.parquet")), tmp_path / "c", "causal_lm", "auto", "t", "l", None)
    assert not list((tmp_path / "c").glob("checked-*"))  # a failed check leaves no marker
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    checked(resolve(str(good)), tmp_path / "c", "causal_lm", "auto", "t", "l", None)
    assert len(list((tmp_path / "c").glob("checked-*"))) == 1


@pytest.mark.parametrize("make,message", [
    (lambda d: str(d / "nothing-*.jsonl"), "no file matches"),
    (lambda d: str(d / "missing.jsonl"), "no such file"),
    (lambda d: (d / "x.txt").write_text("hi") and str(d / "x.txt"), "unsupported data file"),
    (lambda d: ((d / "a.jsonl").write_text("{}"), (d / "a.csv").write_text("x"), str(d / "a.*"))[-1],
     "the shards mix file kinds"),
    (lambda d: str(d), "not a datasets.save_to_disk one"),
])
def test_bad_sources_name_the_fix(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        resolve(make(tmp_path))


def test_recipe_reads_parquet_shards_and_reuses_the_cache(tmp_path, capsys):
    import datasets
    from make_tiny_llama import build

    from kasa_ds.training.config import load_train_config
    from kasa_ds.training.recipe import run_recipe

    rows = [json.loads(line) for line in (REPO / "data/rt_instruct/train.jsonl").read_text().splitlines()[:64]]
    (tmp_path / "shards").mkdir()
    for part in range(2):
        datasets.Dataset.from_list(rows[part::2]).to_parquet(str(tmp_path / "shards" / f"train-{part}.parquet"))
    model_dir = build(tmp_path / "tiny", hidden=32, layers=1, vocab=320)

    def run(out):
        return run_recipe(load_train_config(str(REPO / "configs/tiny_llama_instruct.yaml"), [
            f"model.path={model_dir}", f"data.train={tmp_path}/shards/*.parquet", "data.eval=null",
            "train.max_steps=2", "train.micro_batch_size=4", "train.log_every=1", f"output_dir={out}"]))

    assert run(tmp_path / "run1") == 0
    built = re.search(r"data.train: (\d+) examples tokenized, cached as (\S+)", capsys.readouterr().out)
    assert built and Path(built[2]).parent == tmp_path / "shards" / ".kasa_ds_cache"
    assert run(tmp_path / "run2") == 0
    assert f"data.train: {built[1]} examples read from the cache {built[2]}" in capsys.readouterr().out
