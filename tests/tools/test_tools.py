"""The benchmark tools run end to end in their smoke modes (no timing assertions: figures are for the README)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port

REPO = Path(__file__).resolve().parents[2]

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


@pytest.mark.parametrize("base", ["nf4", "moe"])
def test_bench_step_smoke_on_a_4bit_base_and_on_experts(base, capsys):
    """--base nf4: QKaSA vs PEFT QLoRA (PEFT's own bitsandbytes layer) on one NF4 base; --base moe: KaSA on fused
    experts vs PEFT target_parameters LoRA on the same experts."""
    import bench_step

    result = bench_step.main(["--smoke", "--base", base])
    assert set(result["median_step_seconds"]) == {"peft_lora", "kasa_ds"}
    assert all(v > 0 for v in result["peak_memory_bytes"].values())
    assert f"{base} base" in capsys.readouterr().out


def test_bench_tp_init_smoke():
    """2 ranks on tiny weights: every row printed and the two paths agree (the last column)."""
    proc = subprocess.run([sys.executable, str(REPO / "tools/bench_tp_init.py"), "--smoke"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "MASTER_PORT": str(free_port())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("64x", "224x"))]
    assert len(rows) == 6 and {r[2] for r in rows} == {"gram", "gather"}
    assert all(float(r[-1]) < 1e-5 for r in rows)


def test_compare_methods_smoke(tmp_path):
    """1 seed, 2 steps, 3 methods (incl. a PEFT one and an ablation): a valid table, JSON and PNG."""
    proc = subprocess.run([sys.executable, str(REPO / "tools/compare_methods.py"), "--seeds", "0", "--steps", "2",
                           "--eval-every", "2", "--max-eval", "16", "--methods", "kasa", "lora", "kasa_no_trunc",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["table"]) == {"kasa", "lora", "kasa_no_trunc"}
    for row in result["table"].values():
        assert 0.0 <= row["accuracy"]["mean"] <= 1.0 and row["loss"]["mean"] > 0
    assert (tmp_path / "curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_qkasa_modes_smoke(tmp_path, capsys):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is a [dev] dependency (QKaSA)")
    from qkasa_modes import main

    out = main(["--finetune-steps", "2", "--seeds", "0", "1", "--max-eval", "16", "--out", str(tmp_path)])
    assert set(out["finetune"]) == {"low_rank_correction", "requantize"}
    assert all(len(r["loss"]) == 2 for r in out["finetune"].values())
    assert "(2 seeds): eval loss" in capsys.readouterr().out


def tiny_chat_model(tmp_path, answers: list[str]):
    """The recipe's tiny Llama with a chat template, and a JSONL of one conversation per answer."""
    from make_tiny_llama import build

    model = build(tmp_path / "tiny", hidden=48, layers=2, vocab=320)
    template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                                     {"role": "assistant", "content": answer}]}) + "\n"
                            for i, answer in enumerate(answers)))
    return model, data


def test_truncation_cost_runs_and_measures_each_variant(tmp_path):
    """tools/truncation_cost.py on the recipe's tiny Llama: the untouched loss, then each truncation variant from
    the same model; truncating changes the loss (ΔW = 0: the truncation is all that differs)."""
    import truncation_cost

    model, data = tiny_chat_model(tmp_path, [f"It is {2 * i}." for i in range(6)])
    result = truncation_cost.main(["--model", str(model), "--data", str(data), "--examples", "6",
                                   "--variant", "all:4:q_proj,k_proj,v_proj,o_proj", "--variant", "q:4:q_proj"])
    assert set(result) == {"untouched", "all", "q"}
    assert result["all"]["loss"] != result["untouched"]["loss"] and result["all"]["max_tail_energy"] > 0
    assert result["q"]["targets"] == ["q_proj"]


def test_bench_recipe_measures_all_three_runs(tmp_path, capsys):
    """tools/bench_recipe.py on the tiny Llama with a chat template: the kasa_ds recipe, TRL SFTTrainer + PEFT LoRA
    and the packed recipe each train and are measured; the JSON holds every run and both ratios."""
    import bench_recipe

    model, data = tiny_chat_model(tmp_path, ["It is " + "a lot " * (i % 7) for i in range(1, 40)])
    assert bench_recipe.main(["--model", str(model), "--data", str(data), "--steps", "4", "--warmup", "1",
                              "--batch", "4", "--max-length", "96", "--targets", "q_proj", "v_proj", "up_proj",
                              "--out", str(tmp_path / "bench.json")]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert set(result["runs"]) == {"kasa", "trl_lora", "kasa_packed"}
    assert all(r["tokens_per_s"] > 0 for r in result["runs"].values())
    assert set(result["ratios"]) == {"kasa / trl_lora", "kasa_packed / kasa"}
    assert result["same_batches"] is True  # TRL was fed the recipe's batches, in its order
    assert "kasa_packed / kasa:" in capsys.readouterr().out


def test_gpu_check_smoke_runs_every_check_on_the_cpu(tmp_path, capsys):
    """tools/gpu_check.py --smoke: the GPU checks' code paths with tiny shapes on the CPU (the recipe through the real
    deepspeed launcher, the Trainer, both step benchmarks, the 70B-shaped init and its 560-matrix projection); the
    Megatron road on an HF Llama checkpoint, and on two pipeline stages against TP=1; the whole-model comparison (tested in tests/tools/test_compare_llm.py) is
    reported as not available, never as a pass. Without --smoke on a GPU-less machine: exit 2."""
    import gpu_check
    import torch

    assert gpu_check.main(["--smoke", "--out", str(tmp_path / "gpu.json")]) == 0
    result = json.loads((tmp_path / "gpu.json").read_text())
    checks = result["checks"]
    assert [c for c, r in checks.items() if r["pass"]] == ["qkasa_4bit", "bf16_autocast", "init_70b", "step_8b",
                                                          "step_qkasa", "recipe_zero3", "trainer", "megatron",
                                                          "megatron_parallel"]
    assert checks["llm_compare"] == {"pass": None, "reason": "--smoke"}
    # two pipeline stages on 2 CPU ranks against TP=1 (sequence parallelism only where there are 2 GPUs)
    assert set(checks["megatron_parallel"]["losses"]) == {"tp1", "pp2"}
    assert checks["megatron_parallel"]["loss_error_vs_tp1"]["pp2"] <= 1e-3
    assert checks["megatron"]["logits_vs_hf"] < 1e-5 and checks["megatron"]["core_attention"] == "SDPACoreAttention"
    assert checks["qkasa_4bit"]["effective_base_rel_error"] < 1e-4
    assert set(checks["step_qkasa"]["time_ratio_vs_peft_lora"]) == {"peft_lora", "kasa_ds"}
    projected = checks["init_70b"]["projected_560_matrices_seconds"]
    assert set(projected) == {"1_gpus", "8_gpus"} and projected["8_gpus"]["auto"] < projected["1_gpus"]["auto"]
    assert len(checks["recipe_zero3"]["losses"]) == 6 and checks["recipe_zero3"]["adapter_written"]
    out = capsys.readouterr().out
    assert all(f"{check:<17} PASS" in out for check in ("recipe_zero3", "megatron", "megatron_parallel"))
    if not torch.cuda.is_available():
        assert gpu_check.main([]) == 2 and "no CUDA GPU" in capsys.readouterr().err


def test_gpu_wheels_dry_run_lists_what_a_bare_gpu_needs_within_the_limit(capsys):
    """tools/gpu_wheels.py --dry-run: the wheels a bare lent GPU lacks (DeepSpeed, bitsandbytes, TRL, datasets and
    their needs the image lacks), each size from the registry, and the total with the working tree under 64 MiB."""
    import urllib.error

    import gpu_wheels

    try:
        code = gpu_wheels.main(["--dry-run"])
    except urllib.error.URLError as e:
        pytest.skip(f"the package registry is not reachable from here ({e.reason}): the sizes come from it")
    out = capsys.readouterr().out
    assert code == 0 and "fits the device tool's 64 MiB" in out
    for wheel in ("bitsandbytes-", "trl-", "datasets-", "deepspeed-", "pydantic_core-"):
        assert wheel in out
    assert "torch-" not in out and "transformers-" not in out  # the image holds them: never carried
