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


def test_megatron_config_dry_runs_as_the_road_will_load_it(capsys):
    """configs/llama3_70b_megatron.yaml: TP 8 on one node of 8, or with two pipeline stages on 16; a TP size that
    splits a key/value group and a world size that is no multiple of TP × PP are one error line each."""
    import subprocess
    import sys

    from dry_run import dry_run

    config = str(REPO / "configs/llama3_70b_megatron.yaml")
    one = dry_run(config, world=8, gpu_gib=40)
    assert one["megatron"] == {"tp": 8, "pp": 1, "dp": 1} and one["memory_plan"]["fits"]
    assert abs(one["total_params"] - PUBLISHED["llama3_70b_kasa"]) / PUBLISHED["llama3_70b_kasa"] < 0.005
    assert "per_gpu_bytes" not in one  # ZeRO-3's split: not this road's
    two = dry_run(config, world=16, overrides=["pipeline_parallel=2"], gpu_gib=24)
    assert two["megatron"] == {"tp": 8, "pp": 2, "dp": 1} and two["memory_plan"]["fits"]
    assert two["svd_matrices_per_rank"] == (35, 35)  # one stage's 40 layers × 7 targets over its 8 ranks
    printed = capsys.readouterr().out
    assert "TP 8 × PP 2 × DP 1" in printed and "megatron-core TP 8 × PP 2 with SP, bf16 base" in printed
    with pytest.raises(ValueError, match="tensor_parallel=3 must divide the 64 attention heads and 8 key/value"):
        dry_run(config, world=12, overrides=["tensor_parallel=3"])
    proc = subprocess.run([sys.executable, str(REPO / "tools/dry_run.py"), "--config", config, "--world-size", "12"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == ("error: --world-size 12: a multiple of tensor_parallel × "
                                                    "pipeline_parallel = 8")
