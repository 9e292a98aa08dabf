"""tools/prepare_model.py on the real SmolLM2-135M-Instruct GGUF that a registry package ships (tools/setup.sh --dev
installs it): a local HF checkpoint with the model's chat template, reproducing the GGUF model, that answers; and
the SmolLM2 chat recipe (configs/smollm2_chat.yaml) end to end on chatterbot-corpus conversations, a few steps."""

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smollm2_gguf_becomes_a_local_checkpoint_that_answers(tmp_path, smollm2):
    from kasa_ds.training.assets import gguf_file
    from prepare_model import main
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = smollm2
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
    (tmp_path / "notes.txt").write_text("user data")  # a foreign non-empty directory is never replaced
    with pytest.raises(SystemExit) as e:
        main(["--gguf", str(gguf_file("smollm2-135m-instruct")), "--out", str(tmp_path)])
    assert e.value.code == 2 and (tmp_path / "notes.txt").read_text() == "user data"


@pytest.mark.slow
def test_smollm2_chat_recipe_end_to_end(tmp_path, smollm2, capsys):
    import importlib.util

    if importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip("chatterbot-corpus is not installed (tools/setup.sh --dev installs it)")
    from make_chat_data import main as make_chat_data

    from kasa_ds.training.config import load_train_config
    from kasa_ds.training.recipe import run_recipe

    data = make_chat_data(["--out", str(tmp_path / "chat")])
    rc = run_recipe(load_train_config(str(REPO / "configs/smollm2_chat.yaml"), [
        f"model.path={smollm2}", f"data.train={data / 'train.jsonl'}", f"data.eval={data / 'eval.jsonl'}",
        f"output_dir={tmp_path / 'run'}", "model.max_length=128", "train.max_steps=3", "train.eval_every=3",
        "train.save_every=3", "data.max_eval_examples=8", "train.sample_prompts=1", "train.sample_max_new_tokens=8"]))
    assert rc == 0
    out = capsys.readouterr().out
    assert "KaSA: adapted 150 layers" in out and "packing: " in out and "eval after:" in out
    assert "sample 1 at step 3: " in out and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
