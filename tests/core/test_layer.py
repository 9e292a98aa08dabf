"""KaSALinear and apply_kasa on small HF models: init, gradients, regularizer, merge, and bad input."""

import copy
import math

import pytest
import torch
from torch import nn

from conftest import ALL_LLAMA_TARGETS, randomize_adapters, tiny_bert_classifier, tiny_llama
from kasa_ds import KaSAConfig, KaSALinear, apply_kasa, kasa_layers, kasa_regularization, merge_kasa
from kasa_ds.core.truncation import reference_world


def test_update_is_zero_at_init_and_only_truncation_changes_output(tokens):
    base = tiny_llama()
    model = copy.deepcopy(base)
    r = 4
    report = apply_kasa(model, KaSAConfig(r=r, target_modules=ALL_LLAMA_TARGETS), show_progress=False)
    assert len(report.layers) == 2 * 7
    # the same model with every target weight replaced by the float64 reference truncation, and no adapter
    expected = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in kasa_layers(model):
            assert torch.count_nonzero(layer.delta_weight()) == 0
            w = expected.get_submodule(name).weight
            w.copy_(reference_world(w, r).float())
    # fp32 Gram truncation differs from float64 SVD by ≤ 1e-4 relative per weight (test_truncation); logits of a
    # 2-layer model move by a few 1e-6 absolute at |logits| ~ 1
    torch.testing.assert_close(model(tokens).logits, expected(tokens).logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(model(tokens).logits, base(tokens).logits, atol=1e-4)  # truncation did something


def test_only_adapters_and_modules_to_save_get_gradients(tokens):
    model = tiny_bert_classifier()
    apply_kasa(model, KaSAConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
               show_progress=False)
    model.train()
    out = model(tokens, labels=torch.tensor([0, 2]))
    (out.loss + kasa_regularization(model)).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable == with_grad
    assert all("lora_" in n or n.startswith("classifier.") for n in trainable)
    assert {n.rsplit(".", 1)[-1] for n in trainable} >= {"lora_diag", "weight", "bias"}
    assert sum("lora_B" in n for n in trainable) == 2 * 2  # 2 layers × (query, value)


def test_regularizer_equals_hand_computation():
    model = tiny_llama()
    apply_kasa(model, KaSAConfig(r=3, target_modules=["q_proj", "down_proj"], beta=0.3, gamma=0.7),
               show_progress=False)
    randomize_adapters(model)
    expected = 0.0
    for _, layer in kasa_layers(model):
        b = layer.lora_B.weight.detach().double().numpy()
        a = layer.lora_A.weight.detach().double().numpy()
        d = layer.lora_diag.detach().double().numpy()
        fro = lambda x: math.sqrt((x ** 2).sum())
        eye = __import__("numpy").eye(3)
        expected += 0.3 * (d ** 2).sum() + 0.7 * (fro(b.T @ b - eye) + fro(a @ a.T - eye))
    value = kasa_regularization(model)
    assert value.item() == pytest.approx(expected, rel=1e-5)  # float32 Grams of 128×3 factors
    # overriding β, γ; the value is differentiable w.r.t. every adapter factor
    assert kasa_regularization(model, beta=0.0, gamma=0.0).item() == 0.0
    value.backward()
    assert all(layer.lora_A.weight.grad is not None and layer.lora_diag.grad is not None
               for _, layer in kasa_layers(model))


def test_update_formula_and_dropout_position():
    base = nn.Linear(10, 6)
    layer = KaSALinear(base, 10, 6, r=2, alpha=5.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 10)
    layer.eval()  # dropout off
    delta = (layer.lora_B.weight * layer.lora_diag) @ layer.lora_A.weight * (5.0 / 2)
    torch.testing.assert_close(layer(x), base(x) + x @ delta.T)
    torch.testing.assert_close(layer.delta_weight(), delta)
    layer.train()
    torch.manual_seed(0)
    y_train = layer(x)
    torch.manual_seed(0)
    mask = nn.functional.dropout(torch.ones_like(x), 0.5, training=True)
    torch.testing.assert_close(y_train, base(x) + (x * mask) @ delta.T)  # dropout on the adapter input only


def test_merge_unmerge_round_trip_and_merge_kasa(tokens):
    model = tiny_llama()
    apply_kasa(model, KaSAConfig(r=4, target_modules=ALL_LLAMA_TARGETS), show_progress=False)
    randomize_adapters(model)
    before = model(tokens).logits
    weights = {n: l.base_layer.weight.clone() for n, l in kasa_layers(model)}
    for _, layer in kasa_layers(model):
        layer.merge()
    torch.testing.assert_close(model(tokens).logits, before, atol=1e-5, rtol=1e-5)
    for name, layer in kasa_layers(model):
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, weights[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(tokens).logits, before, atol=1e-5, rtol=1e-5)
    merged = merge_kasa(model)
    assert not list(kasa_layers(merged))
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith("q_proj"))
    torch.testing.assert_close(merged(tokens).logits, before, atol=1e-5, rtol=1e-5)


def test_init_seed_makes_adapters_reproducible():
    a, b = tiny_llama(), tiny_llama()
    for m in (a, b):
        torch.manual_seed(123 if m is a else 456)  # global RNG differs; init_seed decides
        apply_kasa(m, KaSAConfig(r=4, target_modules=["q_proj"], init_seed=5), show_progress=False)
    for (_, la), (_, lb) in zip(kasa_layers(a), kasa_layers(b)):
        torch.testing.assert_close(la.lora_A.weight, lb.lora_A.weight, rtol=0, atol=0)
        torch.testing.assert_close(la.lora_diag, lb.lora_diag, rtol=0, atol=0)


# bad input: one clear error before any SVD runs

def test_rank_too_large_names_every_bad_layer():
    with pytest.raises(ValueError, match=r"k_proj of shape 24×48.*min\(m, n\) = 24"):
        apply_kasa(tiny_llama(), KaSAConfig(r=24, target_modules=["q_proj", "k_proj"]), show_progress=False)


def test_no_target_lists_linear_names():
    with pytest.raises(ValueError, match=r"matched no module.*q_proj"):
        apply_kasa(tiny_llama(), KaSAConfig(r=2, target_modules=["query"]), show_progress=False)


def test_conv1d_is_refused_clearly():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(ValueError, match="Conv1D"):
        apply_kasa(model, KaSAConfig(r=2, target_modules=["c_attn"]), show_progress=False)


def test_tied_weight_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, tie_word_embeddings=True))
    with pytest.raises(ValueError, match="tied to model.embed_tokens.weight"):
        apply_kasa(model, KaSAConfig(r=2, target_modules=["lm_head"]), show_progress=False)


def test_applying_twice_is_refused():
    model = tiny_llama()
    apply_kasa(model, KaSAConfig(r=2, target_modules=["q_proj"]), show_progress=False)
    with pytest.raises(ValueError, match="already has KaSA"):
        apply_kasa(model, KaSAConfig(r=2, target_modules=["q_proj"]), show_progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "positive integer"), ({"alpha": 0}, "alpha"), ({"dropout": 1.0}, "dropout"),
    ({"beta": -1}, "beta"), ({"svd_solver": "qr"}, "svd_solver"), ({"target_modules": []}, "empty"),
    ({"target_modules": "(["}, "regular expression"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KaSAConfig(**kwargs)


def test_regex_and_exclude_targets():
    model = tiny_llama()
    config = KaSAConfig(r=2, target_modules=r".*layers\.1\.self_attn\.(q|v)_proj", exclude_modules=["v_proj"])
    report = apply_kasa(model, config, show_progress=False)
    assert [l.name for l in report.layers] == ["model.layers.1.self_attn.q_proj"]


def test_regularizer_computed_in_forward_equals_batched_path(tokens):
    """The ZeRO-3 path (terms and analytic gradients computed inside each layer's forward) gives the same value and
    gradients as the batched autograd path (float32 both; 1e-5 relative)."""
    grads = []
    values = []
    for in_forward in (False, True):
        model = tiny_llama()
        apply_kasa(model, KaSAConfig(r=3, target_modules=ALL_LLAMA_TARGETS, beta=0.2, gamma=0.5, init_seed=1),
                   show_progress=False)
        randomize_adapters(model)
        for _, layer in kasa_layers(model):
            layer.set_regularize_in_forward(in_forward)
        model.train()
        model(tokens)
        reg = kasa_regularization(model)
        reg.backward()
        values.append(reg.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert values[1] == pytest.approx(values[0], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 14 * 3
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(tokens).logits, model.eval()(tokens).logits)  # the 0·term ties change nothing
    model.train()
    kasa_regularization(model)  # consumes the terms cached by the train-mode forward above
    with pytest.raises(RuntimeError, match="after a training-mode forward"):
        kasa_regularization(model)


def test_target_inside_modules_to_save_is_refused():
    from conftest import tiny_bert_classifier

    with pytest.raises(ValueError, match="inside a module of modules_to_save.*exclude_modules"):
        apply_kasa(tiny_bert_classifier(), KaSAConfig(r=2, target_modules=["dense"], modules_to_save=["pooler"]),
                   show_progress=False)
    report = apply_kasa(tiny_bert_classifier(), KaSAConfig(r=2, target_modules=["dense"], modules_to_save=["pooler"],
                                                           exclude_modules=["pooler.dense"]), show_progress=False)
    assert all("pooler" not in lr.name for lr in report.layers)


def test_fused_products_match_autograd_in_float64():
    """The layer's two autograd functions (kasa_ds.core.layer): DiagLinear (lora_B after ΔΣ, saving h only) and
    CorrectedUpdate (a kept base's tail correction and the update as one rank-2r product) pass gradcheck; a layer with
    a base correction computes −L·R·x + update(x) with the gradients plain autograd gives (float64: 1e-12)."""
    from kasa_ds.core.layer import CorrectedUpdate, DiagLinear

    g = torch.Generator().manual_seed(0)
    m, n, r = 7, 5, 3
    rand = lambda *shape, grad=True: torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=grad)  # noqa: E731
    assert torch.autograd.gradcheck(DiagLinear.apply, (rand(2, 4, r), rand(r), rand(m, r)))
    assert torch.autograd.gradcheck(DiagLinear.apply, (rand(2, 4, r), rand(r), rand(m, r), 0.75))
    assert torch.autograd.gradcheck(CorrectedUpdate.apply, (rand(2, 4, n), rand(r, n, grad=False),
                                                            rand(m, r, grad=False), rand(r, n), rand(r), rand(m, r),
                                                            2.0))
    layer = KaSALinear(nn.Linear(n, m, dtype=torch.float64), n, m, r=r, alpha=2 * r, adapter_dtype=torch.float64)
    left, right = rand(m, r, grad=False), rand(r, n, grad=False)
    layer.set_base_correction(left, right)
    with torch.no_grad():
        layer.lora_B.weight.normal_(generator=g)
    x = rand(2, 4, n)
    out = layer(x)
    a, d, b = layer.lora_A.weight, layer.lora_diag, layer.lora_B.weight
    expected = layer.base_layer(x) - (x @ right.T) @ left.T + ((x @ a.T) * d) @ b.T * layer.scaling
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((out * weights).sum(), (x, a, d, b))
    want = torch.autograd.grad((expected * weights).sum(), (x, a, d, b))
    for mine, theirs in zip(got, want):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows", [True, False])
def test_stacked_orthogonality_equals_each_factors_term_and_passes_gradcheck(rows):
    """penalty.StackedOrthogonality (the regularizer's batched ‖G − I‖_F over factors of several shapes) gives each
    factor's own ‖G − I‖_F in its input order, and its hand-written backward passes gradcheck (float64: 1e-12)."""
    from kasa_ds.core.penalty import StackedOrthogonality

    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (3, 7), (3, 5), (3, 5), (3, 7)] if rows else [(5, 3), (7, 3), (5, 3)]
    weights = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    got = StackedOrthogonality.apply(rows, *weights)
    eye = torch.eye(3, dtype=torch.float64)
    want = torch.stack([torch.linalg.matrix_norm((w @ w.T if rows else w.T @ w) - eye) for w in weights])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *ws: StackedOrthogonality.apply(rows, *ws), tuple(weights))
