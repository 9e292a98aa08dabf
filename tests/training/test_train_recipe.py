"""launch/train.py end to end: both tasks, config errors, checkpoints and resume."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("train_recipe", REPO / "launch" / "train.py")
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)


def read_metrics(out: Path, split="train"):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def causal_args(model_dir, out, *extra):
    return ["--config", str(REPO / "configs/tiny_llama_instruct.yaml"), f"model.path={model_dir}",
            "--output_dir", str(out), "data.max_eval_examples=16", "train.micro_batch_size=4", "model.max_length=96",
            "train.lr_schedule=constant", "train.warmup_steps=0", "train.log_every=1", *extra]


@pytest.mark.slow
def test_embedded_default_runs_and_writes_a_loadable_adapter(tmp_path, capsys):
    out = tmp_path / "run"
    rc = recipe.main(["--output_dir", str(out), "train.max_steps=4", "train.save_every=2", "train.eval_every=2",
                      "train.keep_checkpoints=1", "data.max_eval_examples=48", "train.micro_batch_size=8"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "eval before: loss" in printed and "eval after:  loss" in printed and "accuracy" in printed
    train = read_metrics(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["kasa_reg"] > 0 and r["loss"] > 0 for r in train)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000004"]  # keep_checkpoints=1, no tmp left
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard is installed with [dev]
    # the final adapter loads on the original base and is not a fresh (ΔW = 0) one
    from transformers import AutoModelForSequenceClassification

    from kasa_ds import kasa_layers, load_adapter
    from kasa_ds.training.assets import embedded_model_dir

    model = AutoModelForSequenceClassification.from_pretrained(embedded_model_dir(), num_labels=2)
    load_adapter(model, out / "adapter", show_progress=False)
    assert all(layer.lora_B.weight.abs().sum() > 0 for _, layer in kasa_layers(model))


@pytest.mark.slow
def test_causal_lm_resume_replays_the_uninterrupted_run(tiny_llama_dir, tmp_path):
    """Stop after 3 steps, resume to 6: steps 4–6 have the losses of an uninterrupted 6-step run (same data
    order, optimizer state and dropout RNG). Constant LR so the shorter first leg has the same schedule."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert recipe.main(causal_args(tiny_llama_dir, full, "train.max_steps=6", "train.save_every=3")) == 0
    assert recipe.main(causal_args(tiny_llama_dir, cut, "train.max_steps=3", "train.save_every=3")) == 0
    assert recipe.main(causal_args(tiny_llama_dir, cut, "train.max_steps=6", "train.save_every=3")) == 0
    expect = {r["step"]: r["loss"] for r in read_metrics(full)}
    got = {r["step"]: r["loss"] for r in read_metrics(cut)}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expect[step], rel=1e-6, abs=1e-7), step  # same ops, same order
    assert expect[6] < expect[1]  # and it learns
    evals = read_metrics(cut, "eval")
    assert "perplexity" in evals[-1]


def test_corrupted_or_foreign_checkpoint_is_refused_and_kept(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert recipe.main(causal_args(tiny_llama_dir, out, "train.max_steps=1", "train.save_every=1")) == 0
    ckpt = out / "checkpoints" / "step-0000001"
    assert recipe.main(causal_args(tiny_llama_dir, out, "train.max_steps=2", "kasa.r=4")) == 2
    assert "was written with other settings (kasa.r: checkpoint 8 vs run 4)" in capsys.readouterr().err and ckpt.is_dir()
    (ckpt / "meta.json").write_text("{not json")
    assert recipe.main(causal_args(tiny_llama_dir, out, "train.max_steps=2")) == 2
    err = capsys.readouterr().err
    assert "corrupted" in err and "resume=<dir>" in err
    assert ckpt.is_dir() and (ckpt / "adapter_model.safetensors").is_file()  # nothing deleted


@pytest.mark.parametrize("args, message", [
    (["train.lrr=1"], "unknown config key 'train.lrr'; did you mean train.lr?"),
    (["train.lr=fast"], "train.lr='fast': expected float"),
    (["model.task=translate"], "model.task='translate': choose seq_cls or causal_lm"),
    (["data.train=/no/such.jsonl"], "data.train=/no/such.jsonl: file or directory not found"),
    (["--config", "/no/such.yaml"], "--config /no/such.yaml: file not found"),
    (["--ds_config", "/no/ds.json"], "--ds_config /no/ds.json: file not found"),
    (["model.path=/tmp"], "model.path=/tmp: not a model directory with config.json"),
    (["kasa.r=0"], "kasa: KaSAConfig.r must be a positive integer"),
    (["kasa.target_modules=5"], "kasa.target_modules=5: expected list or str"),
    (["lr=1"], "unknown config key 'lr'"),
    (["tensor_parallel=2"], "tensor_parallel=2 needs the DeepSpeed launcher and --ds_config"),
    (["sequence_parallel=true"], "sequence_parallel: true needs backend: megatron"),
    (["tensor_parallel=2", "--ds_config", "ds_configs/zero2.json"], "tensor_parallel is supported for model.task=causal_lm"),
    (["train.optimizer=adamw8bit", "--ds_config", "ds_configs/zero2.json"],
     "train.optimizer=adamw8bit with --ds_config"),
    (["train.autocast=bfloat16", "--ds_config", "ds_configs/zero2.json"], "train.autocast with --ds_config"),
    (["train.optimizer=sgd"], "train.optimizer='sgd': choose adamw, adamw8bit or paged_adamw8bit"),
])
def test_bad_config_is_one_clear_line_before_any_model_loads(args, message, capsys):
    assert recipe.main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {message}")
    assert len(captured.err.strip().splitlines()) == 1
    assert "KaSA:" not in captured.out  # nothing was loaded


def test_several_ranks_without_deepspeed_are_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert recipe.main(["train.max_steps=1"]) == 2
    assert "2 ranks without --ds_config" in capsys.readouterr().err


def test_bad_yaml_and_cli_exit_code(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: [unclosed\n")
    proc = subprocess.run([sys.executable, str(REPO / "launch/train.py"), "--config", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --config {bad}: not valid YAML")


def test_instruction_prompt_is_masked_from_the_loss(tiny_llama_dir):
    from transformers import AutoTokenizer

    from kasa_ds.training.data import IGNORE_INDEX, InstructionDataset, collate, format_prompt

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    rec = {"instruction": "Classify.", "input": "A fine film.", "output": "positive"}
    ds = InstructionDataset([rec], tok, max_length=256)
    ex = ds[0]
    n_prompt = len(tok(format_prompt("Classify.", "A fine film."))["input_ids"])
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["input_ids"][-1] == tok.eos_token_id
    batch = collate([ex, {"input_ids": ex["input_ids"][:5], "labels": ex["labels"][:5]}], pad_id=0)
    assert batch["attention_mask"][1].sum() == 5 and (batch["labels"][1, 5:] == IGNORE_INDEX).all()


def test_batch_order_is_independent_of_world_size():
    from kasa_ds.training.data import global_batches, rank_slice

    one = global_batches(100, 8, seed=3)
    two = global_batches(100, 8, seed=3)
    for _ in range(30):  # crosses epoch boundaries (12 batches per epoch)
        g = next(one)
        assert rank_slice(g, 0, 2) + rank_slice(g, 1, 2) == next(two)
    resumed = global_batches(100, 8, seed=3, start_step=17)
    fresh = global_batches(100, 8, seed=3)
    for _ in range(17):
        next(fresh)
    assert next(resumed) == next(fresh)
    assert sorted(sum((next(global_batches(100, 8, 3, s)) for s in range(12)), [])) == sorted(
        torch.randperm(100, generator=torch.Generator().manual_seed(300009))[:96].tolist())


def test_hf_dataset_saved_to_disk_trains(tiny_llama_dir, tmp_path):
    """data.train / data.eval may be directories written by datasets' save_to_disk."""
    datasets = pytest.importorskip("datasets", reason="datasets is a [dev] dependency")
    records = [json.loads(line) for line in (REPO / "data/rt_instruct/train.jsonl").read_text().splitlines()[:64]]
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "train_ds"))
    datasets.Dataset.from_list(records[:8]).save_to_disk(str(tmp_path / "eval_ds"))
    out = tmp_path / "run"
    assert recipe.main(causal_args(tiny_llama_dir, out, f"data.train={tmp_path / 'train_ds'}",
                                   f"data.eval={tmp_path / 'eval_ds'}", "train.max_steps=2")) == 0
    assert len(read_metrics(out)) == 2 and read_metrics(out, "eval")


def test_float16_autocast_with_loss_scaling_trains(tiny_llama_dir, tmp_path):
    """train.autocast=float16: forward in fp16 under torch.autocast, the loss scaled by a GradScaler (unscaled before
    clipping), adapters and optimizer in float32; the model still learns (eval loss falls), every loss is finite."""
    out = tmp_path / "fp16"
    assert recipe.main(causal_args(tiny_llama_dir, out, "train.autocast=float16", "train.max_steps=8",
                                   "train.eval_every=100")) == 0
    losses = [r["loss"] for r in read_metrics(out)]
    evals = read_metrics(out, "eval")
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert evals[-1]["loss"] < evals[0]["loss"]
    # the loss scale is checkpointed with the optimizer, and a resumed run reads it back
    state = torch.load(out / "checkpoints" / "step-0000008" / "trainer_state.pt", weights_only=True)
    assert state["grad_scaler"]["scale"] > 0
    assert recipe.main(causal_args(tiny_llama_dir, out, "train.autocast=float16", "train.max_steps=10",
                                   "train.eval_every=100")) == 0
    assert [r["step"] for r in read_metrics(out)][-2:] == [9, 10]
