"""Conversational data (kasa_ds.training.chat): formats, chat templates, labels on assistant turns only.

The expected labels are built independently of kasa_ds's method (prefix renderings): from the tokenizer's
character offsets of the rendered conversation, a token is labelled exactly when its characters overlap an
assistant answer or the end-of-turn token that follows it."""

import json
from pathlib import Path

import pytest

from kasa_ds.training.chat import IGNORE_INDEX, ChatError, encode_conversation, to_messages
from kasa_ds.training.data import CausalLMDataset, check_records

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = {  # a header ending in a space (merges with the answer under SentencePiece), and special-token turns
    "spaced": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
              "{% if add_generation_prompt %}assistant: {% endif %}",
    "tokens": "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}{% endfor %}"
              "{% if add_generation_prompt %}<s>assistant\n{% endif %}",
}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "It is four."}, {"role": "user", "content": "And three plus three?"},
        {"role": "assistant", "content": "Six."}]


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir):
    return tiny_llama_dir


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def char_tokenizer():
    """One token per character (and <s>, </s>): exact character offsets for an independent expectation."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted({c for m in CHAT for c in m["content"] + m["role"]} | set(": \n"))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def expected_labels(tokenizer, messages):
    """From exact character offsets: a token is labelled iff it overlaps an answer or the end-of-turn after it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, cursor = [], 0
    for m in messages:
        at = text.index(m["content"], cursor)
        cursor = at + len(m["content"])
        if m["role"] == "assistant":
            spans.append((at, cursor + len(tokenizer.eos_token)))
    labels = [tid if any(s < b and e > a for a, b in spans) else IGNORE_INDEX
              for tid, (s, e) in zip(encoded["input_ids"], encoded["offset_mapping"])]
    return encoded["input_ids"], labels


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("messages", [CHAT[1:3], CHAT, CHAT[:3]], ids=["single-turn", "multi-turn+system",
                                                                         "system+single"])
def test_labels_cover_exactly_the_assistant_tokens(char_tokenizer, template, messages):
    char_tokenizer.chat_template = TEMPLATES[template]
    ids, labels = encode_conversation(char_tokenizer, messages)
    want_ids, want_labels = expected_labels(char_tokenizer, messages)
    assert ids == want_ids
    assert labels == want_labels  # token by token
    assert sum(t == char_tokenizer.eos_token_id for t in labels) == sum(m["role"] == "assistant" for m in messages)


@pytest.mark.parametrize("template,answers", [
    ("spaced", ["▁It", "▁is", "▁f", "o", "ur", ".", "</s>", "▁S", "i", "x", ".", "</s>"]),
    ("tokens", ["I", "t", "▁is", "▁f", "o", "ur", ".", "</s>", "S", "i", "x", ".", "</s>"]),
])
def test_labels_on_a_sentencepiece_tokenizer_by_hand(tokenizer, template, answers):
    """Written out by hand for the recipe's tiny SentencePiece tokenizer: under the spaced template the header's
    space merges into each answer's first token (▁It, ▁S), which belongs to the answer; nothing of the system or
    user turns, nor the headers, is labelled."""
    tokenizer.chat_template = TEMPLATES[template]
    ids, labels = encode_conversation(tokenizer, CHAT)
    assert tokenizer.convert_ids_to_tokens([t for t in labels if t != IGNORE_INDEX]) == answers
    first = labels.index(next(t for t in labels if t != IGNORE_INDEX))
    assert all(t == IGNORE_INDEX for t in labels[:first])


def test_every_format_becomes_the_same_conversation(tokenizer):
    tokenizer.chat_template = TEMPLATES["tokens"]
    sharegpt = {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                   "value": m["content"]} for m in CHAT]}
    assert to_messages(sharegpt, "sharegpt", "r") == CHAT
    alpaca = {"instruction": "What is two plus two?", "input": "", "output": "It is four."}
    assert to_messages(alpaca, "alpaca", "r") == CHAT[1:3]
    ids, labels = encode_conversation(tokenizer, CHAT)
    for record, fmt in (({"messages": CHAT}, "messages"), (sharegpt, "sharegpt")):
        assert CausalLMDataset([record], tokenizer, 512, fmt=fmt)[0] == {"input_ids": ids, "labels": labels}
    # prompt/completion and plain text need no template; train_on_prompt labels everything
    pc = CausalLMDataset([{"prompt": "Q: 2+2?", "completion": " 4"}], tokenizer, 512, fmt="prompt_completion")[0]
    n_prompt = len(tokenizer("Q: 2+2?")["input_ids"])
    assert pc["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt and pc["labels"][-1] == tokenizer.eos_token_id
    assert pc["labels"][n_prompt:] == pc["input_ids"][n_prompt:]
    text = CausalLMDataset([{"text": "hello there"}], tokenizer, 512, fmt="text")[0]
    assert text["labels"] == text["input_ids"] and text["input_ids"][-1] == tokenizer.eos_token_id
    everything = CausalLMDataset([{"messages": CHAT}], tokenizer, 512, fmt="messages", train_on_prompt=True)[0]
    assert everything["labels"] == everything["input_ids"]


def test_overlong_examples_are_truncated_or_dropped_and_counted(tokenizer):
    tokenizer.chat_template = TEMPLATES["tokens"]
    rows = [{"messages": CHAT}, {"messages": CHAT[1:3]}]
    full = len(encode_conversation(tokenizer, CHAT)[0])
    truncated = CausalLMDataset(rows, tokenizer, full - 2, fmt="messages")
    assert (truncated.truncated, truncated.dropped, len(truncated)) == (1, 0, 2)
    dropped = CausalLMDataset(rows, tokenizer, full - 2, fmt="messages", overlong="drop")
    assert (dropped.truncated, dropped.dropped, len(dropped)) == (0, 1, 1)


@pytest.mark.parametrize("record,message", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}, "turn 2 has role 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     "turn 2 is an empty assistant turn"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
     "turn 1 content is a int"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"conversations": [{"from": "human", "text": "hi"}]}, "turn 1 must be an object with 'from' and 'value'"),
])
def test_malformed_conversations_name_file_record_and_fix(record, message):
    from kasa_ds.training.data import DataError

    first = {"messages": CHAT} if "messages" in record else {"conversations": [{"from": "human", "value": "hi"},
                                                                                 {"from": "gpt", "value": "yo"}]}
    with pytest.raises(DataError, match=f"data.jsonl: record 2.*{message}"):
        check_records([first, record], "data.jsonl", "causal_lm", fmt="auto")  # the format is read from record 1


def test_recipe_trains_on_messages_with_a_template_file(tmp_path, model_dir, capsys):
    from kasa_ds.training.config import load_train_config
    from kasa_ds.training.recipe import run_recipe

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus {i}?"},
        {"role": "assistant", "content": f"It is {2 * i}."}]}) + "\n" for i in range(40)))
    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATES["tokens"])
    config = lambda *extra: load_train_config(str(REPO / "configs/tiny_llama_instruct.yaml"), [  # noqa: E731
        f"model.path={model_dir}", f"output_dir={tmp_path / 'run'}", f"data.train={data}", f"data.eval={data}",
        "data.max_eval_examples=8", "train.micro_batch_size=4", "train.max_steps=6", "train.log_every=1",
        "train.lr=3e-3", *extra])
    assert run_recipe(config()) == 2  # this tokenizer has no chat template of its own
    assert "data.format=messages needs a chat template" in capsys.readouterr().err
    assert run_recipe(config(f"data.chat_template={template}", "train.sample_prompts=2")) == 0
    out = capsys.readouterr().out
    assert f"data.format=auto: {data} reads as messages" in out and "eval after:" in out
    assert "sample 1 at step 0: " in out and "sample 2 at step 6: " in out  # answers before and after training
    samples = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
               if '"sample"' in line]
    assert [r["step"] for r in samples] == [0, 6] and all(len(r["samples"]) == 2 for r in samples)
    assert samples[0]["samples"][0]["prompt"].endswith("<s>assistant\n")  # the template's generation prompt
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert evals[-1]["loss"] < evals[0]["loss"]


def test_a_template_that_renders_no_answer_is_refused(tokenizer):
    tokenizer.chat_template = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}" \
                              "{% endfor %}"
    with pytest.raises(ChatError, match="renders to no tokens of its own"):
        encode_conversation(tokenizer, CHAT[1:3])


TOOL_TEMPLATE = (  # renders tools, tool calls and tool turns (as tool-use templates do)
    "{% if tools %}tools: {{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% for c in m.get('tool_calls', []) %}<call>{{ c['function']['name'] }}({{ c['function']['arguments'] }})"
    "{% endfor %}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
CALL = {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
TOOL_CHAT = [{"role": "user", "content": "Weather in Oslo?"},
             {"role": "assistant", "content": "", "tool_calls": [CALL]},
             {"role": "tool", "content": "rain, 8 C", "tool_call_id": "1"},
             {"role": "assistant", "content": "It rains."}]
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


def labelled_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t in labels if t != IGNORE_INDEX])


def test_tool_calls_are_trained_and_tool_results_are_context(tokenizer):
    """#27: an assistant turn that only calls a tool is trained on its call (it was refused as empty); the tool
    turn's result is context; the record's tools reach the template."""
    tokenizer.chat_template = TOOL_TEMPLATE
    messages = to_messages({"messages": TOOL_CHAT, "tools": TOOLS}, "messages", "r")
    ids, labels = encode_conversation(tokenizer, messages, tools=TOOLS)
    text = labelled_text(tokenizer, ids, labels)
    assert "weather" in text and "Oslo" in text and "It rains." in text
    assert "rain, 8 C" not in text and "Weather in Oslo?" not in text
    assert "tools: weather" in tokenizer.decode(ids)


def test_a_template_that_drops_tool_calls_or_tool_turns_is_refused(tokenizer):
    tokenizer.chat_template = TEMPLATES["spaced"]  # knows nothing of tools
    with pytest.raises(ChatError, match="does not render its tool call 'weather'"):
        encode_conversation(tokenizer, to_messages({"messages": TOOL_CHAT}, "messages", "r"))
    no_calls = [TOOL_CHAT[0], {"role": "assistant", "content": "Checking."}, TOOL_CHAT[2], TOOL_CHAT[3]]
    tokenizer.chat_template = TEMPLATES["spaced"].replace("{{ m['content'] }}",
                                                          "{% if m['role'] != 'tool' %}{{ m['content'] }}{% endif %}")
    with pytest.raises(ChatError, match="does not render tool turns"):
        encode_conversation(tokenizer, to_messages({"messages": no_calls}, "messages", "r"))


def test_openai_weight_zero_leaves_a_turn_untrained(char_tokenizer):
    char_tokenizer.chat_template = TEMPLATES["spaced"]
    weighted = [dict(m) for m in CHAT]
    weighted[2]["weight"] = 0
    ids, labels = encode_conversation(char_tokenizer, to_messages({"messages": weighted}, "messages", "r"))
    text = "".join(char_tokenizer.convert_ids_to_tokens([t for t in labels if t != IGNORE_INDEX]))
    assert "Six." in text and "It is four." not in text
    assert ids == encode_conversation(char_tokenizer, CHAT)[0]  # the same tokens, fewer labels
    with pytest.raises(ChatError, match="weight is 0 or 1"):
        to_messages({"messages": [CHAT[1], {**CHAT[2], "weight": 0.5}]}, "messages", "r")
    with pytest.raises(ChatError, match="every one has weight 0"):
        to_messages({"messages": [CHAT[1], {**CHAT[2], "weight": 0}]}, "messages", "r")
