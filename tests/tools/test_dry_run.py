"""tools/dry_run.py on the shipped 70B-class configs: meta-device build from config.json alone, in seconds."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Published sizes (model cards): Llama-3-70B 70.6 B, Qwen2-72B 72.7 B parameters.
PUBLISHED = {"llama3_70b_kasa": 70.6e9, "qwen2_72b_kasa": 72.7e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_dry_run_counts_and_plan(name, capsys):
    from dry_run import dry_run

    out = dry_run(str(REPO / "configs" / f"{name}.yaml"), world=64)
    assert abs(out["total_params"] - PUBLISHED[name]) / PUBLISHED[name] < 0.005
    assert out["adapted_layers"] == 80 * 7
    assert out["svd_load_imbalance"] < 1.2 and out["svd_matrices_per_rank"][0] >= 1  # every rank gets SVD work
    printed = capsys.readouterr().out
    assert "adapted layers" in printed and "memory plan per GPU" in printed and "fits a 80 GiB GPU" in printed
    plan = out["memory_plan"]["per_gpu_bytes"]
    assert plan["base_weights"] == pytest.approx(out["total_params"] * 2 / 64)  # bf16, ZeRO-3 over 64 ranks


def test_adapter_count_is_r_times_m_plus_n():
    from dry_run import dry_run

    out = dry_run(str(REPO / "configs/llama3_70b_kasa.yaml"), world=8)
    h, kv, ff, r = 8192, 1024, 28672, 16
    per_layer = sum(r * (m + n) + r for m, n in [(h, h), (kv, h), (kv, h), (h, h), (ff, h), (ff, h), (h, ff)])
    assert out["adapter_params"] == 80 * per_layer == 207_102_720


def test_moe_config_counts_experts_and_fits(capsys):
    """configs/qwen3_30b_a3b_kasa.yaml (Qwen3-30B-A3B shaped: 48 layers of 128 experts, 8 per token): every
    expert's projection is counted with its own adapter, the truncation schedule spreads ranges of experts over the
    ranks, and the ZeRO-3 plan fits. Published size (model card): 30.5 B."""
    from dry_run import dry_run

    out = dry_run(str(REPO / "configs/qwen3_30b_a3b_kasa.yaml"), world=16)
    assert abs(out["total_params"] - 30.5e9) / 30.5e9 < 0.005
    assert out["adapted_layers"] == 48 * 4 and out["adapted_experts_modules"] == 48
    assert out["adapted_expert_matrices"] == 48 * 128 * 3
    h, q, kv, i, r = 2048, 32 * 128, 4 * 128, 768, 16
    attention = sum(r * (m + n) + r for m, n in [(q, h), (kv, h), (kv, h), (h, q)])
    experts = 128 * sum(r * (m + n) + r for m, n in [(i, h), (i, h), (h, i)])
    assert out["adapter_params"] == 48 * (attention + experts)
    assert out["svd_load_imbalance"] < 1.2 and out["svd_matrices_per_rank"][0] >= 1
    printed = capsys.readouterr().out
    assert "48 experts modules of 128 experts" in printed and "fits a 80 GiB GPU" in printed
    assert out["memory_plan"]["fits"]
