"""Sample answers during evaluation (``train.sample_prompts``): what the model says, not only a loss.

The first N eval records become prompts — a conversation without its last assistant turn rendered with the chat
template's generation prompt, an Alpaca prompt, a prompt/completion's prompt — and are answered greedily. Every rank
generates (ZeRO-3 and tensor-parallel forwards are collective); rank 0 logs.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from .chat import to_messages
from .data import format_prompt


def prompt_of(record: dict, fmt: str, tokenizer) -> Optional[str]:
    """The text a record asks the model to continue, or None (plain text has no prompt)."""
    if fmt in ("messages", "sharegpt") or (fmt == "alpaca" and tokenizer.chat_template):
        messages = to_messages(record, fmt, "sample prompt")
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
    if fmt == "alpaca":
        return format_prompt(record["instruction"], record.get("input") or "")
    if fmt == "prompt_completion":
        return record["prompt"]
    return None


class _StopCheck(StoppingCriteria):
    """Asks the run's stop request at every generated token (collective: every rank generates the same tokens)."""

    def __init__(self, check_stop: Callable[[], None]) -> None:
        self.check_stop = check_stop

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.check_stop()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def answer(model: nn.Module, tokenizer, prompts: list[str], device: torch.device, max_new_tokens: int,
           max_prompt_tokens: int, check_stop: Optional[Callable[[], None]] = None) -> list[str]:
    """Greedy answers, one prompt at a time (no padding to reason about); the model's mode is restored. A prompt
    longer than ``max_prompt_tokens`` keeps its last tokens (where the generation prompt is); ``check_stop`` is asked
    at every token (a preemption raises there)."""
    was_training = model.training
    model.eval()
    answers = []
    stopping = StoppingCriteriaList([_StopCheck(check_stop)] if check_stop is not None else [])
    try:
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=not tokenizer.chat_template)
            ids = {k: v[:, -max_prompt_tokens:].to(device) for k, v in ids.items()}
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, stopping_criteria=stopping)
            answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return answers
