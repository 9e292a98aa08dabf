"""The benchmark tools run end to end in their smoke modes (no timing assertions: figures are for the README)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
pytest.importorskip("peft", minversion="0.21", reason="bench_init compares against PEFT's KaSA ([dev] dependency)")


def test_bench_init_smoke(tmp_path, capsys):
    import bench_init

    result = bench_init.main(["--smoke", "--json", str(tmp_path / "r.json")])
    assert set(result["median_seconds"]) == {"peft", "kasa_ds"}
    assert all(e < 1e-4 for e in result["max_rel_error_vs_fp64"].values())
    assert json.loads((tmp_path / "r.json").read_text())["config"]["matrices"] == 7
    assert "speedup kasa_ds / PEFT" in capsys.readouterr().out


def test_bench_step_smoke(capsys):
    import bench_step

    result = bench_step.main(["--smoke"])
    assert set(result["median_step_seconds"]) == {"peft_lora", "peft_kasa", "kasa_ds"}
    assert all(v > 0 for v in result["peak_memory_bytes"].values())
    assert result["time_ratio_vs_peft_lora"]["peft_lora"] == 1.0
    assert "vs LoRA" in capsys.readouterr().out
