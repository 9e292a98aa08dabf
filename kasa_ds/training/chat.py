"""Conversational and plain-text records for causal-LM training: formats, chat templates, assistant-only labels.

Formats (``data.format``), one per file; ``auto`` decides from the first record's fields and says what it chose:
    messages            {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}  (OpenAI)
    sharegpt            {"conversations": [{"from": "system" | "human" | "gpt", "value": str}, ...]}
    alpaca              {"instruction": str, "input": str?, "output": str}: a user/assistant conversation when a
                        chat template exists, else kasa_ds's Alpaca prompt (kasa_ds.training.data)
    prompt_completion   {"prompt": str, "completion": str}: loss on the completion and EOS
    text                {"text": str}: loss on every token and EOS
A conversation is rendered with the tokenizer's chat template (or ``data.chat_template``). Each assistant turn — its
content and the template's end-of-turn token — carries labels; system and user turns and the template's headers
(its generation prompt included) are ``IGNORE_INDEX``, unless ``data.train_on_prompt``. The spans are found by
rendering prefixes: the tokens between "history + generation prompt" and "history + this answer" are the answer
(a boundary token the tokenizer merged across the two belongs to the answer).
"""

from __future__ import annotations

from typing import Optional

FORMATS = ("auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text")
CONVERSATIONAL = ("messages", "sharegpt", "alpaca")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
IGNORE_INDEX = -100
_SIGNATURES = (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"),
               ("prompt", "prompt_completion"), ("text", "text"))


class ChatError(ValueError):
    """A record or template that cannot be turned into a training example; the message names the fix."""


def detect_format(record: dict, where: str) -> str:
    """The format a record's fields say it is (``auto``)."""
    for field, fmt in _SIGNATURES:
        if field in record:
            return fmt
    raise ChatError(f"{where}: fields {sorted(record)} match no data format (messages, conversations, "
                    "instruction/output, prompt/completion, text); set data.format or convert the data")


def to_messages(record: dict, fmt: str, where: str) -> list[dict]:
    """The record as a list of {role, content} messages (messages, sharegpt, alpaca), validated."""
    if fmt == "alpaca":
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    else:
        key, role_key, text_key = ("messages", "role", "content") if fmt == "messages" else \
            ("conversations", "from", "value")
        turns = record.get(key)
        if not isinstance(turns, list) or not turns:
            raise ChatError(f"{where}: '{key}' must be a non-empty list of turns")
        messages = []
        for i, turn in enumerate(turns, start=1):
            if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
                raise ChatError(f"{where}: turn {i} must be an object with '{role_key}' and '{text_key}'")
            role = turn[role_key] if fmt == "messages" else SHAREGPT_ROLES.get(turn[role_key], turn[role_key])
            messages.append({"role": role, "content": turn[text_key]})
    check_messages(messages, where)
    return messages


def check_messages(messages: list[dict], where: str) -> None:
    """Known roles, text content, no empty assistant turn, at least one assistant turn."""
    for i, m in enumerate(messages, start=1):
        if m["role"] not in ROLES:
            raise ChatError(f"{where}: turn {i} has role {m['role']!r}; use one of {', '.join(ROLES)} (ShareGPT: "
                            "system, human, gpt)")
        if not isinstance(m["content"], str):
            raise ChatError(f"{where}: turn {i} content is a {type(m['content']).__name__}, not text")
        if m["role"] == "assistant" and not m["content"].strip():
            raise ChatError(f"{where}: turn {i} is an empty assistant turn (nothing to learn); remove it")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatError(f"{where}: no assistant turn (nothing to learn)")


def encode_conversation(tokenizer, messages: list[dict], train_on_prompt: bool = False,
                        where: str = "conversation") -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation through the tokenizer's chat template; labels on assistant turns."""
    def render(part: list[dict], generation_prompt: bool) -> list[int]:
        return list(tokenizer.apply_chat_template(part, tokenize=True, add_generation_prompt=generation_prompt,
                                                  return_dict=False))

    ids = render(messages, False)
    labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(ids)
    special = set(tokenizer.all_special_ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or train_on_prompt:
            continue
        # where the answer starts: the end of "history + generation prompt", or earlier where its last token merges
        # with the answer's first (a header ending in a space, under SentencePiece); where it ends: "history +
        # this answer" (the next turn begins with the template's own tokens)
        start = _common_prefix(render(messages[:i], True), ids)
        stop = _common_prefix(render(messages[:i + 1], False), ids)
        if stop <= start:
            raise ChatError(f"{where}: assistant turn {i + 1} renders to no tokens of its own under the chat "
                            "template; check data.chat_template")
        last_special = max((j for j in range(start, stop) if ids[j] in special), default=None)
        end = stop if last_special is None else last_special + 1  # through the end-of-turn token
        labels[start:end] = ids[start:end]
    return ids, labels


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def set_chat_template(tokenizer, template: Optional[str]) -> None:
    """``data.chat_template``: a Jinja file path or the template itself; None keeps the tokenizer's."""
    if template is None:
        return
    if "{%" not in template and "{{" not in template:
        with open(template) as f:
            template = f.read()
    tokenizer.chat_template = template
