"""QKaSA on real bitsandbytes 4-bit (NF4, double quantization) layers, CPU.

Tolerances: float64 checks of the effective base use the float32 Gram solver (≤ 1e-5 relative, as in
test_truncation) on the *dequantized* weight, so quantization error does not enter them. The requantize check uses
the NF4 bound itself: per element |Q(x) − x| ≤ h·a_q + |a_q − a|, with h the largest half-gap of the NF4 code book,
a the absmax of the element's 64-block and a_q the block scale as stored (8-bit with double quantization; the
block's absmax element maps to the ±1 code, so a_q is the block's largest dequantized magnitude).
"""

import copy

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="bitsandbytes is a [dev] dependency (QKaSA)")
import bitsandbytes.functional as bnbF  # noqa: E402

from conftest import ALL_LLAMA_TARGETS, randomize_adapters, tiny_llama  # noqa: E402
from kasa_ds import KaSAConfig, apply_kasa, kasa_layers, kasa_regularization, load_adapter, merge_kasa, save_adapter  # noqa: E402,E501
from kasa_ds.formats.bnb4 import dequantize, effective_weight, quantize_linears_  # noqa: E402
from kasa_ds.core.truncation import reference_world  # noqa: E402


def quantized_llama():
    model = tiny_llama()
    assert quantize_linears_(model, "nf4", double_quant=True) == 2 * 7
    return model


def test_low_rank_correction_removes_exactly_the_tail_of_the_dequantized_weight(tokens):
    model = quantized_llama()
    before = {n: (m.weight.data.clone(), dequantize(m)) for n, m in model.named_modules()
              if type(m).__name__ == "Linear4bit"}
    plain = model(tokens).logits
    apply_kasa(model, KaSAConfig(r=4, target_modules=ALL_LLAMA_TARGETS), show_progress=False)
    for name, layer in kasa_layers(model):
        packed, deq = before[name]
        assert torch.equal(layer.base_layer.weight.data, packed)  # the 4-bit base is untouched
        ref = reference_world(deq, 4)
        assert ((effective_weight(layer).double() - ref).norm() / ref.norm()).item() <= 1e-5
        x = torch.randn(3, layer.in_features)
        expected = torch.nn.functional.linear(x, effective_weight(layer), layer.base_layer.bias)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)  # ΔW = 0 at init
    assert not torch.allclose(model(tokens).logits, plain, atol=1e-4)  # the truncation took effect


def test_requantize_is_within_the_4bit_bound():
    model = quantized_llama()
    deq = {n: dequantize(m) for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    apply_kasa(model, KaSAConfig(r=4, target_modules=ALL_LLAMA_TARGETS, quant_mode="requantize"),
               show_progress=False)
    code = bnbF.get_4bit_type("nf4", device="cpu").float().sort().values
    half_gap = (code[1:] - code[:-1]).max().item() / 2
    for name, layer in kasa_layers(model):
        assert layer.tail_left is None  # no correction: the tail is gone from the 4-bit weight itself
        world = reference_world(deq[name], 4).float()
        got = dequantize(layer.base_layer)
        absmax = world.flatten().view(-1, 64).abs().max(dim=1, keepdim=True).values
        stored = got.flatten().view(-1, 64).abs().max(dim=1, keepdim=True).values
        bound = (half_gap * stored + (stored - absmax).abs()).expand(-1, 64).reshape(world.shape)
        assert ((got - world).abs() <= bound + 1e-6).all(), name


def test_4bit_forward_backward_trains_adapters_only(tokens):
    model = quantized_llama()
    apply_kasa(model, KaSAConfig(r=4, target_modules=ALL_LLAMA_TARGETS), show_progress=False)
    model.train()
    loss = model(tokens, labels=tokens).loss + kasa_regularization(model)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad} and with_grad
    assert all("lora_" in n for n in with_grad)


@pytest.mark.parametrize("mode", ["low_rank_correction", "requantize"])
def test_merge_to_16bit_and_adapter_round_trip(tmp_path, tokens, mode):
    model = quantized_llama()
    apply_kasa(model, KaSAConfig(r=4, target_modules=ALL_LLAMA_TARGETS, quant_mode=mode), show_progress=False)
    randomize_adapters(model)
    adapted = model(tokens).logits.detach()
    save_adapter(model, tmp_path / "adapter")
    fresh = quantized_llama()  # the same base quantized the same way (deterministic)
    load_adapter(fresh, tmp_path / "adapter", show_progress=False)
    assert fresh.kasa_config.quant_mode == mode
    torch.testing.assert_close(fresh(tokens).logits, adapted, atol=1e-5, rtol=1e-5)
    merged = merge_kasa(copy.deepcopy(model))
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules() if m is not merged.lm_head)
    # the merged nn.Linear holds the dequantized effective weight + ΔW: same numbers, float32 summation order
    torch.testing.assert_close(merged(tokens).logits, adapted, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_recipe_fine_tunes_a_4bit_base(tmp_path):
    """launch/train.py with model.quantize=nf4 on the causal-LM path: eval loss goes down, the adapter is written,
    and a 4-bit base under DeepSpeed is refused up front."""
    import importlib.util
    import json
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    from make_tiny_llama import build

    spec = importlib.util.spec_from_file_location("recipe_q", repo / "launch/train.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    model = build(tmp_path / "tiny", hidden=64, layers=2, vocab=320)
    args = ["--config", str(repo / "configs/tiny_llama_instruct.yaml"), f"model.path={model}", "model.quantize=nf4",
            "--output_dir", str(tmp_path / "run"), "train.max_steps=12", "data.max_eval_examples=16",
            "model.max_length=96", "train.micro_batch_size=4"]
    assert recipe.main(args) == 0
    evals = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in l]
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.1
    assert (tmp_path / "run" / "adapter" / "kasa_ds_config.json").is_file()
    assert recipe.main([*args, "--ds_config", str(repo / "ds_configs/zero2.json")]) == 2


def _recipe():
    import importlib.util
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("recipe_single", repo / "launch/train.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return repo, recipe


@pytest.mark.slow
def test_single_gpu_features_on_a_4bit_base(tmp_path, capsys):
    """QKaSA with what a one-GPU user turns on: paged 8-bit AdamW (bitsandbytes, its states really 8-bit), bf16
    autocast, gradient checkpointing, a memory limit checked by the planner first; it trains (eval loss falls)."""
    import json

    repo, recipe = _recipe()
    from make_tiny_llama import build

    model = build(tmp_path / "tiny", hidden=128, layers=2, vocab=320)  # r·hidden = 4096: 8-bit states
    out = tmp_path / "run"
    assert recipe.main(["--config", str(repo / "configs/tiny_llama_instruct.yaml"), f"model.path={model}",
                        "model.quantize=nf4", "model.gradient_checkpointing=true", "train.optimizer=paged_adamw8bit",
                        "train.autocast=bfloat16", "train.max_memory_gib=16", "kasa.r=32", "--output_dir", str(out),
                        "train.max_steps=12", "train.save_every=12", "data.max_eval_examples=16",
                        "model.max_length=96", "train.micro_batch_size=4"]) == 0
    printed = capsys.readouterr().out
    assert "memory plan:" in printed and "gradient checkpointing: each decoder layer is recomputed" in printed
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.05
    state = torch.load(out / "checkpoints" / "step-0000012" / "trainer_state.pt", weights_only=True)["optimizer"]
    per_param = [s.get("__bnb_optimizer_quant_state__", s) for s in state["state"].values()]  # bnb nests them
    moments = [v for s in per_param for k, v in s.items() if k in ("state1", "state2")]
    # bitsandbytes keeps tensors under min_8bit_size (4096 values) in float32, like every 8-bit optimizer user sees
    assert any(v.dtype == torch.uint8 for v in moments)
    assert all(v.dtype == torch.uint8 or v.numel() < 4096 for v in moments)


def test_memory_limit_refused_by_the_planner_before_loading(tmp_path, capsys):
    repo, recipe = _recipe()

    from make_tiny_llama import build

    model = build(tmp_path / "tiny", hidden=48, layers=2, vocab=320)
    assert recipe.main(["--config", str(repo / "configs/tiny_llama_instruct.yaml"), f"model.path={model}",
                        "train.max_memory_gib=0.001", "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "train.max_memory_gib=0.001: the planner estimates more" in err and "activations" in err
    assert not (tmp_path / "run").exists()  # nothing was loaded or written


def test_memory_limit_enforced_while_training(tmp_path):
    """On CPU the guard checks the process' peak resident memory after each step (torch alone is > 0.2 GiB)."""
    _, recipe = _recipe()
    with pytest.raises(MemoryError, match="max_memory_gib=0.2 exceeded at step 1"):
        recipe.main(["--output_dir", str(tmp_path / "run"), "train.max_memory_gib=0.2", "train.max_steps=2",
                     "data.max_eval_examples=8", "model.max_length=32"])


@pytest.mark.parametrize("mode", ["low_rank_correction", "requantize"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_streamed_merge_of_a_qkasa_adapter_into_the_16bit_checkpoint(tmp_path, tokens, mode, quant_type):
    """tools/merge.py rebuilds the 4-bit base from the 16-bit checkpoint (recorded in kasa_ds_config.json), applies
    the mode and ΔW, and writes a plain checkpoint: transformers alone reproduces the 4-bit model's logits (1e-4:
    the same float32 numbers, summed in another order)."""

    from transformers import AutoModelForCausalLM

    from merge import merge

    base = tiny_llama(seed=4)
    base.save_pretrained(tmp_path / "base")
    model = copy.deepcopy(base)
    quantize_linears_(model, quant_type, double_quant=True)
    apply_kasa(model, KaSAConfig(r=4, target_modules=ALL_LLAMA_TARGETS, quant_mode=mode), show_progress=False)
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(tokens).logits
    save_adapter(model, tmp_path / "adapter")
    extra = (tmp_path / "adapter" / "kasa_ds_config.json").read_text()
    assert f'"quant_type": "{quant_type}"' in extra
    merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, adapted, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_layer_types_and_compute_dtypes(tokens, quant_type, compute_dtype):
    """NF4 and FP4, float32/bf16/fp16 compute: ΔW = 0 at init (the model computes with its effective base), and
    gradients reach the adapters only. Tolerance: the compute dtype's resolution on logits of size ~1."""
    model = tiny_llama()
    quantize_linears_(model, quant_type, double_quant=True, compute_dtype=compute_dtype)
    apply_kasa(model, KaSAConfig(r=4, target_modules=ALL_LLAMA_TARGETS), show_progress=False)
    reference = copy.deepcopy(model)
    for name, layer in kasa_layers(reference):  # the same model with plain float32 effective weights
        linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
        linear.weight.data = effective_weight(layer)
        reference.set_submodule(name, linear)
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}[compute_dtype]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits.float(), reference(tokens).logits, atol=tol, rtol=tol)
    model.train()
    (model(tokens, labels=tokens).loss + kasa_regularization(model)).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)


def test_8bit_base_added_as_one_format_module(tmp_path, tokens):
    """bitsandbytes LLM.int8 bases (formats/bnb8.py + one registry line): the correction removes exactly the
    float64 tail of the dequantized weight with the int8 base untouched, only adapters train, requantize stays within
    int8's rounding (half a step of each row's scale, from the float16 copy bitsandbytes quantizes), merge_kasa and
    the streamed tools/merge.py reproduce the 8-bit model (1e-4: the int8 CPU matmul against a float32 one)."""

    from safetensors.torch import save_file

    from kasa_ds.formats.bnb8 import dequantize8, quantize_linear8

    def int8_llama():
        model = tiny_llama()
        for name, m in list(model.named_modules()):
            if type(m) is torch.nn.Linear and name != "lm_head":
                model.set_submodule(name, quantize_linear8(m))
        return model

    model = int8_llama()
    before = {n: (m.weight.data.clone(), dequantize8(m)) for n, m in model.named_modules()
              if type(m).__name__ == "Linear8bitLt"}
    apply_kasa(model, KaSAConfig(r=4, target_modules=ALL_LLAMA_TARGETS), show_progress=False)
    for name, layer in kasa_layers(model):
        packed, deq = before[name]
        assert torch.equal(layer.base_layer.weight.data, packed)
        effective = dequantize8(layer.base_layer) - layer.tail_left @ layer.tail_right
        ref = reference_world(deq, 4)
        assert ((effective.double() - ref).norm() / ref.norm()).item() <= 1e-5
    randomize_adapters(model)
    (model(tokens).logits.square().mean() + kasa_regularization(model)).backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == \
        {n for n, p in model.named_parameters() if p.requires_grad} and all("lora_" in n for n, p in
                                                                            model.named_parameters() if p.requires_grad)
    save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        quantized = model(tokens).logits
        torch.testing.assert_close(merge_kasa(model)(tokens).logits, quantized, atol=1e-4, rtol=1e-4)
    # the streamed merge rebuilds the int8 base from the 16-bit checkpoint (kasa_ds_config.json says int8)
    base = tmp_path / "base"
    original = tiny_llama()
    original.save_pretrained(base)
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(base / "model.safetensors"))
    from merge import merge

    merged = type(original).from_pretrained(merge(base, tmp_path / "adapter", tmp_path / "merged", torch.float32))
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(tokens).logits, quantized, atol=1e-4, rtol=1e-4)
    # requantize: int8 again, within half a quantization step of W_world per element
    model = int8_llama()
    apply_kasa(model, KaSAConfig(r=4, target_modules=ALL_LLAMA_TARGETS, quant_mode="requantize"), show_progress=False)
    for name, layer in kasa_layers(model):
        assert layer.tail_left is None and layer.base_layer.weight.dtype == torch.int8
        world = reference_world(before[name][1], 4).float()
        step = world.abs().amax(dim=1, keepdim=True) / 127
        assert ((dequantize8(layer.base_layer) - world).abs() <= 0.5 * step + 2e-3 * world.abs() + 1e-6).all()
