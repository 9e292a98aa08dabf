"""Failure modes (#17): writers never destroy user data, bad numbers are refused up front, a failed load leaves the
model as it was, two trainings cannot share an output directory, non-finite training stops loudly."""

from pathlib import Path

import pytest
import torch

from conftest import ALL_LLAMA_TARGETS, randomize_adapters, tiny_llama, write_checkpoints
from kasa_ds import KaSAConfig, apply_kasa, save_adapter
from kasa_ds.training import checkpoint

REPO = Path(__file__).resolve().parents[2]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as the recipe leaves it: two checkpoints (each a KaSA adapter), metrics, the adapter."""
    model = tiny_llama()
    apply_kasa(model, KaSAConfig(r=4, target_modules=["q_proj"]), show_progress=False)
    run = tmp_path / "run"
    write_checkpoints(model, run)
    (run / "metrics.jsonl").write_text('{"step": 4}\n')
    save_adapter(model, run / "adapter")
    return model, run


def test_writers_refuse_outputs_that_would_destroy_data(tmp_path, run_dir):
    from export_adapter import export, export_lora
    from precompute_svd import main as precompute

    model, run = run_dir
    before = snapshot(run)
    for out, why in ((run, "which this command reads"), (run / "checkpoints", "exists, is not empty"),
                     (run / "checkpoints" / "step-0000004", "which this command reads")):
        with pytest.raises(SystemExit, match=why) as e:
            export(run if out != run / "checkpoints" / "step-0000004" else out, out)
        assert e.value.code == 2
    assert snapshot(run) == before  # every checkpoint, the metrics and the adapter are still there
    assert export(run, tmp_path / "exported") == tmp_path / "exported"
    export(run, tmp_path / "exported")  # an earlier export of the same kind is replaced
    # the base model: never the cache's destination; a non-empty foreign directory neither
    tiny_llama().save_pretrained(tmp_path / "base")
    base = snapshot(tmp_path / "base")
    args = ["--model", str(tmp_path / "base"), "--kasa-r", "4", "--targets", "q_proj"]
    for out in (tmp_path / "base", run):
        with pytest.raises(SystemExit) as e:
            precompute([*args, "--out", str(out)])
        assert e.value.code == 2
    assert snapshot(tmp_path / "base") == base and snapshot(run) == before
    precompute([*args, "--out", str(tmp_path / "cache")])
    precompute([*args, "--out", str(tmp_path / "cache")])  # an earlier cache is replaced
    # save_adapter: an earlier adapter is replaced, anything else refused
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("user data")
    with pytest.raises(ValueError, match="exists, is not empty"):
        save_adapter(model, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "user data"
    save_adapter(model, run / "adapter")
    # a LoRA export never replaces a KaSA adapter
    with pytest.raises(SystemExit, match="not an earlier output"):
        export_lora(run, tmp_path / "exported", tmp_path / "base")


@pytest.mark.parametrize("override,why", [
    ("train.lr=inf", "finite"), ("train.lr=1e400", "finite"), ("kasa.alpha=nan", "finite"),
    ("train.max_grad_norm=-1", "max_grad_norm=-1.0: must be > 0"), ("train.max_grad_norm=0", "must be > 0"),
    ("train.weight_decay=-0.1", "must be >= 0"), ("kasa.beta=inf", "finite"),
    ("train.max_memory_gib=nan", "finite")])
def test_every_numeric_key_is_range_checked(override, why):
    from kasa_ds.training.config import ConfigError, load_train_config

    with pytest.raises(ConfigError, match=why):
        load_train_config(str(REPO / "configs/default.yaml"), [override], base_dirs=[REPO])


@pytest.mark.parametrize("argument", [["--gpus", "-8"], ["--gpus", "0"], ["--micro-batch", "-4"],
                                      ["--gpu-gib", "nan"], ["--dropout", "1.5"], ["--r", "0"]])
def test_plan_memory_refuses_impossible_arguments(argument, capsys):
    from plan_memory import main

    with pytest.raises(SystemExit) as e:
        main(["--model", str(REPO / "configs/models/llama-3-8b"), *argument])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_the_planner_refuses_impossible_shapes():
    from kasa_ds.training.memory_plan import RunShape

    for kw in ({"gpus": 0}, {"micro_batch": -4}, {"tp": 0}, {"dropout": 1.0}):
        with pytest.raises(ValueError, match="must be"):
            RunShape(**kw)


def llama(intermediate=128, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=intermediate,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64, tie_word_embeddings=False)).eval()


def test_a_failed_load_adapter_leaves_the_model_unchanged(tmp_path):
    from kasa_ds import kasa_layers, load_adapter

    trained = llama(intermediate=112)
    apply_kasa(trained, KaSAConfig(r=4, target_modules=ALL_LLAMA_TARGETS), show_progress=False)
    randomize_adapters(trained)
    save_adapter(trained, tmp_path / "other_shape")
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit this model.*of another shape.*left unchanged"):
        load_adapter(model, tmp_path / "other_shape", show_progress=False)
    assert not list(kasa_layers(model)) and getattr(model, "kasa_config", None) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing truncated
    # a NaN adapter (a diverged run's) is refused the same way, naming the file
    from safetensors.torch import load_file, save_file

    fits = llama()
    apply_kasa(fits, KaSAConfig(r=4, target_modules=ALL_LLAMA_TARGETS), show_progress=False)
    save_adapter(fits, tmp_path / "nan")
    state = load_file(str(tmp_path / "nan" / "adapter_model.safetensors"))
    next(iter(state.values()))[0] = float("nan")
    save_file(state, str(tmp_path / "nan" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="adapter_model.safetensors: 1 tensor.*NaN or inf"):
        load_adapter(model, tmp_path / "nan", show_progress=False)
    assert not list(kasa_layers(model))


def test_outputs_follow_the_umask(tmp_path):
    import os
    import stat

    model = tiny_llama()
    apply_kasa(model, KaSAConfig(r=4, target_modules=["q_proj"]), show_progress=False)
    old = os.umask(0o022)
    try:
        save_adapter(model, tmp_path / "adapter")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "adapter").stat().st_mode) == 0o755  # group can read it on shared storage


def recipe_config(model_dir, out, *extra):
    from kasa_ds.training.config import load_train_config

    return load_train_config(str(REPO / "configs/tiny_llama_instruct.yaml"), [
        f"model.path={model_dir}", f"output_dir={out}", "data.max_eval_examples=8", "train.micro_batch_size=4",
        "model.max_length=96", "train.log_every=1", *extra])


def test_a_second_training_on_the_same_output_dir_is_refused(tmp_path, tiny_llama_dir, capsys):
    from kasa_ds.training.recipe import run_recipe
    from kasa_ds.training.run_lock import RunLock

    holder = RunLock(tmp_path / "run")
    holder.acquire()  # another training holds the directory
    try:
        assert run_recipe(recipe_config(tiny_llama_dir, tmp_path / "run", "train.max_steps=1")) == 2
        assert "is in use by another training (pid" in capsys.readouterr().err
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
    finally:
        holder.release()
    assert run_recipe(recipe_config(tiny_llama_dir, tmp_path / "run", "train.max_steps=1")) == 0  # released: runs


def test_diverging_training_stops_loudly_and_writes_nothing_nonfinite(tmp_path, tiny_llama_dir, capsys):
    import math

    from kasa_ds.training.recipe import EXIT_DIVERGED, run_recipe

    out = tmp_path / "run"
    rc = run_recipe(recipe_config(tiny_llama_dir, out, "train.lr=1e6", "train.lr_schedule=constant",
                                  "train.warmup_steps=0", "train.max_steps=12", "train.save_every=1"))
    err = capsys.readouterr().err
    assert rc == EXIT_DIVERGED and "training diverged: 3 consecutive steps" in err
    assert not (out / "adapter").exists()
    from safetensors.torch import load_file

    for ckpt in (out / "checkpoints").glob("step-*"):  # only the finite steps before it went wrong
        assert all(torch.isfinite(v).all() for v in load_file(str(ckpt / "adapter_model.safetensors")).values())
    import json

    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"train"' in line]
    assert not math.isfinite(losses[-1])


def test_nan_outputs_make_evaluation_fail(tmp_path):
    from kasa_ds.training.data import collate
    from kasa_ds.training.evaluation import TrainingDiverged, evaluate

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")  # a corrupted base
    data = [{"input_ids": list(range(3, 13)), "labels": list(range(3, 13))}] * 4
    with pytest.raises(TrainingDiverged, match="eval loss is nan"):
        evaluate(model, data, lambda b: collate(b, 0), 2, torch.device("cpu"), 0, 1, "causal_lm")


def test_resume_none_moves_an_earlier_run_aside_and_pruning_spares_other_runs(tmp_path, tiny_llama_dir, capsys):
    from kasa_ds.training.recipe import run_recipe

    out = tmp_path / "run"
    assert run_recipe(recipe_config(tiny_llama_dir, out, "train.max_steps=4", "train.save_every=2",
                                    "train.keep_checkpoints=1")) == 0
    assert run_recipe(recipe_config(tiny_llama_dir, out, "resume=none", "train.max_steps=2", "train.save_every=1",
                                    "train.keep_checkpoints=2")) == 0
    assert "resume=none: the earlier run in" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    (previous,) = (out / "previous-runs").iterdir()
    assert (previous / "checkpoints" / "step-0000004").is_dir() and (previous / "adapter").is_dir()
    assert "max_steps: 2" in (out / "config.yaml").read_text()
    # pruning by run id: a checkpoint of another run in the same directory is never removed
    foreign = out / "checkpoints" / "step-0000009"
    (out / "checkpoints" / "step-0000002").rename(foreign)
    meta = foreign / "meta.json"
    meta.write_text(meta.read_text().replace('"run_id": "', '"run_id": "other-'))
    assert run_recipe(recipe_config(tiny_llama_dir, out, "resume=none", "train.max_steps=3", "train.save_every=1",
                                    "train.keep_checkpoints=1")) == 0
    assert not foreign.exists()  # moved aside with the rest of that run, never deleted
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000003"]
    assert any((p / "checkpoints" / "step-0000009").is_dir() for p in (out / "previous-runs").iterdir())
    tmp = checkpoint.begin(out, 4)
    checkpoint.commit(tmp, {"step": 4, "run_id": "third", "fingerprint": {}}, keep=1)
    assert (out / "checkpoints" / "step-0000003").is_dir()  # another run's: kept


def test_resume_refuses_changed_settings_data_and_incomplete_checkpoints(tmp_path, tiny_llama_dir, capsys):
    import shutil

    from kasa_ds.training.recipe import run_recipe

    data = tmp_path / "train.jsonl"
    shutil.copy(REPO / "data/rt_instruct/train.jsonl", data)
    out = tmp_path / "run"
    base = ["train.lr_schedule=constant", f"data.train={data}", "train.save_every=1"]
    assert run_recipe(recipe_config(tiny_llama_dir, out, *base, "train.max_steps=2")) == 0
    capsys.readouterr()
    for change, named in (("train.lr=5e-3", "train.lr"), ("model.max_length=64", "model.max_length"),
                          ("kasa.dropout=0.2", "kasa.dropout")):
        assert run_recipe(recipe_config(tiny_llama_dir, out, *base, "train.max_steps=3", change)) == 2
        err = capsys.readouterr().err
        assert "was written with other settings" in err and named in err, change
    with open(data, "a") as f:
        f.write('{"instruction": "new", "input": "", "output": "record"}\n')
    assert run_recipe(recipe_config(tiny_llama_dir, out, *base, "train.max_steps=3")) == 2
    assert "data.train_contents" in capsys.readouterr().err
    shutil.copy(REPO / "data/rt_instruct/train.jsonl", data)  # the same contents again: resumable
    (out / "checkpoints" / "step-0000002" / "rng_state_rank0.pt").unlink()
    assert run_recipe(recipe_config(tiny_llama_dir, out, *base, "train.max_steps=3")) == 2
    assert "is incomplete: rng_state_rank0.pt missing" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    (b"", "no records (the file is empty)"),
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output"\n', "train.jsonl:2: not valid JSON"),
    (b'{"instruction": "caf\xe9", "output": "b"}\n', "train.jsonl:1: not UTF-8 text"),
    (b'{"instruction": "a", "output": "b"}\n' * 2 + b'{"instruction": "c"}\n', "train.jsonl:3 lacks ['output']"),
    (b'{"instruction": "a", "output": "  "}\n', "train.jsonl:1: empty 'output'"),
    (b'{"instruction": "a", "output": 7}\n', "train.jsonl:1: 'output' is a int, not text"),
    (b'[1, 2]\n', "train.jsonl:1: a list, not an object"),
])
def test_bad_data_is_one_line_naming_file_and_record_before_the_model_loads(tmp_path, tiny_llama_dir, capsys,
                                                                              content, message):
    from kasa_ds.training.recipe import run_recipe

    data = tmp_path / "train.jsonl"
    data.write_bytes(content)
    assert run_recipe(recipe_config(tiny_llama_dir, tmp_path / "run", f"data.train={data}")) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err, captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "KaSA:" not in captured.out
    assert not (tmp_path / "run").exists()  # nothing loaded, nothing written


def test_targets_and_r_are_checked_from_config_json_before_loading(tmp_path, tiny_llama_dir, capsys):
    from kasa_ds.training.recipe import run_recipe

    for override, message in (("kasa.target_modules=[qproj]", "matched no module"),
                              ("kasa.r=48", "KaSA rank r=48 is invalid")):
        assert run_recipe(recipe_config(tiny_llama_dir, tmp_path / "run", override)) == 2
        captured = capsys.readouterr()
        assert message in captured.err and "KaSA:" not in captured.out
        assert not (tmp_path / "run").exists()


def test_svd_cache_refuses_another_model_of_the_same_layout(tmp_path):
    """A base and its 'instruct' variant: same files, sizes and headers, other weights. The cache of one must not
    truncate the other (the truncated weights would be off by the difference, and full-rank)."""
    from precompute_svd import main as precompute

    from kasa_ds.io.hf_checkpoint import fingerprint
    from kasa_ds.io.svd_cache import SVDCache

    tiny_llama(seed=1).save_pretrained(tmp_path / "base")
    tiny_llama(seed=2).save_pretrained(tmp_path / "instruct")
    assert fingerprint(tmp_path / "base") == fingerprint(tmp_path / "instruct")  # what 0.1 keyed the cache on
    cache = precompute(["--model", str(tmp_path / "base"), "--kasa-r", "4", "--targets", "q_proj,v_proj",
                        "--out", str(tmp_path / "cache")])
    config = KaSAConfig(r=4, target_modules=["q_proj", "v_proj"])
    SVDCache(cache, tmp_path / "base", config)  # its own model: accepted
    with pytest.raises(ValueError, match="computed from other weights.*recompute it"):
        SVDCache(cache, tmp_path / "instruct", config)


def test_a_full_disk_during_a_checkpoint_is_one_clear_line(tmp_path, tiny_llama_dir, capsys):
    """A real full disk: the run's output_dir on a 192 KiB tmpfs (mounting needs root; skipped otherwise)."""
    from conftest import small_tmpfs
    from kasa_ds.training.recipe import EXIT_DISK_FULL, run_recipe

    with small_tmpfs(tmp_path / "small", "192k") as mount:
        out = mount / "run"
        rc = run_recipe(recipe_config(tiny_llama_dir, out, "train.max_steps=4", "train.save_every=1",
                                      "kasa.r=16", "tensorboard=false"))
        err = capsys.readouterr().err
        assert rc == EXIT_DISK_FULL and f"the disk holding {out / 'checkpoints'} is full" in err, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert "MiB free" in err and len(errors) == 1 and err.strip().endswith(errors[0].split(": ", 1)[1][-40:])
        assert not list((out / "checkpoints").glob(".*tmp"))  # no partial checkpoint left


def test_float16_loss_scale_skips_are_not_divergence(tmp_path, tiny_llama_dir, monkeypatch):
    """float16 autocast whose loss scaler starts far too high (a real GradScaler at 2^100): every step overflows and
    is skipped by the scaler, which halves its scale; that is loss scaling at work, not a diverging run."""
    import json

    from kasa_ds.training import backends
    from kasa_ds.training.recipe import run_recipe

    monkeypatch.setattr(backends, "grad_scaler", lambda device, dtype: torch.amp.GradScaler(device.type,
                                                                                           init_scale=2.0 ** 100))
    out = tmp_path / "run"
    assert run_recipe(recipe_config(tiny_llama_dir, out, "train.autocast=float16", "train.max_steps=5",
                                    "train.max_nonfinite_steps=2")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert rows[-1]["loss_scale_skips"] == 5 and all(r["loss"] == r["loss"] for r in rows)  # finite losses
