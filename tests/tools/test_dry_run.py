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
