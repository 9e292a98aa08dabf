"""kasa_ds.training.memory_plan / tools/plan_memory.py: the exact parts against hand counts, the rest against the direction
each knob must move it (more GPUs, checkpointing, 4-bit, offload), and bad input refused."""

from pathlib import Path

import pytest
import torch

from kasa_ds.training.memory_plan import GiB, RunShape, model_shape, plan

REPO = Path(__file__).resolve().parents[2]
LLAMA70 = str(REPO / "configs/models/llama-3-70b")
TARGETS = RunShape().targets


@pytest.fixture(scope="module")
def shape():
    return model_shape(LLAMA70, TARGETS)


def test_counts_are_exact(shape):
    h, kv, ff, L = 8192, 1024, 28672, 80
    assert shape.linear == L * (2 * h * h + 2 * kv * h + 3 * ff * h)
    assert shape.total == 70_553_706_496 and len(shape.targets) == L * 7


def test_zero3_splits_weights_and_states_exactly(shape):
    out = plan(shape, RunShape(gpus=64, zero=3), gpu_gib=80)["per_gpu_bytes"]
    adapter = sum(16 * (m + n) + 16 for _, m, n in shape.targets)
    assert out["base_weights"] == pytest.approx(shape.total * 2 / 64)
    assert out["adapter_params"] == pytest.approx(adapter * 2 / 64)
    assert out["optimizer_states"] == pytest.approx(adapter * 12 / 64)  # float32 master + AdamW m, v


def test_knobs_move_memory_the_right_way(shape):
    def total(**kw):
        return plan(shape, RunShape(**kw))["total_bytes"]

    assert total(gpus=16) < total(gpus=8)
    assert total(checkpointing=True) < total(checkpointing=False)
    assert total(seq_len=2048) < total(seq_len=4096)
    assert total(offload="all") < total(offload="optimizer") < total()
    q = plan(shape, RunShape(method="qkasa", deepspeed=False, gpus=1, optimizer="paged_adamw8bit"))
    k = plan(shape, RunShape(deepspeed=False, gpus=1))
    assert q["per_gpu_bytes"]["base_weights"] < 0.3 * k["per_gpu_bytes"]["base_weights"]  # ~4.1 of 16 bits
    tp = plan(shape, RunShape(tp=8, gpus=16, zero=1))["per_gpu_bytes"]["base_weights"]
    assert tp == pytest.approx((shape.linear * 2 / 8 + (shape.total - shape.linear) * 2))


def test_megatron_splits_weights_over_tp_and_stages_exactly(shape):
    """The Megatron road: TP splits the decoder linears and the (vocabulary-parallel) embedding and head; two stages
    split the layers and adapters, and one holds the embedding or the head (V·h / TP). Activations do not shrink:
    under 1F1B the first stage keeps 2 micro-batches of its half of the layers (with checkpointing, as many layer
    inputs as one micro-batch of the whole model) beside the layer it recomputes."""
    h, V = 8192, 128256
    one = plan(shape, RunShape(megatron=True, deepspeed=False, tp=8, gpus=8))
    two = plan(shape, RunShape(megatron=True, deepspeed=False, tp=8, pp=2, gpus=16))
    assert one["per_gpu_bytes"]["base_weights"] == pytest.approx(shape.total * 2 / 8)  # the norms split too: < 1e-5
    assert two["per_gpu_bytes"]["base_weights"] == pytest.approx(shape.linear * 2 / 16 + V * h * 2 / 8)
    assert two["adapter_params_per_gpu"] == pytest.approx(one["adapter_params_per_gpu"] / 2)
    assert two["per_gpu_bytes"]["activations"] == pytest.approx(one["per_gpu_bytes"]["activations"])
    # without checkpointing: the first stage's two micro-batches of 40 layers, and no loss (the last stage's)
    no_checkpointing = dict(megatron=True, deepspeed=False, tp=8, checkpointing=False)
    logits = 4096 * V * (2 + 2 * 4) / 8  # bf16 logits, float32 logits and their gradient, vocabulary / TP
    assert plan(shape, RunShape(pp=2, gpus=16, **no_checkpointing))["per_gpu_bytes"]["activations"] == pytest.approx(
        plan(shape, RunShape(gpus=8, **no_checkpointing))["per_gpu_bytes"]["activations"] - logits)
    assert one["data_parallel"] == two["data_parallel"] == 1


def test_sequence_parallel_splits_the_tokens_outside_the_tp_regions(shape):
    """Sequence parallelism at TP 8 splits over the 8 ranks each layer's norm inputs (float32) and outputs (bf16)
    without checkpointing; with it, each layer's kept input, and the norm terms of the layer recomputed in backward
    (here the larger of the two peaks, beside the loss's tensors)."""
    h, L, tokens = 8192, 80, 4096
    norms = 2 * (4 * h + 2 * h)
    run = dict(megatron=True, deepspeed=False, tp=8, gpus=8)
    for checkpointing, per_token in ((False, L * norms), (True, L * 2 * h + norms)):
        def activations(sp: bool) -> float:
            return plan(shape, RunShape(checkpointing=checkpointing, sequence_parallel=sp,
                                        **run))["per_gpu_bytes"]["activations"]

        saved = activations(False) - activations(True)
        assert saved == pytest.approx(tokens * per_token * (1 - 1 / 8)), checkpointing
    with pytest.raises(ValueError, match="add --megatron and --tp"):
        RunShape(megatron=True, deepspeed=False, sequence_parallel=True)


def test_cli_megatron(capsys):
    from plan_memory import main

    out = main(["--model", LLAMA70, "--megatron", "--tp", "8", "--pp", "2", "--min-gpus", "--gpu-gib", "24"])
    assert out["gpus"] == 16 and out["fits"]  # 8 GPUs (TP 8 × PP 2 needs 16) cannot hold it; 16 fit 24 GiB each
    assert "16 GPUs = TP 8 × PP 2 × DP 1, megatron-core" in capsys.readouterr().out


def test_bad_runs_refused(shape):
    with pytest.raises(ValueError, match="does not divide"):
        plan(shape, RunShape(tp=3, gpus=8))
    with pytest.raises(ValueError, match="QKaSA"):
        plan(shape, RunShape(method="qkasa", tp=2, gpus=2))
    with pytest.raises(ValueError, match="pp=3 does not divide the 80 layers"):
        plan(shape, RunShape(megatron=True, deepspeed=False, pp=3, gpus=3))
    with pytest.raises(ValueError, match="add --megatron"):
        RunShape(pp=2, gpus=2)
    with pytest.raises(ValueError, match="QKaSA"):
        RunShape(megatron=True, deepspeed=False, method="qkasa")


def test_cli_min_gpus(capsys):
    from plan_memory import main

    out = main(["--model", LLAMA70, "--min-gpus", "--gpu-gib", "24", "--seq-len", "4096"])
    assert out["fits"] and out["total_gib"] <= 24 and out["gpus"] % 8 == 0
    assert "smallest GPU count that fits" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no config.json"):
        main(["--model", str(REPO)])


@pytest.mark.parametrize("name, published", [("qkasa_8b_24gb", 8.03e9), ("qkasa_13b_24gb", 13.0e9)])
def test_shipped_qkasa_recipes_fit_24gb(name, published):
    """The one-GPU recipes: their config.json has the published size (model cards: Llama-3-8B 8.03 B, Llama-2-13B
    13.0 B parameters), and the planner's estimate of the recipe as configured fits its max_memory_gib."""
    from kasa_ds.training.memory_plan import recipe_estimate
    from kasa_ds.training.config import load_train_config

    cfg = load_train_config(str(REPO / "configs" / f"{name}.yaml"))
    estimate = recipe_estimate(cfg)
    assert estimate["fits"] and estimate["total_bytes"] <= 22 * GiB
    assert estimate["per_gpu_bytes"]["base_weights"] < 8 * GiB  # 4-bit
    shape = model_shape(str(REPO / "configs/models" / cfg.model.path.rsplit("/", 1)[-1]), TARGETS)
    assert abs(shape.total - published) / published < 0.005


@pytest.mark.parametrize("case, quantized, moe", [
    ((256, 688, 4, 8, 4, 2048, 256, 4, True), False, False),
    ((320, 864, 8, 5, 5, 16384, 64, 16, False), False, False),
    ((512, 1376, 4, 8, 2, 4096, 512, 2, True), True, False),
    ((256, 128, 4, 8, 4, 2048, 256, 4, False), False, True),
], ids=["kasa-ckpt", "kasa-large-vocab", "qkasa-ckpt", "kasa-moe"])
def test_planner_matches_measured_cpu_peak(case, quantized, moe):
    """The planner (float32, compute_bytes=4) against the peak of torch.profiler's memory timeline over one real
    training step on the CPU (tools/validate_memory_plan.py): within the 15% the issue sets (measured ≤ 2.6% for
    dense models; 0.4% and 6.0% for the Qwen3-MoE cases, routed activations counted)."""
    if quantized:
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is a [dev] dependency (QKaSA)")
    from validate_memory_plan import measure

    measured, planned = measure(case, r=16, dropout=0.05, quantized=quantized, moe=moe)
    total = planned["total_bytes"] - planned["per_gpu_bytes"]["cuda_context_and_slack"]
    assert abs(total / measured - 1) <= 0.15, (total, measured)


def test_published_qlora_65b_fits_one_48gb_gpu():
    """QLoRA (Dettmers et al. 2023, arXiv 2305.14314): LLaMA-65B fine-tuned on one 48 GB GPU with NF4 + double
    quantization (4 + 0.127 bits per weight: 8-bit constants per 64 weights, float32 per 256 of those), LoRA r=64 on
    every linear in bf16, paged AdamW. The planner, given that run, must land under 48 GB and above the 4-bit
    weights alone."""
    shape = model_shape(str(REPO / "configs/models/llama-65b"), TARGETS)
    assert abs(shape.total - 65.2e9) / 65.2e9 < 0.005  # published: 65.2 B
    run = RunShape(method="qkasa", r=64, seq_len=512, micro_batch=1, optimizer="paged_adamw", deepspeed=False,
                   zero=0, gpus=1, quant_mode="requantize", adapter_bytes=2)
    out = plan(shape, run)
    bits = (out["per_gpu_bytes"]["base_weights"] - (shape.total - shape.linear) * 2) * 8 / shape.linear
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert shape.linear * 0.5 < out["total_bytes"] < 48e9


def test_qkasa_under_zero3_partitions_the_packed_base_and_replicates_the_scales(shape):
    """A 4-bit base under ZeRO-3 (kasa_ds.training.partitioned_4bit): the packed linears and the 16-bit rest split over
    the GPUs; the block scales (double quantization: 1 B per 64 weights + 4 B per 64·256) and the rank-r correction
    factors stay whole on each; one gathered packed linear plus its dequantized bf16 copy is added. QKaSA under a
    ZeRO ≤ 2 engine is refused."""
    run = RunShape(method="qkasa", gpus=2, zero=3, r=8, seq_len=2048)
    out = plan(shape, run)["per_gpu_bytes"]
    scales = shape.linear * (1 / 64 + 4 / (64 * 256))
    correction = sum(8 * (m + n) * 2 for _, m, n in shape.targets)
    other = shape.total - shape.linear
    assert out["base_weights"] == pytest.approx((shape.linear * 0.5 + other * 2) / 2 + scales + correction)
    assert out["gathered_4bit_layer"] == pytest.approx(28672 * 8192 * 2.5)
    assert plan(shape, RunShape(method="qkasa", gpus=4, zero=3))["total_bytes"] < plan(shape, run)["total_bytes"]
    offloaded = plan(shape, RunShape(method="qkasa", gpus=2, zero=3, r=8, seq_len=2048, offload="all"))
    assert offloaded["per_gpu_bytes"]["base_weights"] == pytest.approx(scales + correction)
    with pytest.raises(ValueError, match="need ZeRO-3"):
        plan(shape, RunShape(method="qkasa", gpus=2, zero=2))


def test_the_70b_two_gpu_recipe_dry_runs(capsys):
    """configs/qkasa_70b_2gpu.yaml: fits 2 × 40 GB as shipped; on 2 × 24 GB only with the offload config."""
    from dry_run import dry_run

    config = str(REPO / "configs/qkasa_70b_2gpu.yaml")
    assert dry_run(config, 2, [], gpu_gib=40)["memory_plan"]["fits"]
    assert not dry_run(config, 2, ["train.micro_batch_size=1"], gpu_gib=24)["memory_plan"]["fits"]
    offload = dry_run(config, 2, ["ds_config=ds_configs/zero3_offload_bf16.json", "train.micro_batch_size=1"],
                      gpu_gib=24)
    assert offload["memory_plan"]["fits"] and "NF4 4-bit base, offload all" in capsys.readouterr().out


def test_experts_count_in_the_adapter_plan():
    """A fused-experts model (tiny Qwen3-MoE from its config, meta device): every expert's gate, up and down
    projection is a target with its own adapter; attention-only targets leave them out."""
    import transformers

    from kasa_ds.training.memory_plan import shape_of

    cfg = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    everything = shape_of(model, cfg, TARGETS)
    attention = shape_of(model, cfg, ["q_proj", "k_proj", "v_proj", "o_proj"])
    experts = everything.expert_targets
    assert len(experts) == 2 * 3 and {(m, n, e) for _, m, n, e in experts} == {(24, 32, 4), (32, 24, 4)}
    assert everything.targets == attention.targets and not attention.expert_targets
    run = RunShape(r=4, gpus=1, zero=0, deepspeed=False)
    extra = plan(everything, run)["adapter_params_per_gpu"] - plan(attention, run)["adapter_params_per_gpu"]
    assert extra == 2 * 4 * (4 * (24 + 32) + 4) * 3
    # routed activations: each token goes to top-2 experts of 4 in both layers (the attention-only run too: the
    # routing is the model's, whatever is adapted); the experts' adapters see top-2 rows of h (gate/up) and of I
    assert (everything.routed_rows, everything.router_logits, everything.ffn) == (2 * 2, 2 * 4, 2 * 24)
    assert everything.adapter_inputs - attention.adapter_inputs == 2 * 2 * (32 + 24)
