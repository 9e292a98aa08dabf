"""tools/compare_llm.py (the pre-registered LLM comparison, docs/PROTOCOL_LLM_SIQA.md) on a tiny Gemma-3 with a real
SentencePiece tokenizer and a few made-up multiple-choice items: no network, no archives."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", minversion="0.21", reason="compare_llm compares against PEFT's LoRA ([dev] dependency)")
pytest.importorskip("scipy", reason="compare_llm's statistics use scipy ([dev] dependency)")

from kasa_ds.experiments import compare_llm, methods, report, socialiqa, split_model, stats  # noqa: E402


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    """A 3-layer Gemma3ForCausalLM (sliding + full attention layers) with the tiny Llama's SentencePiece tokenizer,
    and 40 train / 12 test items whose answer is the option that repeats a word of the question."""
    from make_tiny_llama import build
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    root = tmp_path_factory.mktemp("tiny_gemma")
    tokenizer_dir = build(root / "llama", layers=1)
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                              max_position_embeddings=256, layer_types=["sliding_attention", "sliding_attention",
                                                                        "full_attention"])
    Gemma3ForCausalLM(config).save_pretrained(root / "model")
    for f in Path(tokenizer_dir).iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".model") or f.name == "special_tokens_map.json":
            shutil.copy(f, root / "model" / f.name)
    rng = random.Random(0)
    for name, n in (("train", 40), ("test", 12)):
        with open(root / f"{name}.jsonl", "w") as f:
            for i in range(n):
                options = ["say hello", "leave the room", "sing a song"][:2 if i == 5 else 3]
                label = rng.randrange(len(options))
                question = f"Alex wanted to {options[label].split()[0]} at party {i}. What will Alex do?"
                f.write(json.dumps({"question": question, "options": options, "label": label}) + "\n")
    return root


def run(root: Path, out: Path, *extra: str) -> dict:
    return compare_llm.main(["--model", str(root / "model"), "--data", str(root), "--out", str(out), "--cache-dir",
                             str(root / "cache"), "--adapt-top", "2", "--batch", "8", "--eval-every", "2",
                             "--lrs", "1e-3", "1e-2", "--seeds-others", "0", "--epochs", "1", *extra])


def test_split_model_reproduces_the_whole_model(tiny_gemma):
    """Cached layer-0 output + the top 2 layers (sliced layer_types) = the whole model: full and letter logits at the
    last position, and the cloze options' token log-likelihoods."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma / "model")
    items = [json.loads(line) for line in (tiny_gemma / "test.jsonl").read_text().splitlines()]
    ids = [torch.tensor(tokenizer(socialiqa.prompt(i)).input_ids) for i in items]
    whole = split_model.load_causal_lm(str(tiny_gemma / "model"), "cpu")
    states = split_model.frozen_states(whole, ids, 1, 5, "cpu")
    tokens, mask, last = split_model.padded(ids, "cpu")
    cloze = [seq for i in items[:4] for seq in socialiqa.sequences(i, "cloze", tokenizer)]
    cloze_states = split_model.frozen_states(whole, [torch.tensor(i) for i, _ in cloze], 1, 5, "cpu")
    with torch.no_grad():
        want = whole(input_ids=tokens, attention_mask=mask).logits[torch.arange(len(ids)), last]
        top = split_model.cut_to_top(split_model.load_causal_lm(str(tiny_gemma / "model"), "cpu"), 1)
        assert len(top.model.layers) == 2 and top.config.layer_types == ["sliding_attention", "full_attention"]
        head = split_model.Head(top, torch.float32)
        got = split_model.answer_logits(top, head, *split_model.padded(states, "cpu"))
        letters = socialiqa.answer_tokens(tokenizer)
        got_letters = split_model.answer_logits(top, head, *split_model.padded(states, "cpu"), torch.tensor(letters))
        logp, owner = split_model.token_logprobs(top, head, *split_model.padded(cloze_states, "cpu")[:2],
                                                 [s for _, s in cloze], [torch.tensor(i[s:]) for i, s in cloze])
        want_logp = torch.cat([whole(input_ids=torch.tensor([i])).logits[0, s - 1:-1].log_softmax(-1)
                               .gather(1, torch.tensor(i[s:])[:, None])[:, 0] for i, s in cloze])
    # float32, the same kernels on differently padded batches: agreement to float32 rounding
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_letters, want[:, letters], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-5)
    # each option is "<question>\nAnswer:" + " <option>": 3 sequences per item, scored tokens = the option's
    assert len(cloze) == 12 and owner.tolist() == sorted(owner.tolist())
    option = tokenizer(" say hello", add_special_tokens=False).input_ids
    assert cloze[0][0][cloze[0][1]:] == option


def test_compare_llm_runs_every_method_and_resumes(tiny_gemma, tmp_path, capsys):
    out = tmp_path / "out"
    result = run(tiny_gemma, out, "--seeds", "0")
    log = capsys.readouterr().out
    assert "check: cached layers 0-0 + top layers reproduce the whole model's logits" in log
    assert "% of the predictions the same" in log  # the bfloat16 head is compared with a float32 head
    saved = json.loads((out / "results.json").read_text())
    assert saved["protocol"]["items"] == {"train": 36, "validation": 4, "test": 12}
    assert set(saved["selected_lr"]) == set(methods.METHODS)
    assert {(r["method"], r["lr"]) for r in saved["runs"]} == {(m, lr) for m in methods.METHODS for lr in (1e-3, 1e-2)}
    params = {r["method"]: r["trainable_params"] for r in saved["runs"]}
    # r = 8 on q/k/v/up/down of 2 layers: KaSA has LoRA's factors + its 8 singular values per module
    assert params["kasa"] == params["lora"] + 2 * 5 * 8 == params["pissa"] + 80 == params["milora"] + 80
    assert params["dora"] > params["lora"]
    for r in saved["runs"]:
        assert len(r["predictions"]) == 12 and len(r["train_loss"]) == r["steps"] == 5
        assert 0.0 <= r["accuracy"] <= 1.0 and r["curve"][0]["step"] == 0 and r["curve"][-1]["step"] == 5
    assert len(saved["zero_shot"]["predictions"]) == 12 and len(saved["test_labels"]) == 12
    assert 0.0 <= saved["zero_shot"]["float32_head_agreement"] <= 1.0
    assert saved["protocol"]["settings"]["format"] == "cloze"
    assert set(saved["paired"]) == {"lora", "pissa", "dora", "milora"}
    assert (out / "curves.png").stat().st_size > 0 and "| KaSA (kasa_ds) |" in (out / "report.md").read_text()
    assert result["selected_lr"] == saved["selected_lr"]

    # --resume with two more KaSA/LoRA seeds: the 10 runs made are kept as they are, only the 4 new ones run
    resumed = run(tiny_gemma, out, "--seeds", "0", "1", "2", "--resume")
    assert resumed["runs"][:10] == saved["runs"]
    assert sorted((r["method"], r["seed"]) for r in resumed["runs"][10:]) == [
        ("kasa", 1), ("kasa", 2), ("lora", 1), ("lora", 2)]
    paired = resumed["paired"]["lora"]
    assert paired["seeds"] == [0, 1, 2] and len(paired["ci95"]) == 2 and 0.0 <= paired["t_test_p"] <= 1.0
    assert "check:" not in capsys.readouterr().out  # the frozen layers' outputs came from the cache


def test_statistics_and_selection():
    labels = "ABCA"
    runs = {"kasa": [{"method": "kasa", "seed": s, "accuracy": a, "predictions": p}
                     for s, a, p in ((0, 1.0, "ABCA"), (1, 0.75, "ABCB"))],
            "lora": [{"method": "lora", "seed": s, "accuracy": a, "predictions": p}
                     for s, a, p in ((0, 0.5, "ABAB"), (1, 0.5, "CBCB"))]}
    row = stats.paired(runs, labels)["lora"]
    assert row["differences"] == [0.5, 0.25] and row["mean"] == 0.375
    # KaSA alone right: seed 0 on items 3 and 4, seed 1 on item 1; LoRA alone right: never
    assert (row["mcnemar_base_only"], row["mcnemar_other_only"]) == (3, 0)
    assert row["mcnemar_p"] == pytest.approx(2 * 0.5 ** 3)  # exact two-sided binomial
    assert row["ci95"][0] < row["mean"] < row["ci95"][1]
    # the pre-registered rule: both the interval and McNemar must agree before a winner is named
    assert report.decision(row).startswith("no difference resolved")  # 2 seeds: the interval spans 0
    assert report.decision({**row, "ci95": [0.1, 0.6]}).startswith("no difference")  # McNemar p = 0.25
    assert report.decision({**row, "ci95": [0.1, 0.6], "mcnemar_p": 0.01}) == "KaSA better"
    assert report.decision({**row, "ci95": [-0.6, -0.1], "mcnemar_p": 0.01}) == "KaSA worse"
    chosen = stats.select_rates([{"method": "kasa", "seed": 0, "lr": lr, "val_accuracy": v}
                                       for lr, v in ((1e-3, 0.6), (3e-4, 0.6), (3e-3, 0.5))], 0)
    assert chosen == {"kasa": 3e-4}  # a tie goes to the smaller rate


def test_reads_the_evals_socialiqa_format():
    line = json.dumps({"input": [{"role": "user", "content": "Jan paid; then left. Why? A: to be kind; B: a; b; "
                                                             "C: to go home."}], "ideal": "B"})
    assert socialiqa.parse_evals_item(line) == {"question": "Jan paid; then left. Why?",
                                                  "options": ["to be kind", "a; b", "to go home"], "label": 1}


def test_fixed_rates_skip_the_selection(tiny_gemma, tmp_path, capsys):
    """The protocol's secondary run: each method at a given rate, no selection runs (here in the original letter
    format); a bad --fixed-lr is one error."""
    result = run(tiny_gemma, tmp_path / "fixed", "--methods", "kasa", "lora", "--seeds", "0",
                 "--fixed-lr", "kasa=1e-3", "lora=1e-2", "--format", "letter", "--head-dtype", "float32")
    assert result["protocol"]["settings"]["format"] == "letter" and len(result["runs"][0]["predictions"]) == 12
    assert sorted((r["method"], r["lr"]) for r in result["runs"]) == [("kasa", 1e-3), ("lora", 1e-2)]
    assert "Rates fixed, no selection" in (tmp_path / "fixed" / "report.md").read_text()
    for bad, message in ((["kasa=1e-3"], "give one rate per method"), (["kasa:1e-3", "lora=1"], "write METHOD=LR")):
        with pytest.raises(SystemExit, match=message):
            run(tiny_gemma, tmp_path / "bad", "--methods", "kasa", "lora", "--fixed-lr", *bad)


def test_test_split_is_carved_from_the_evals_items(tiny_gemma, tmp_path):
    """Amendment 1: 224 validation items (the same as registered), 1,000 test, 1,000 train, disjoint; a --data
    directory without test.jsonl is split the same way."""
    pool = [{"question": f"q{i}", "options": ["a", "b", "c"], "label": i % 3} for i in range(2224)]
    carved, registered = socialiqa.split(pool, carve_test=True), socialiqa.split(pool, carve_test=False)
    assert {k: len(v) for k, v in carved.items()} == {"train": 1000, "validation": 224, "test": 1000}
    assert carved["validation"] == registered["validation"] and len(registered["train"]) == 2000
    names = [{i["question"] for i in v} for v in carved.values()]
    assert len(set.union(*names)) == 2224
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny_gemma / "train.jsonl", data / "train.jsonl")
    args = compare_llm.parse_args(["--data", str(data)])
    assert {k: len(v) for k, v in socialiqa.load_items(args).items()} == {"train": 18, "validation": 4, "test": 18}
