"""KaSA in a real transformers Trainer and TRL SFTTrainer (one process, CPU).

The regularizer check is analytic: at step 1 ΔU = 0, so the task loss gives ΔΣ no gradient and a plain-SGD step
moves ΔΣ by exactly −lr·β·2ΔΣ if the regularizer is counted once (twice or zero times is visible); tolerance 1e-5
relative (float32). Accumulation 1 vs 4 (8 examples per step either way, same order, token-normalized loss) gives
the same SGD update up to float32 summation order (1e-5)."""

import copy
import math
from pathlib import Path

import pytest
import torch

from conftest import ALL_LLAMA_TARGETS, free_port, tiny_llama, token_data
from kasa_ds import KaSAConfig, apply_kasa, kasa_layers, load_adapter
from kasa_ds.integrations.transformers import KaSATrainer, with_kasa
from kasa_ds.io.adapter import ADAPTER_FILES

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[2]
BETA = 0.05


def args(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1, learning_rate=0.5, optim="sgd",
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1e9, logging_steps=1,
                save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    return transformers.TrainingArguments(**{**base, **overrides})


def config(**kw):
    return KaSAConfig(r=4, target_modules=ALL_LLAMA_TARGETS, beta=BETA, gamma=1e-3, init_seed=0, **kw)


def adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("accumulation", [1, 4])
def test_regularizer_counted_once_per_optimizer_step(tmp_path, accumulation):
    model = tiny_llama()
    trainer = KaSATrainer(model=model, args=args(tmp_path, gradient_accumulation_steps=accumulation,
                                                 per_device_train_batch_size=8 // accumulation),
                          train_dataset=token_data(), kasa_config=config())
    before = {n: layer.lora_diag.detach().clone() for n, layer in kasa_layers(model)}
    trainer.train()
    for name, layer in kasa_layers(model):
        expected = before[name] * (1 - 0.5 * BETA * 2)
        torch.testing.assert_close(layer.lora_diag.detach(), expected, rtol=1e-5, atol=1e-7)
    assert "kasa_reg" in trainer.state.log_history[0] and trainer.state.log_history[0]["kasa_reg"] > 0
    # the plain Trainer drops the regularizer: ΔΣ does not move at step 1
    plain = tiny_llama()
    apply_kasa(plain, config(), show_progress=False)
    before = {n: layer.lora_diag.detach().clone() for n, layer in kasa_layers(plain)}
    transformers.Trainer(model=plain, args=args(tmp_path / "plain"), train_dataset=token_data()).train()
    assert all(torch.equal(layer.lora_diag, before[n]) for n, layer in kasa_layers(plain))


def test_gradient_accumulation_gives_the_same_update(tmp_path):
    after = []
    for accumulation in (1, 4):
        model = tiny_llama()
        KaSATrainer(model=model, args=args(tmp_path / str(accumulation), gradient_accumulation_steps=accumulation,
                                           per_device_train_batch_size=8 // accumulation),
                    train_dataset=token_data(), kasa_config=config()).train()
        after.append(adapters(model))
    for name, value in after[0].items():
        torch.testing.assert_close(after[1][name], value, rtol=1e-5, atol=1e-7)


def run(tmp_path, resume=None, max_steps=4):
    model = tiny_llama()
    trainer = KaSATrainer(model=model, args=args(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=2,
                                                 optim="adamw_torch", learning_rate=1e-2,
                                                 per_device_train_batch_size=4),
                          train_dataset=token_data(), kasa_config=config(dropout=0.1))
    trainer.train(resume_from_checkpoint=resume)
    losses = {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}
    return model, trainer, losses


def test_checkpoints_hold_the_adapter_and_resume_reproduces_the_losses(tmp_path, tokens):
    model, trainer, losses = run(tmp_path / "full")
    for step in (2, 4):
        ckpt = tmp_path / "full" / f"checkpoint-{step}"
        assert all((ckpt / f).is_file() for f in ADAPTER_FILES)
        assert not list(ckpt.glob("model*.safetensors"))  # never the truncated base
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "full" / "checkpoint-4", show_progress=False)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens).logits, model(tokens).logits, rtol=1e-6, atol=1e-6)
    _, _, resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2"))
    assert sorted(resumed) == [1, 2, 3, 4]  # steps 1-2 from checkpoint-2's trainer state, 3-4 trained again
    for step in (3, 4):
        assert math.isclose(resumed[step], losses[step], rel_tol=1e-6), (step, resumed[step], losses[step])


def test_trl_sft_trainer_with_kasa_on_conversations(tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is a [dev] dependency (pip install -e .[dev])")
    datasets = pytest.importorskip("datasets")
    from make_tiny_llama import build

    model_dir = build(tmp_path / "tiny", hidden=48, layers=2, vocab=320)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    chats = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(24)]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    SFT = with_kasa(trl.SFTTrainer)
    assert with_kasa(trl.SFTTrainer) is SFT and issubclass(SFT, trl.SFTTrainer)
    trainer = SFT(model=model, processing_class=tokenizer, train_dataset=datasets.Dataset.from_list(chats),
                  args=trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=4,
                                     learning_rate=1e-2, logging_steps=1, save_strategy="steps", save_steps=3,
                                     max_length=48, report_to=[], use_cpu=True, disable_tqdm=True),
                  kasa_config=KaSAConfig(r=4, target_modules=ALL_LLAMA_TARGETS, init_seed=0))
    diag = {n: layer.lora_diag.detach().clone() for n, layer in kasa_layers(model)}
    trainer.train()
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logged) == 3 and all(r["kasa_reg"] > 0 for r in logged)
    assert any(not torch.equal(layer.lora_diag, diag[n]) for n, layer in kasa_layers(model))
    assert all((tmp_path / "sft" / "checkpoint-3" / f).is_file() for f in ADAPTER_FILES)


def test_refuses_a_model_without_kasa_or_a_path(tmp_path):
    with pytest.raises(ValueError, match="apply_kasa"):
        KaSATrainer(model=tiny_llama(), args=args(tmp_path), train_dataset=token_data())
    with pytest.raises(ValueError, match="pass the model object"):
        KaSATrainer(model="some/model", args=args(tmp_path), train_dataset=token_data(), kasa_config=config())
    adapted = tiny_llama()
    apply_kasa(adapted, config(), show_progress=False)
    with pytest.raises(ValueError, match="already has KaSA adapters"):
        KaSATrainer(model=copy.deepcopy(adapted), args=args(tmp_path), train_dataset=token_data(),
                    kasa_config=config())


def zero3_worker(base_dir, out, steps, world=2, resume=""):
    import os
    import shutil
    import subprocess

    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(world), "--master_port", str(free_port()),
           str(REPO / "tests/integrations/trainer_zero3_worker.py"), str(base_dir), str(out), str(steps), resume]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.slow
def test_zero3_trainer_equals_one_process(tmp_path):
    """2 ranks, ZeRO-3, the model built partitioned: apply_kasa (through kasa_config) truncates it as one process
    does (≤ 1e-6 relative), 3 steps' losses equal one process (1e-5: float32 reduction order), the checkpoint's
    adapter is full-size and its DeepSpeed files hold no frozen base; resuming at step 2 reproduces step 3."""
    peft = pytest.importorskip("peft", reason="PEFT is a [dev] dependency (it loads the exported LoRA)")
    from safetensors.torch import load_file

    from kasa_ds.io.adapter import read_adapter_config

    base = tmp_path / "base"
    tiny_llama(seed=4).save_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    trainer = KaSATrainer(model=model, args=args(tmp_path / "one", max_steps=3, optim="adamw_torch",
                                                 learning_rate=1e-2),
                          train_dataset=token_data(), kasa_config=KaSAConfig(r=4, target_modules=ALL_LLAMA_TARGETS,
                                                                             init_seed=0))
    reference = {n: m.base_layer.weight.detach().clone() for n, m in kasa_layers(model)}
    trainer.train()
    one = {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}

    zero3_worker(base, tmp_path / "z3", 3)
    truncated = load_file(str(tmp_path / "z3" / "truncated.safetensors"))
    assert truncated.keys() == reference.keys()
    for name, w in reference.items():
        assert ((truncated[name] - w).norm() / w.norm()).item() <= 1e-6, name
    import json

    z3 = {int(k): v for k, v in json.loads((tmp_path / "z3" / "losses.json").read_text()).items()}
    assert sorted(z3) == [1, 2, 3]
    for step in (1, 2, 3):
        assert math.isclose(z3[step], one[step], rel_tol=1e-5), (step, z3[step], one[step])
    ckpt = tmp_path / "z3" / "run" / "checkpoint-2"
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    assert read_adapter_config(ckpt).r == 4 and all(v.numel() > 0 for v in adapter.values())
    full = tiny_llama()
    apply_kasa(full, KaSAConfig(r=4, target_modules=ALL_LLAMA_TARGETS), show_progress=False)
    assert {k: tuple(v.shape) for k, v in adapter.items()} == {
        f"base_model.model.{n}": tuple(p.shape) for n, p in full.named_parameters() if p.requires_grad}
    # the DeepSpeed files hold the adapters and their optimizer states only: measured 140,688 B over both ranks
    # (6,968 adapter parameters: fp32 partitions, AdamW moments, pickling) against a frozen base of 240,576 B
    # (60,144 float32 parameters), which alone would exceed it; the model states name no frozen tensor
    frozen = sum(p.numel() * 4 for p in full.parameters() if not p.requires_grad)
    ds_bytes = sum(f.stat().st_size for f in ckpt.glob("global_step*/*") if f.is_file())
    assert 0 < ds_bytes < frozen, (ds_bytes, frozen)
    states = torch.load(next(ckpt.glob("global_step*/*model_states.pt")), weights_only=False)
    trainable = {n for n, p in full.named_parameters() if p.requires_grad}
    assert set(states["module"]) <= trainable | {k for k in states["module"] if "tail_" in k}
    # the checkpoint's exact LoRA export on the original base reproduces the adapted model (1e-4, as in
    # tests/io/test_lora_export.py)
    from export_adapter import export_lora

    kasa_model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    load_adapter(kasa_model, ckpt, show_progress=False)
    lora = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                          export_lora(ckpt, tmp_path / "lora", base)).eval()
    ids = token_data()[0]["input_ids"][None]
    with torch.no_grad():
        want, got = kasa_model(ids).logits, lora(ids).logits
    assert ((got - want).norm() / want.norm()).item() <= 1e-4
    # resume from step 2 on 2 ranks: step 3 again
    zero3_worker(base, tmp_path / "z3r", 3, resume=str(ckpt))
    resumed = {int(k): v for k, v in json.loads((tmp_path / "z3r" / "losses.json").read_text()).items()}
    assert math.isclose(resumed[3], one[3], rel_tol=1e-5), (resumed[3], one[3])


def test_svd_cache_skips_the_svds_with_the_same_truncation(tmp_path):
    from precompute_svd import main as precompute

    tiny_llama(seed=2).save_pretrained(tmp_path / "base")
    cache = precompute(["--model", str(tmp_path / "base"), "--kasa-r", "4", "--targets", ",".join(ALL_LLAMA_TARGETS),
                        "--out", str(tmp_path / "cache")])
    cached = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    KaSATrainer(model=cached, args=args(tmp_path / "run"), train_dataset=token_data(), kasa_config=config(),
                svd_cache=str(cache))
    computed = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    apply_kasa(computed, config(), show_progress=False)
    for (name, a), (_, b) in zip(kasa_layers(cached), kasa_layers(computed)):
        torch.testing.assert_close(a.base_layer.weight, b.base_layer.weight, rtol=1e-6, atol=1e-7, msg=name)


def test_resume_refuses_other_settings_a_foreign_checkpoint_and_a_peft_config(tmp_path):
    """#27: an alpha = 8 checkpoint is not resumed into an alpha = 64 model; a pickle planted in a checkpoint this
    user's trainer did not seal never runs (trust_checkpoint=True is the named way to load one you trust); TRL's
    peft_config beside kasa_config is refused before any truncation."""
    import os
    import pickle

    run(tmp_path / "full", max_steps=2)
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert (ckpt / "kasa_ds_seal.json").is_file()
    other = KaSATrainer(model=tiny_llama(), args=args(tmp_path / "other", max_steps=3, save_strategy="no"),
                        train_dataset=token_data(), kasa_config=config(dropout=0.1, alpha=64.0))
    with pytest.raises(ValueError, match=r"alpha=16.0 vs 64.0"):
        other.train(resume_from_checkpoint=str(ckpt))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / "optimizer.pt").write_bytes(pickle.dumps(Payload()))
    same = KaSATrainer(model=tiny_llama(), args=args(tmp_path / "same", max_steps=3, save_strategy="no"),
                       train_dataset=token_data(), kasa_config=config(dropout=0.1))
    with pytest.raises(ValueError, match="optimizer.pt does not match its seal.*trust_checkpoint=True"):
        same.train(resume_from_checkpoint=str(ckpt))
    assert not marker.exists()
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="not peft_config"):
        KaSATrainer(model=model, args=args(tmp_path), train_dataset=token_data(), kasa_config=config(),
                    peft_config=object())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was truncated


def test_mixture_of_experts_model_trains_checkpoints_and_resumes(tmp_path):
    """A tiny Qwen3-MoE in KaSATrainer with the usual Llama-style targets: the experts are adapted (issue #24),
    checkpoints hold their 3-D factors, and resuming from checkpoint-2 reproduces steps 3-4 of the full run."""
    from kasa_ds.core.experts import expert_layers

    def moe():
        config = transformers.Qwen3MoeConfig(vocab_size=320, hidden_size=32, intermediate_size=48,
                                             moe_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                             decoder_sparse_step=1, tie_word_embeddings=False)
        torch.manual_seed(0)
        return transformers.Qwen3MoeForCausalLM(config)

    def run_moe(out, resume=None):
        model = moe()
        trainer = KaSATrainer(model=model, args=args(out, max_steps=4, save_strategy="steps", save_steps=2,
                                                     optim="adamw_torch", learning_rate=1e-2,
                                                     per_device_train_batch_size=4),
                              train_dataset=token_data(), kasa_config=config())
        trainer.train(resume_from_checkpoint=resume)
        return model, {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}

    model, losses = run_moe(tmp_path / "full")
    assert len(list(expert_layers(model))) == 2
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "full" / "checkpoint-4" / "adapter_model.safetensors"))
    assert any(v.dim() == 3 for k, v in saved.items() if "experts.gate_proj.lora_A" in k)
    _, resumed = run_moe(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2"))
    for step in (3, 4):
        assert math.isclose(resumed[step], losses[step], rel_tol=1e-6), (step, resumed[step], losses[step])
