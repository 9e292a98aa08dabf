"""tools/prepare_model.py on the real SmolLM2-135M-Instruct GGUF that a registry package ships (tools/setup.sh --dev
installs it): a local HF checkpoint with the model's chat template, reproducing the GGUF model, that answers."""

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))


@pytest.mark.slow
def test_smollm2_gguf_becomes_a_local_checkpoint_that_answers(tmp_path):
    from kasa_ds.training.assets import gguf_file

    try:
        gguf_file("smollm2-135m-instruct")
    except FileNotFoundError as e:
        pytest.skip(f"{e} (tools/setup.sh --dev installs it)")
    from prepare_model import main
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = main(["smollm2-135m-instruct", "--out", str(tmp_path / "smollm2")])
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template  # SmolLM2's ChatML template
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        answer = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, ids["input_ids"].shape[1]:])
    # its real ChatML template through kasa_ds's labels: exactly the answers and their end-of-turn tokens
    from kasa_ds.training.chat import IGNORE_INDEX, encode_conversation

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"},
            {"role": "assistant", "content": "It is four."}, {"role": "user", "content": "And three plus three?"},
            {"role": "assistant", "content": "Six."}]
    ids, labels = encode_conversation(tokenizer, chat)
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans, current = spans + [tokenizer.decode(current)], []
    assert spans + ([tokenizer.decode(current)] if current else []) == ["It is four.<|im_end|>", "Six.<|im_end|>"]
    with pytest.raises(SystemExit) as e:  # the output now holds a checkpoint: replaced only by another one
        main(["--gguf", str(gguf_file("smollm2-135m-instruct")), "--out", str(tmp_path)])
    assert e.value.code == 2
