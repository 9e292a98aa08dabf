"""Multiple-choice evaluation by log-likelihood, under the rule lm-evaluation-harness's ``multiple_choice`` tasks use
(metric ``acc``), so that kasa_ds's score of a model and lm-eval's score of its export on the same items agree.

An item is ``{"context": str, "choices": [str, ...], "label": int}``. Each choice is scored by the summed
log-probability of its tokens after the context, tokenized as lm-eval's Hugging Face model does: the continuation is
``delimiter + choice`` (lm-eval's ``target_delimiter``), trailing whitespace of the context moves to the
continuation, the continuation's tokens are those of ``context + continuation`` past the context's own, and no
special tokens are added. The prediction is the best-scoring choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval's HFLM splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    head = tokenizer(context, add_special_tokens=False).input_ids
    return head, whole[len(head):]


@torch.no_grad()
def choice_loglikelihoods(model, tokenizer, item: dict, delimiter: str = " ") -> list[float]:
    """The summed log-probability of each choice's tokens given the item's context (one forward per choice)."""
    device = next(model.parameters()).device
    scores = []
    for choice in item["choices"]:
        context, continuation = encode_pair(tokenizer, item["context"], delimiter + choice)
        ids = torch.tensor([context + continuation], device=device)
        logits = model(input_ids=ids[:, :-1]).logits.float()
        logprobs = F.log_softmax(logits[0, len(context) - 1:], dim=-1)
        scores.append(logprobs.gather(-1, ids[0, len(context):, None]).sum().item())
    return scores


def choice_accuracy(model, tokenizer, items: list[dict], delimiter: str = " ") -> dict:
    """{"acc": fraction of items whose best-scoring choice is the label, "loglikelihoods": per item, per choice}."""
    was_training = model.training
    model.eval()
    scores = [choice_loglikelihoods(model, tokenizer, item, delimiter) for item in items]
    model.train(was_training)
    correct = sum(max(range(len(s)), key=s.__getitem__) == item["label"] for s, item in zip(scores, items))
    return {"acc": correct / len(items), "loglikelihoods": scores}
