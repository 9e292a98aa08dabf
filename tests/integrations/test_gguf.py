"""llama.cpp for real (node-llama-cpp's prebuilt CPU build: tools/setup_llama_cpp.sh): two KaSA adapters trained a
few steps on SmolLM2-135M-Instruct, exported as llama.cpp adapter GGUFs (one through the library from the model, one
through ``tools/export_adapter.py --as-gguf`` from the saved adapter), each applied by llama.cpp to the float32 GGUF
of the base: the KaSA model's greedy tokens and chosen-token log-probabilities; the bare base gives the base's.

The base GGUF is the registry's llama.cpp-converted Q4_1 file, dequantized to float32 (the same weights transformers
loads from it, q/k rows in llama.cpp's order), so the adapter's q/k permutation is checked against llama.cpp's own
conversion, not against ours.

Tolerance: chosen-token log-probabilities within 1e-3 absolute. llama.cpp computes in float32 (weights, KV cache
and attention here) but with its own RMSNorm, RoPE, softmax and summation order over 30 layers: measured here
≤ 2.5e-4 for the bare base as for the adapters. Tokens equal.
"""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import GREEDY_TOKENS, SMOLLM2_TASKS, greedy, setup_script_output
from kasa_ds import export_gguf_adapter, save_adapter
from kasa_ds.training.assets import gguf_file

pytestmark = pytest.mark.slow
gguf = pytest.importorskip("gguf", reason="gguf (llama.cpp's gguf-py) is the [gguf] extra, in [dev]")
transformers = pytest.importorskip("transformers")
LOGPROB_TOL = 1e-3
PROMPT = "The capital of Italy is"


@pytest.fixture(scope="module")
def node_llama_cpp():
    """node-llama-cpp's entry file, installed once under ~/.cache/kasa_ds (seconds) and reused."""
    if shutil.which("node") is None:
        pytest.skip("node (Node.js >= 20) is not installed: llama.cpp runs here through node-llama-cpp")
    return setup_script_output("setup_llama_cpp.sh", "node-llama-cpp", timeout=900)


def dequantized_gguf(src: Path, dst: Path) -> Path:
    """``src`` with every tensor dequantized to float32 and its metadata (tokenizer, hyperparameters) kept."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        value = int(gguf.LlamaFileType.ALL_F32) if field.name == "general.file_type" else field.contents()
        writer.add_key_value(field.name, value, kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_llama_cpp_applies_each_kasa_gguf_adapter_as_the_kasa_model(node_llama_cpp, smollm2, smollm2_kasa,
                                                                      tmp_path):
    models, tokenizer = smollm2_kasa
    prompt = tokenizer(PROMPT).input_ids
    base_gguf = dequantized_gguf(gguf_file("smollm2-135m-instruct"), tmp_path / "smollm2-f32.gguf")
    capitals, colours = SMOLLM2_TASKS
    adapters = {capitals: export_gguf_adapter(models[capitals], tmp_path / "capitals.gguf", base=smollm2)}
    save_adapter(models[colours], tmp_path / "colours")
    from export_adapter import main

    adapters[colours] = main([str(tmp_path / "colours"), "--as-gguf", "--base", str(smollm2), "--out",
                              str(tmp_path / "colours.gguf")])
    references = {name: greedy(model, prompt) for name, model in models.items()}
    references["base"] = greedy(transformers.AutoModelForCausalLM.from_pretrained(smollm2).eval(), prompt)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"package": node_llama_cpp, "model": str(base_gguf), "prompt": prompt,
                                "new_tokens": GREEDY_TOKENS,
                                "runs": [{"name": "base", "lora": None}] +
                                        [{"name": n, "lora": str(f)} for n, f in adapters.items()]}))
    proc = subprocess.run(["node", str(Path(__file__).with_name("llama_cpp_greedy.mjs")), str(spec)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    print("llama.cpp max |Δ logprob|:", {n: max(abs(a - b) for a, b in zip(got[n]["logprobs"],
                                                                           references[n]["logprobs"])) for n in got})
    for name in references:
        assert got[name]["tokens"] == references[name]["tokens"], name
        assert got[name]["logprobs"] == pytest.approx(references[name]["logprobs"], abs=LOGPROB_TOL), name
    for name in SMOLLM2_TASKS:  # each adapter changes what the base says, and the two differ
        assert got[name]["tokens"] != got["base"]["tokens"], name
    assert got[capitals]["tokens"] != got[colours]["tokens"]
