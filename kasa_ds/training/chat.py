"""Conversational and plain-text records for causal-LM training: formats, chat templates, assistant-only labels.

Formats (``data.format``), one per file; ``auto`` decides from the first record's fields and says what it chose:
    messages            {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...],
                         "tools": [...]?}  (OpenAI: an assistant turn may carry "tool_calls" and "weight": 0 | 1)
    sharegpt            {"conversations": [{"from": "system" | "human" | "gpt" | "function_call" | "observation",
                         "value": str}, ...], "tools": [...]?}
    alpaca              {"instruction": str, "input": str?, "output": str}: a user/assistant conversation when a
                        chat template exists, else kasa_ds's Alpaca prompt (kasa_ds.training.data)
    prompt_completion   {"prompt": str, "completion": str}: loss on the completion and EOS
    text                {"text": str}: loss on every token and EOS
A conversation is rendered with the tokenizer's chat template (or ``data.chat_template``). Each assistant turn — its
content and the template's end-of-turn token — carries labels; system and user turns and the template's headers
(its generation prompt included) are ``IGNORE_INDEX``, unless ``data.train_on_prompt``. The spans are found by
rendering prefixes: the tokens between "history + generation prompt" and "history + this answer" are the answer
(a boundary token the tokenizer merged across the two belongs to the answer).

Tools, as TRL passes them: a record's ``tools`` go to the chat template, an assistant turn's ``tool_calls`` are part of
that turn (labelled like its content), ``tool`` turns are context (not labelled). A template that does not render a
turn's tool calls or a tool turn's content would drop them from training silently: that is refused, naming the turn.
OpenAI's per-message ``"weight": 0`` leaves that assistant turn unlabelled (``1``, or no weight: labelled).
"""

from __future__ import annotations

from typing import Optional

FORMATS = ("auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text")
CONVERSATIONAL = ("messages", "sharegpt", "alpaca")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}
#: message fields passed on to the chat template besides role and content (OpenAI's tool calling)
PASSED_FIELDS = ("tool_calls", "tool_call_id", "name")
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
        messages = [_turn(turn, i, fmt, role_key, text_key, where) for i, turn in enumerate(turns, start=1)]
    check_messages(messages, where)
    return messages


def _turn(turn, i: int, fmt: str, role_key: str, text_key: str, where: str) -> dict:
    """One turn as a message: role, content (None: "" when the turn calls tools), tool fields, weight."""
    if not isinstance(turn, dict) or role_key not in turn or (text_key not in turn and "tool_calls" not in turn):
        raise ChatError(f"{where}: turn {i} must be an object with '{role_key}' and '{text_key}'")
    role = turn[role_key] if fmt == "messages" else SHAREGPT_ROLES.get(turn[role_key], turn[role_key])
    content = turn.get(text_key)
    message = {"role": role, "content": "" if content is None and turn.get("tool_calls") else content}
    message.update({k: turn[k] for k in PASSED_FIELDS if k in turn})
    if "weight" in turn:
        if turn["weight"] not in (0, 1) or role != "assistant":
            raise ChatError(f"{where}: turn {i} has weight {turn['weight']!r}; OpenAI's weight is 0 or 1, on assistant "
                            "turns only")
        message["weight"] = turn["weight"]
    return message


def check_messages(messages: list[dict], where: str) -> None:
    """Known roles, text content, no empty assistant turn (one calling tools is not empty), tool calls as a list,
    at least one trained assistant turn."""
    for i, m in enumerate(messages, start=1):
        if m["role"] not in ROLES:
            raise ChatError(f"{where}: turn {i} has role {m['role']!r}; use one of {', '.join(ROLES)} (ShareGPT: "
                            "system, human, gpt, function_call, observation)")
        if not isinstance(m["content"], str):
            raise ChatError(f"{where}: turn {i} content is a {type(m['content']).__name__}, not text")
        if "tool_calls" in m and (m["role"] != "assistant" or not isinstance(m["tool_calls"], list)):
            raise ChatError(f"{where}: turn {i}: tool_calls must be a list, on an assistant turn")
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise ChatError(f"{where}: turn {i} is an empty assistant turn (no content, no tool calls: nothing to "
                            "learn); remove it or give it content")
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in messages):
        raise ChatError(f"{where}: no assistant turn to train on (none, or every one has weight 0)")


def encode_conversation(tokenizer, messages: list[dict], train_on_prompt: bool = False,
                        where: str = "conversation", tools: Optional[list] = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation through the tokenizer's chat template (``tools``: the record's tool
    schemas); labels on assistant turns (their tool calls included) whose weight is not 0."""
    messages = [{k: v for k, v in m.items() if k != "weight"} | {"_weight": m.get("weight", 1)} for m in messages]

    def render(part: list[dict], generation_prompt: bool, tokenize: bool = True):
        part = [{k: v for k, v in m.items() if k != "_weight"} for m in part]
        out = tokenizer.apply_chat_template(part, tools=tools, tokenize=tokenize,
                                            add_generation_prompt=generation_prompt, return_dict=False)
        return list(out) if tokenize else out

    check_rendered(render(messages, False, tokenize=False), messages, where)
    ids = render(messages, False)
    labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(ids)
    special = set(tokenizer.all_special_ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or train_on_prompt or not m["_weight"]:
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


def check_rendered(text: str, messages: list[dict], where: str) -> None:
    """Refuse a template that drops what would be trained or read: a tool call's name and arguments, a tool turn's
    content (a template without tool support renders the rest and silently leaves them out)."""
    for i, m in enumerate(messages, start=1):
        for call in m.get("tool_calls") or []:
            function = call.get("function", call) if isinstance(call, dict) else {}
            name = function.get("name")
            if not isinstance(name, str) or name not in text:
                raise ChatError(f"{where}: turn {i}: the chat template does not render its tool call "
                                f"{name!r}: it would be dropped from training. Set data.chat_template to a template "
                                "that renders tool_calls (e.g. the model family's tool-use template)")
        if m["role"] == "tool" and m["content"].strip() and m["content"].strip() not in text:
            raise ChatError(f"{where}: turn {i}: the chat template does not render tool turns: the tool result would "
                            "be dropped. Set data.chat_template to a template with a tool role")


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
