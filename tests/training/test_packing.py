"""Packing (data.packing): rows of whole examples with restarting position_ids and no attention across examples.

Exactness: the model's loss is the mean over label tokens (after the causal shift); a packed batch holds the same
label tokens as the same examples run unpacked and padded (each example's first label is never predicted in either),
and each token attends to its own example only, so the two losses agree to float32 reduction order (1e-5)."""

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama, write_uneven_instructions
from kasa_ds.training.data import IGNORE_INDEX, collate, pack

REPO = Path(__file__).resolve().parents[2]


def examples(n=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 21, (1,), generator=g))
        ids = torch.randint(3, 96, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def test_packed_loss_equals_the_unpacked_token_weighted_loss():
    model = tiny_llama().eval()
    items = examples()
    rows = pack(items, max_length=48)
    assert all(len(r["input_ids"]) <= 48 for r in rows) and len(rows) < len(items)
    packed_ids = sorted(tuple(r["input_ids"][s:s + n]) for r in rows
                        for s, n in _segments(r["position_ids"]))
    assert packed_ids == sorted(tuple(x["input_ids"]) for x in items)  # every example, whole, once
    with torch.no_grad():
        unpacked = model(**collate(items, pad_id=0)).loss
        packed = model(**collate(rows, pad_id=0)).loss
        leaky = model(input_ids=collate(rows, pad_id=0)["input_ids"], labels=collate(rows, pad_id=0)["labels"]).loss
    assert abs(packed.item() - unpacked.item()) <= 1e-5 * abs(unpacked.item())
    assert abs(leaky.item() - unpacked.item()) > 1e-3  # without position_ids, examples would attend to each other


def _segments(positions):
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    return [(a, b - a) for a, b in zip(starts, starts[1:])]


def test_recipe_trains_packed_and_reports_throughput(tmp_path, capsys):
    from make_tiny_llama import build

    from kasa_ds.training.config import load_train_config
    from kasa_ds.training.recipe import run_recipe

    model_dir = build(tmp_path / "tiny", hidden=48, layers=2, vocab=320)
    rc = run_recipe(load_train_config(str(REPO / "configs/tiny_llama_instruct.yaml"), [
        f"model.path={model_dir}", f"output_dir={tmp_path / 'run'}", "data.packing=true", "model.max_length=256",
        "data.max_eval_examples=8", "train.micro_batch_size=2", "train.max_steps=4", "train.log_every=1"]))
    assert rc == 0
    out = capsys.readouterr().out
    assert "packing: " in out and "tok/s" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if '"train"' in line]
    assert all(r["tokens_per_s"] > 0 and 0 <= r["padding"] < 0.5 for r in rows)


def run(tmp_path, model_dir, data, name, *extra):
    from kasa_ds.training.config import load_train_config
    from kasa_ds.training.recipe import run_recipe

    out = tmp_path / name
    assert run_recipe(load_train_config(str(REPO / "configs/tiny_llama_instruct.yaml"), [
        f"model.path={model_dir}", f"output_dir={out}", f"data.train={data}", "model.max_length=160",
        "kasa.dropout=0.0", "data.eval=null", "train.max_steps=3", "train.lr_schedule=constant",
        "train.warmup_steps=0", *extra])) == 0
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"train"' in line]


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_accumulation_is_token_weighted(tmp_path, packing):
    """Micro-batches with an order of magnitude more label tokens than others: 2 micro-batches of 2 must give the
    step of one batch of 4 (the token mean over the step), not the mean of the two micro-batches' means."""
    from make_tiny_llama import build

    model_dir = build(tmp_path / "tiny", hidden=48, layers=2, vocab=320)
    write_uneven_instructions(tmp_path / "data.jsonl")
    args = (tmp_path, model_dir, tmp_path / "data.jsonl")
    one = run(*args, "one", "train.micro_batch_size=4", f"data.packing={packing}")
    two = run(*args, "two", "train.micro_batch_size=2", "train.gradient_accumulation_steps=2",
              f"data.packing={packing}")
    assert two == pytest.approx(one, rel=1e-5)
