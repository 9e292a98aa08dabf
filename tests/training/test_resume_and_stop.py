"""Resumes that would change the run, checkpoints that are not the run's own, stops that must not wait, and the
recipe's one-line errors (issue #27): each case refused or handled before any model loads, with what changed named."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
from test_train_recipe import causal_args, read_metrics, recipe  # noqa: E402 (the recipe's own test helpers)


def run(args, capsys=None):
    """The recipe's exit code and what it printed (``capsys`` read after each run, so runs do not mix)."""
    rc = recipe.main(args)
    return rc, (capsys.readouterr() if capsys is not None else None)


def test_resume_refuses_a_replaced_base_and_takes_it_on_purpose(tmp_path, tiny_llama_dir, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    out = tmp_path / "run"
    assert run(causal_args(base, out, "train.max_steps=2", "train.save_every=2"), capsys)[0] == 0
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(base)
    with __import__("torch").no_grad():
        for p in other.parameters():
            p.mul_(1.01)
    other.save_pretrained(base)  # model.safetensors replaced at the same path
    rc, printed = run(causal_args(base, out, "train.max_steps=4", "train.save_every=2"), capsys)
    assert rc == 2 and "model.weights" in printed.err and "allow_other_base=true" in printed.err
    rc, printed = run(causal_args(base, out, "train.max_steps=4", "train.save_every=2", "allow_other_base=true"),
                      capsys)
    assert rc == 0 and "resuming from" in printed.out


def forge(checkpoint: Path, **fingerprint) -> None:
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["fingerprint"].update(fingerprint)
    (checkpoint / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("changed", [{"run.data_parallel": 2}, {"run.zero_stage": 3, "run.backend": "deepspeed"}])
def test_resume_refuses_another_layout_before_the_model_loads(tmp_path, tiny_llama_dir, capsys, changed):
    """A checkpoint of 2 data-parallel ranks (or ZeRO-3) resumed by 1 process: the global batch (the state's
    layout) would change; refused naming what changed, before any model loads."""
    out = tmp_path / "run"
    assert run(causal_args(tiny_llama_dir, out, "train.max_steps=2", "train.save_every=2"), capsys)[0] == 0
    forge(out / "checkpoints" / "step-0000002", **changed)
    rc, printed = run(causal_args(tiny_llama_dir, out, "train.max_steps=4"), capsys)
    assert rc == 2
    for key in changed:
        assert key in printed.err
    assert "KaSA: adapted" not in printed.out  # nothing loaded


def planted_payload(marker: Path) -> bytes:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps(Payload())


@pytest.mark.slow
def test_a_foreign_deepspeed_checkpoint_never_runs_its_pickle(tmp_path, tiny_llama_dir):
    """Under ZeRO-0 (one rank, real DeepSpeed): the run's own checkpoint is sealed and its grad_norm is real; a
    payload planted in its DeepSpeed state is refused before anything is unpickled (the marker is never made);
    trust_checkpoint=true is the named way to load a checkpoint one trusts."""
    out, marker = tmp_path / "run", tmp_path / "pwned"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "WORLD_SIZE": "1", "RANK": "0",
           "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(__import__("conftest").free_port())}
    args = [sys.executable, str(REPO / "launch/train.py"), *causal_args(tiny_llama_dir, out, "train.save_every=2"),
            "--ds_config", str(REPO / "ds_configs/zero0.json")]
    first = subprocess.run([*args, "train.max_steps=2"], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    norms = [r.get("grad_norm") for r in read_metrics(out)]
    assert all(n is not None and n > 0 for n in norms), norms  # ZeRO-0: the real norm, not 0.0
    ckpt = out / "checkpoints" / "step-0000002"
    assert json.loads((ckpt / "meta.json").read_text())["seal"]  # sealed at save time
    resumed = subprocess.run([*args, "train.max_steps=3"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-3000:]
    ckpt = out / "checkpoints" / "step-0000003"
    states = next(ckpt.rglob("mp_rank_00_model_states.pt"))
    states.write_bytes(planted_payload(marker))
    refused = subprocess.run([*args, "train.max_steps=4"], capture_output=True, text=True, env=env, timeout=600)
    assert refused.returncode == 2 and not marker.exists(), refused.stderr[-3000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not match its seal" in errors[0] and "trust_checkpoint=true" in errors[0]


def test_packed_runs_report_truncated_examples(tmp_path, tiny_llama_dir, capsys):
    rc, printed = run(causal_args(tiny_llama_dir, tmp_path / "run", "train.max_steps=1", "data.packing=true",
                                  "model.max_length=64"), capsys)
    assert rc == 0 and "train examples longer than model.max_length=64:" in printed.out and "truncated" in printed.out


def long_chat(tmp_path: Path) -> Path:
    data = tmp_path / "chat.jsonl"
    huge = "word " * 20_000
    rows = [{"messages": [{"role": "user", "content": huge}, {"role": "assistant", "content": "ok."}]}] + \
        [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
         for w in ("red", "green", "blue", "gold")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_sample_prompts_are_cut_to_the_models_limits(tmp_path, tiny_llama_dir, capsys):
    data = long_chat(tmp_path)
    (tmp_path / "template.jinja").write_text(TEMPLATE)
    tic = time.perf_counter()
    rc, printed = run(causal_args(tiny_llama_dir, tmp_path / "run", f"data.train={data}", f"data.eval={data}",
                                  "data.format=messages", f"data.chat_template={tmp_path / 'template.jinja'}",
                                  "train.max_steps=1",
                                  "train.sample_prompts=1", "train.sample_max_new_tokens=4"), capsys)
    assert rc == 0 and "sample 1 at step 0" in printed.out
    assert time.perf_counter() - tic < 120  # untruncated, the 20,000-word prompt took minutes


def test_a_stop_request_during_evaluation_ends_the_run_for_requeue(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    """The stop file (what the SLURM script touches on preemption) is honoured inside the first evaluation: the run
    exits 75 with nothing trained, instead of finishing a long evaluation first."""
    stop = tmp_path / "STOP"
    stop.touch()
    monkeypatch.setenv("KASA_DS_STOP_FILE", str(stop))
    rc, printed = run(causal_args(tiny_llama_dir, tmp_path / "run", "train.max_steps=3"), capsys)
    assert rc == 75 and "nothing trained yet" in printed.out
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.slow
def test_sigterm_during_a_long_evaluation_is_honoured_within_seconds(tmp_path, tiny_llama_dir):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"count {i}:", "input": "", "output": "one two " * 20})
                            + "\n" for i in range(12000)))
    proc = subprocess.Popen([sys.executable, "-u", str(REPO / "launch/train.py"),
                             *causal_args(tiny_llama_dir, tmp_path / "run", f"data.eval={data}",
                                          "data.max_eval_examples=12000", "train.max_steps=2")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("KaSA: adapted"):  # the evaluation before training starts now
            break
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    tic = time.perf_counter()
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75 and time.perf_counter() - tic < 20, rest[-2000:]
    assert "stopping after step 0 (SIGTERM)" in rest and "eval before" not in rest  # inside the evaluation


def test_eval_data_of_another_format_is_one_line(tmp_path, tiny_llama_dir, capsys):
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"prompt": "say red", "completion": " red"}) + "\n")
    rc, printed = run(causal_args(tiny_llama_dir, tmp_path / "run", f"data.eval={data}"), capsys)
    assert rc == 2 and "reads as prompt_completion but data.train" in printed.err and "Traceback" not in printed.err


@pytest.mark.parametrize("case", ["config_of_another_model", "no_tokenizer", "truncated_weights"])
def test_a_broken_model_directory_is_one_line_before_loading(tmp_path, tiny_llama_dir, capsys, case):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    if case == "config_of_another_model":
        config = json.loads((model / "config.json").read_text())
        config["vocab_size"] = 96  # the weights are 320 × 48
        (model / "config.json").write_text(json.dumps(config))
        why = "config.json does not describe these weights"
    elif case == "no_tokenizer":
        for f in ("tokenizer.model", "tokenizer.json"):
            (model / f).unlink(missing_ok=True)
        why = "holds no tokenizer"
    else:
        data = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(data[: len(data) // 2])
        why = "truncated"
    rc, printed = run(causal_args(model, tmp_path / "run", "train.max_steps=1"), capsys)
    errors = [line for line in printed.err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and why in errors[0] and "Traceback" not in printed.err, printed.err[-2000:]


def test_a_key_in_the_wrong_section_names_the_right_one(tmp_path, tiny_llama_dir, capsys):
    rc, printed = run(causal_args(tiny_llama_dir, tmp_path / "run", "train.gradient_checkpointing=true"), capsys)
    assert rc == 2 and "did you mean model.gradient_checkpointing?" in printed.err
    assert "keep_checkpoints" not in printed.err


@pytest.mark.slow
def test_a_full_disk_in_merge_is_one_line(tmp_path, tiny_llama_dir):
    """A real full disk (a 64 KiB tmpfs; mounting needs root, else skipped with the reason printed)."""
    from kasa_ds import KaSAConfig, apply_kasa, save_adapter
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    apply_kasa(model, KaSAConfig(r=2, target_modules=["q_proj"]), show_progress=False)
    save_adapter(model, tmp_path / "adapter")
    from conftest import small_tmpfs

    with small_tmpfs(tmp_path / "small", "64k") as mount:
        proc = subprocess.run([sys.executable, str(REPO / "tools/merge.py"), "--base", str(tiny_llama_dir),
                               "--adapter", str(tmp_path / "adapter"), "--out", str(mount / "merged")],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "is full" in proc.stderr and not list(mount.iterdir())


def test_a_deepspeed_config_that_is_not_json_is_one_line(tmp_path, tiny_llama_dir, capsys):
    bad = tmp_path / "ds.json"
    bad.write_text("{'stage': 2")
    rc, printed = run(causal_args(tiny_llama_dir, tmp_path / "run", "--ds_config", str(bad)), capsys)
    assert rc == 2 and f"--ds_config {bad}: not valid JSON" in printed.err and "Traceback" not in printed.err


def test_a_broken_chat_template_is_named_before_loading(tmp_path, tiny_llama_dir, capsys):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor")
    rc, printed = run(causal_args(tiny_llama_dir, tmp_path / "run", f"data.chat_template={template}"), capsys)
    assert rc == 2 and f"{template}, line 2" in printed.err and "Traceback" not in printed.err


def test_a_stop_request_inside_generation_ends_it(tiny_llama_dir):
    """Sample generation asks the stop request at every token: a request raises Interrupted out of generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kasa_ds.training.preemption import Interrupted
    from kasa_ds.training.samples import answer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)
    asked = []

    def check_stop():
        asked.append(1)
        if len(asked) == 3:
            raise Interrupted("SIGTERM")

    model.train()
    with pytest.raises(Interrupted):
        answer(model, tokenizer, ["Say something long."], torch.device("cpu"), max_new_tokens=40,
               max_prompt_tokens=64, check_stop=check_stop)
    assert len(asked) == 3  # stopped at the third generated token, not after 40
    assert model.training  # the model's mode is restored on the way out
