"""vLLM for real (its CPU build, in its own environment: tools/setup_vllm.sh): two KaSA adapters trained a few steps on
SmolLM2-135M-Instruct, exported as rank-2r LoRAs, served together by one base through the offline ``LLM`` and
through ``vllm serve`` over the OpenAI API on loopback; each gives its own KaSA model's greedy tokens and
chosen-token log-probabilities, and the base without an adapter differs.

Tolerance: chosen-token log-probabilities within 1e-4 absolute (float32 on both sides; vLLM's CPU attention and its
LoRA kernels sum in another order over 30 layers: measured here ≤ 1.8e-5); tokens equal, generation ending at EOS as
vLLM's does.
"""

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import (GREEDY_TOKENS as NEW_TOKENS, SMOLLM2_R as R, SMOLLM2_TASKS as TASKS, free_port, greedy,
                      setup_script_output)
from kasa_ds.io.lora import export_lora_adapter

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
LOGPROB_TOL = 1e-4
PROMPT = "Question: What is the capital of Italy?\nAnswer:"


@pytest.fixture(scope="module")
def vllm_python():
    """The vLLM environment's python, created once under ~/.cache/kasa_ds (minutes) and reused."""
    return setup_script_output("setup_vllm.sh", "the vLLM environment")


@pytest.fixture(scope="module")
def served(smollm2, smollm2_kasa, tmp_path_factory):
    """Per adapter: its export directory and its KaSA model's greedy reference; and the prompt's token ids."""
    out = tmp_path_factory.mktemp("vllm")
    models, tokenizer = smollm2_kasa
    prompt_ids = tokenizer(PROMPT).input_ids
    references, exports = {}, {}
    for name, model in models.items():
        exports[name] = str(export_lora_adapter(model, out / name, base=str(smollm2)))
        references[name] = greedy(model, prompt_ids)
    base = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    references["base"] = greedy(base, prompt_ids)
    return out, exports, references, prompt_ids


def vllm_env() -> dict:
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ""}


def check(got: dict, references: dict) -> None:
    for name in TASKS:
        assert got[name]["tokens"] == references[name]["tokens"], name
        assert got[name]["logprobs"] == pytest.approx(references[name]["logprobs"], abs=LOGPROB_TOL), name
    assert got["base"]["tokens"] == references["base"]["tokens"]
    assert got["base"]["logprobs"] == pytest.approx(references["base"]["logprobs"], abs=LOGPROB_TOL)
    for name in TASKS:  # each adapter changes what the base says, and the two adapters differ
        assert got[name]["tokens"] != got["base"]["tokens"], name
    assert got["capitals"]["tokens"] != got["colours"]["tokens"]


def test_vllm_offline_serves_two_kasa_exports_at_once(vllm_python, served, smollm2):
    out, exports, references, prompt_ids = served
    spec = out / "spec.json"
    spec.write_text(json.dumps({"model": str(smollm2), "prompt_ids": prompt_ids, "max_tokens": NEW_TOKENS,
                                "max_lora_rank": 2 * R, "adapters": exports}))
    proc = subprocess.run([vllm_python, str(Path(__file__).with_name("vllm_offline_worker.py")), str(spec),
                           str(out / "offline.json")], env=vllm_env(), capture_output=True, text=True, timeout=900,
                          cwd=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((out / "offline.json").read_text())
    print("offline max |Δ logprob|:", {n: max(abs(a - b) for a, b in zip(got[n]["logprobs"],
                                                                         references[n]["logprobs"])) for n in got})
    check(got, references)


def test_vllm_serve_answers_each_adapter_over_the_openai_api(vllm_python, served, smollm2):
    out, exports, references, prompt_ids = served
    port = free_port()
    # vllm-cpu's `vllm` command asks for the distribution "vllm" (it is "vllm-cpu") and exits: the same server, by
    # module
    server = subprocess.Popen([vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(smollm2),
                               "--dtype", "float32",
                               "--enable-lora", "--max-lora-rank", str(2 * R), "--max-loras", "2",
                               "--lora-modules", *(f"{n}={d}" for n, d in exports.items()), "--max-model-len", "256",
                               "--enforce-eager", "--gpu-memory-utilization", "0.05", "--host", "127.0.0.1",
                               "--port", str(port)], env=vllm_env(), cwd=out, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.time() + 600
        while True:
            try:
                models = json.load(urllib.request.urlopen(f"{url}/models", timeout=5))
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, server.stdout.read()[-4000:] \
                    if server.poll() is not None else "vllm serve did not come up"
                time.sleep(2)
        assert set(TASKS) <= {m["id"] for m in models["data"]}
        got = {}
        for name in [*TASKS, "base"]:
            body = {"model": name if name != "base" else str(smollm2), "prompt": prompt_ids,
                    "max_tokens": NEW_TOKENS, "temperature": 0, "logprobs": 1, "return_tokens_as_token_ids": True}
            request = urllib.request.Request(f"{url}/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            choice = json.load(urllib.request.urlopen(request, timeout=300))["choices"][0]["logprobs"]
            got[name] = {"logprobs": choice["token_logprobs"],
                         "tokens": [int(t.removeprefix("token_id:")) for t in choice["tokens"]]}
        print("serve max |Δ logprob|:", {n: max(abs(a - b) for a, b in zip(got[n]["logprobs"],
                                                                           references[n]["logprobs"])) for n in got})
        check(got, references)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def test_vllm_installs_a_kasa_moe_export(vllm_python, tiny_moe_dir, tmp_path):
    """A KaSA adapter on a Qwen3-MoE model (attention and every expert), exported as a rank-2r LoRA in PEFT's fused
    3-D expert layout, given to vLLM's offline engine with its mixed MoE LoRA format (enable_mixed_moe_lora_format,
    is_3d_lora_weight: vllm/lora/model_manager.py converts the fused gate_up/down LoRA into per-expert w1/w3/w2).
    Where vLLM computes it, the tokens and log-probabilities must be the KaSA model's. vllm-cpu 0.32.0 loads,
    converts and installs the adapter, then its fused-MoE LoRA forward runs Triton kernels only (TritonExperts, a
    CUDA path): that failure, and only that one, ends the test as a skip naming it."""
    from kasa_ds import KaSAConfig, apply_kasa

    from conftest import randomize_adapters

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_moe_dir, dtype=torch.float32).eval()
    apply_kasa(model, KaSAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj",
                                                               "down_proj"], init_seed=0), show_progress=False)
    randomize_adapters(model, 3)
    export = export_lora_adapter(model, tmp_path / "moe_lora", base=str(tiny_moe_dir))
    prompt_ids = [1, 5, 9, 33, 70, 12]
    reference = greedy(model, prompt_ids, 8)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": str(tiny_moe_dir), "prompt_ids": prompt_ids, "max_tokens": 8,
                                "max_lora_rank": 16, "adapters": {"kasa": str(export)}, "fused_moe": True}))
    proc = subprocess.run([vllm_python, str(Path(__file__).with_name("vllm_offline_worker.py")), str(spec),
                           str(tmp_path / "out.json")], env=vllm_env(), capture_output=True, text=True, timeout=900,
                          cwd=tmp_path)
    if proc.returncode != 0:
        log = proc.stdout + proc.stderr
        failure = next((line for line in log.splitlines() if "triton.language" in line), None)
        assert failure and "experts/triton_moe.py" in log and "LoRA adapter" not in log, log[-4000:]
        pytest.skip("vLLM accepted and installed the KaSA MoE LoRA, but this vLLM build's fused-MoE LoRA forward "
                    "runs Triton (CUDA) kernels only: " + failure.split("]", 1)[-1].strip()[-200:])
    got = json.loads((tmp_path / "out.json").read_text())["kasa"]
    assert got["tokens"] == reference["tokens"]
    assert got["logprobs"] == pytest.approx(reference["logprobs"], abs=LOGPROB_TOL)
