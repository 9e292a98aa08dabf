"""KaSA on fused mixture-of-experts weights (kasa_ds.core.experts), on tiny models built from transformers' own
classes: Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3 ([E, 2I, H] gate/up concatenated) and gpt-oss (transposed, gate/up
interleaved, biases).

Tolerances: W_world against a float64 SVD of each expert's own matrix ≤ 1e-5 relative (the float32 solver ladder's
budget, as for linears); logits against transformers' own experts forward on the merged weights ≤ 1e-5 at ΔW = 0
and ≤ 1e-4 after training (float32 sums in another order over 2 layers); the regularizer against a float64 sum
≤ 1e-5 relative.
"""

import copy
import json
import warnings

import pytest
import torch

from conftest import tiny_moe as tiny
from kasa_ds import KaSAConfig, apply_kasa, kasa_regularization, load_adapter, merge_kasa, save_adapter
from kasa_ds.core.experts import KaSAExperts, expert_layers, experts_layout, projection_weight
from kasa_ds.core.truncation import reference_world
from kasa_ds.io.lora import export_lora_adapter

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R = 4


ARCHS = ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]
TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))


def adapted(arch: str, targets=ALL, seed: int = 0):
    """``tiny(arch)`` with KaSA applied and every expert's ΔU drawn at random: a visibly nonzero update."""
    model = tiny(arch)
    apply_kasa(model, KaSAConfig(r=R, alpha=2 * R, target_modules=targets, init_seed=seed), show_progress=False)
    with torch.no_grad():
        for _, layer in expert_layers(model):
            for f in layer.lora.values():
                f.lora_B.normal_(std=0.1)
    return model


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_each_expert_projection_is_truncated_by_its_own_tail_and_trains(arch):
    model = tiny(arch)
    modules = {n: m for n, m in model.named_modules() if experts_layout(m) is not None}
    assert modules, f"{arch}: no fused experts module found"
    before = {(n, p): projection_weight(m, experts_layout(m), p).detach().double().clone()
              for n, m in modules.items() for p in experts_layout(m).projections()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every experts module is reached: no left-out warning
        report = apply_kasa(model, KaSAConfig(r=R, alpha=2 * R, target_modules=ALL, init_seed=0), show_progress=False)
    layers = dict(expert_layers(model))
    assert set(layers) == set(modules) and "expert projections" in str(report)
    for (name, p), w in before.items():
        view = projection_weight(layers[name].base_layer, layers[name].layout, p).double()
        for e in range(w.shape[0]):
            want = reference_world(w[e], R)
            assert torch.linalg.norm(view[e] - want) / torch.linalg.norm(want) < 1e-5, (name, p, e)

    # ΔW = 0: the KaSA model computes what transformers' own experts compute on W_world
    torch.testing.assert_close(logits(model), logits(merge_kasa(copy.deepcopy(model))), rtol=0, atol=1e-5)

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=TOKENS, labels=TOKENS).loss + kasa_regularization(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert any(f.lora_B.abs().sum() > 0 for layer in layers.values() for f in layer.lora.values())
    # ΔW ≠ 0: the low-rank path per routed token equals transformers' forward on W_world + ΔW
    torch.testing.assert_close(logits(model), logits(merge_kasa(copy.deepcopy(model))), rtol=0, atol=1e-4)


def test_regularizer_sums_every_expert_exactly():
    model = tiny("qwen3_moe")
    apply_kasa(model, KaSAConfig(r=R, alpha=2 * R, target_modules=["gate_proj", "up_proj", "down_proj"],
                                 beta=0.3, gamma=0.7, init_seed=1), show_progress=False)
    with torch.no_grad():
        for _, layer in expert_layers(model):
            for f in layer.lora.values():
                f.lora_B.normal_()
    want = torch.zeros((), dtype=torch.float64)
    for _, layer in expert_layers(model):
        for f in layer.lora.values():
            for a, b, d in zip(f.lora_A.double(), f.lora_B.double(), f.lora_diag.double()):
                eye = torch.eye(R, dtype=torch.float64)
                want += 0.3 * d.square().sum() + 0.7 * (torch.linalg.norm(b.T @ b - eye) +
                                                        torch.linalg.norm(a @ a.T - eye))
    got = kasa_regularization(model)
    assert abs(got.item() - want.item()) / want.item() < 1e-5


def test_save_load_reproduces_the_model(tmp_path):
    model = adapted("mixtral", seed=2)
    save_adapter(model, tmp_path / "adapter")
    fresh = tiny("mixtral")
    load_adapter(fresh, tmp_path / "adapter", show_progress=False)
    assert isinstance(fresh.model.layers[0].mlp.experts, KaSAExperts)
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_lora_export_of_experts_from_checkpoint_files(tmp_path, arch):
    """The file-based export (tools/export.py --as-lora: adapter directory + base checkpoint) recomputes each expert's
    tail from the checkpoint as transformers writes it (per expert: Qwen3-MoE's experts.<e>.gate_proj, Mixtral's
    block_sparse_moe.experts.<e>.w1; fused: gpt-oss's gate_up_proj), one projection at a time: the same tensors and
    config as the export from the model (≤ 1e-6: the same solver on the same float32 weights), PEFT reproduces the
    KaSA model on the original base (≤ 1e-4), and a checkpoint with other expert weights is refused."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from kasa_ds.io.lora import export_lora_files

    tiny(arch).save_pretrained(tmp_path / "base")
    model = adapted(arch, seed=6)
    save_adapter(model, tmp_path / "adapter")
    export_lora_files(tmp_path / "adapter", tmp_path / "from_files", tmp_path / "base")
    export_lora_adapter(model, tmp_path / "from_model", base=tiny(arch))
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("from_files", "from_model"))
    assert a.keys() == b.keys() and any("experts" in k for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    config = json.loads((tmp_path / "from_files" / "adapter_config.json").read_text())
    assert config == json.loads((tmp_path / "from_model" / "adapter_config.json").read_text())
    peft_model = PeftModel.from_pretrained(tiny(arch), tmp_path / "from_files").eval()
    torch.testing.assert_close(logits(peft_model), logits(model), rtol=0, atol=1e-4)

    other = tiny(arch)
    with torch.no_grad():
        other.model.layers[1].mlp.experts.down_proj.mul_(1.01)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="belongs to another base"):
        export_lora_files(tmp_path / "adapter", tmp_path / "refused", tmp_path / "other")
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_lora_export_of_experts_loads_in_peft_on_the_original_base(tmp_path, arch):
    """The rank-2r export in PEFT's target_parameters layout (lora.ParamWrapper), concatenated (Qwen3-MoE) and
    transposed + interleaved (gpt-oss) experts: PEFT on the untruncated base reproduces the KaSA model (≤ 1e-4)."""
    from peft import PeftModel

    targets = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"] if arch == "qwen3_moe" else ["q_proj", "up_proj",
                                                                                                   "down_proj"]
    model = adapted(arch, targets, seed=4)
    export_lora_adapter(model, tmp_path / "lora", base=tiny(arch))
    peft_model = PeftModel.from_pretrained(tiny(arch), tmp_path / "lora").eval()
    assert "lora" in type(peft_model.base_model.model.model.layers[0].mlp.experts).__module__
    torch.testing.assert_close(logits(peft_model), logits(model), rtol=0, atol=1e-4)


def test_targets_that_leave_the_experts_out_say_so():
    """The silent case of issue #24: attention-only targets adapt the attention and warn about the experts; the
    usual Llama-style list reaches the experts."""
    model = tiny("qwen3_moe")
    with pytest.warns(UserWarning, match=r"experts of 2 mixture-of-experts module\(s\) are not adapted"):
        report = apply_kasa(model, KaSAConfig(r=R, alpha=2 * R, target_modules=["q_proj", "v_proj"]),
                            show_progress=False)
    assert "expert" not in str(report) and not list(expert_layers(model))
    only = tiny("olmoe")
    report = apply_kasa(only, KaSAConfig(r=R, alpha=2 * R, target_modules=["down_proj"]), show_progress=False)
    assert [tuple(layer.lora) for _, layer in expert_layers(only)] == [("down_proj",)] * 2
    assert str(report).startswith("KaSA: adapted 8 expert projections in 2 experts modules (down_proj of 4 experts")
    with pytest.raises(ValueError, match="matched no module"):
        apply_kasa(tiny("olmoe"), KaSAConfig(r=R, alpha=2 * R, target_modules=["nothing_here"]), show_progress=False)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_streamed_merge_of_a_per_expert_checkpoint_reproduces_the_model(tmp_path, arch):
    """tools/merge.py's streamed merge on the checkpoint transformers writes (per-expert weights: Qwen3-MoE's
    experts.<e>.gate_proj, Mixtral's block_sparse_moe.experts.<e>.w1): the merged checkpoint, loaded by plain
    transformers, computes the KaSA model (≤ 1e-4); gpt-oss's fused checkpoint is refused by name."""
    import transformers as tf

    from kasa_ds.io.merged_checkpoint import merge_checkpoint

    tiny(arch).save_pretrained(tmp_path / "base")
    model = adapted(arch, seed=5)
    save_adapter(model, tmp_path / "adapter")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", dtype=torch.float32)
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    merged.config._attn_implementation = "eager"
    torch.testing.assert_close(logits(merged), logits(model), rtol=0, atol=1e-4)


def test_streamed_merge_refuses_a_fused_experts_checkpoint(tmp_path, capsys):
    from kasa_ds.io.merged_checkpoint import merge_checkpoint

    tiny("gpt_oss").save_pretrained(tmp_path / "base")
    model = tiny("gpt_oss")
    apply_kasa(model, KaSAConfig(r=R, alpha=2 * R, target_modules=["down_proj"]), show_progress=False)
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(SystemExit):
        merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", dtype=torch.float32)
    assert "stores its experts fused" in capsys.readouterr().err and not (tmp_path / "merged").exists()


def test_an_experts_only_adapter_is_bound_to_its_base(tmp_path):
    """The experts' weights are in the recorded base fingerprint: an adapter of the experts alone loads on its own
    base and is refused, naming the fix, on a model whose experts hold other weights."""
    model = adapted("mixtral", targets=["gate_proj", "up_proj", "down_proj"])
    save_adapter(model, tmp_path / "adapter")
    load_adapter(tiny("mixtral"), tmp_path / "adapter", show_progress=False)
    other = tiny("mixtral")
    with torch.no_grad():
        other.model.layers[1].mlp.experts.down_proj.mul_(1.01)
    with pytest.raises(ValueError, match=r"belongs to another base.*layers.1.mlp.experts.down_proj"):
        load_adapter(other, tmp_path / "adapter", show_progress=False)
    assert not isinstance(other.model.layers[1].mlp.experts, KaSAExperts)  # refused before anything changed
