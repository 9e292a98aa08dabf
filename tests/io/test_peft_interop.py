"""Adapters round-trip with PEFT ≥ 0.21's KaSA variant, and merged models load in plain transformers.

Tolerance: PEFT truncates with a float32 full SVD, kasa_ds with the float32 Gram solver; both are within 1e-4
relative of the float64 truncation (test_truncation), which moves the logits of these 2-layer models (|logits| ≲ 3,
adapters of size ~0.3) by ≤ 1e-5 absolute. We allow 2e-4 absolute + relative: 20× the observed difference, and
100× smaller than the effect of dropping the adapter (checked, so the comparison cannot pass vacuously).
"""

import copy

import pytest
import torch

peft = pytest.importorskip("peft", minversion="0.21", reason="PEFT >= 0.21 (KaSA variant) is a [dev] dependency")
from peft import KasaConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402

from conftest import ALL_LLAMA_TARGETS, randomize_adapters, tiny_bert_classifier, tiny_llama  # noqa: E402
from kasa_ds import KaSAConfig, apply_kasa, kasa_regularization, load_adapter, merge_kasa, save_adapter  # noqa: E402

TOL = dict(atol=2e-4, rtol=2e-4)


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def assert_same_and_nontrivial(a, b, without_adapter):
    torch.testing.assert_close(a, b, **TOL)
    assert (a - without_adapter).abs().max() > 100 * TOL["atol"]


@pytest.mark.parametrize("make, targets, extra", [
    (tiny_llama, ALL_LLAMA_TARGETS, {}),
    (tiny_bert_classifier, ["query", "key", "value", "dense"], {"modules_to_save": ["classifier"]}),
], ids=["llama-causal-lm", "bert-seq-cls"])
def test_kasa_ds_adapter_loads_in_peft(tmp_path, tokens, make, targets, extra):
    base = make()
    ours = copy.deepcopy(base)
    apply_kasa(ours, KaSAConfig(r=4, alpha=8, target_modules=targets, **extra), show_progress=False)
    randomize_adapters(ours)
    save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    with theirs.disable_adapter():
        plain = logits(theirs, tokens)
    assert_same_and_nontrivial(logits(theirs, tokens), logits(ours, tokens), plain)
    # PEFT's regularizer on the loaded weights equals ours (same β, γ, sum over layers)
    torch.testing.assert_close(theirs.base_model._get_kasa_loss(), kasa_regularization(ours), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make, targets, task", [
    (tiny_llama, ALL_LLAMA_TARGETS, "CAUSAL_LM"),
    (tiny_bert_classifier, ["query", "value"], "SEQ_CLS"),
], ids=["llama-causal-lm", "bert-seq-cls"])
def test_peft_adapter_loads_in_kasa_ds(tmp_path, tokens, make, targets, task):
    base = make()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task,
                                                              kasa_config=KasaConfig(beta=2e-4, gamma=3e-3)))
    randomize_adapters(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = copy.deepcopy(base)
    report = load_adapter(ours, tmp_path / "adapter", show_progress=False)
    assert len(report.layers) == len([n for n, _ in base.named_modules() if n.rsplit(".", 1)[-1] in targets])
    assert (ours.kasa_config.beta, ours.kasa_config.gamma) == (2e-4, 3e-3)
    with theirs.disable_adapter():
        plain = logits(theirs, tokens)
    assert_same_and_nontrivial(logits(ours, tokens), logits(theirs, tokens), plain)


def test_merged_model_loads_in_plain_transformers(tmp_path, tokens):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    apply_kasa(model, KaSAConfig(r=4, target_modules=ALL_LLAMA_TARGETS), show_progress=False)
    randomize_adapters(model)
    adapted = logits(model, tokens)
    merge_kasa(model).save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora_" in n for n, _ in reloaded.named_parameters())
    torch.testing.assert_close(logits(reloaded, tokens), adapted, atol=1e-5, rtol=1e-5)  # fp32 merge, same math


def test_load_into_wrong_model_is_a_clear_error(tmp_path):
    model = tiny_llama()
    apply_kasa(model, KaSAConfig(r=4, target_modules=["q_proj"]), show_progress=False)
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match="matched no module"):
        load_adapter(tiny_bert_classifier(), tmp_path / "adapter", show_progress=False)
    with pytest.raises(FileNotFoundError, match="missing adapter_config.json"):
        load_adapter(tiny_llama(), tmp_path, show_progress=False)


def test_save_is_atomic_and_overwrites_only_when_complete(tmp_path, monkeypatch):
    model = tiny_llama()
    apply_kasa(model, KaSAConfig(r=4, target_modules=["q_proj"]), show_progress=False)
    target = tmp_path / "adapter"
    save_adapter(model, target)
    first = (target / "adapter_model.safetensors").read_bytes()
    import kasa_ds.io.adapter as io

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", boom)
    randomize_adapters(model)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, target)
    assert (target / "adapter_model.safetensors").read_bytes() == first  # the old complete adapter is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary left behind
