"""Synthetic passkey retrieval: a random 5-digit key hidden at some depth in filler text, asked for at the end.

Works offline (no data set). The prompt is built in token space so its length is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from keyspace.loki.decode import greedy, loki_decoding
from keyspace.models.placement import input_device
from keyspace.tasks.haystack import FILLER

INTRO = "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
ANSWER_TOKENS = 8


@dataclass
class PasskeyPrompt:
    """ids: (1, length - ANSWER_TOKENS) token ids; the key sits at `depth` (0 = start, 1 = end) of the filler."""

    ids: torch.Tensor
    key: str
    depth: float

    def __post_init__(self) -> None:
        if len(self.key) != 5 or not self.key.isdigit():
            raise ValueError("the passkey is 5 digits")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> PasskeyPrompt:
    """A prompt of length - ANSWER_TOKENS tokens, so the answer fits inside `length`."""
    head, needle, question = (
        _ids(tokenizer, INTRO),
        _ids(tokenizer, NEEDLE.format(key=key)),
        _ids(tokenizer, QUESTION),
    )
    budget = length - ANSWER_TOKENS - len(head) - len(needle) - len(question)
    if budget < 1:
        raise ValueError(f"passkey length {length} is too short for the prompt")
    filler_unit = _ids(tokenizer, FILLER)
    filler = (filler_unit * (budget // len(filler_unit) + 1))[:budget]
    cut = int(round(depth * budget))
    ids = head + filler[:cut] + needle + filler[cut:] + question
    return PasskeyPrompt(torch.tensor([ids], dtype=torch.long), key, depth)


def passkey_prompts(tokenizer, length: int, count: int, seed: int = 0) -> list[PasskeyPrompt]:
    """`count` prompts with depths spread evenly over (0, 1) and random keys."""
    gen = torch.Generator().manual_seed(seed + length)
    keys = torch.randint(10000, 100000, (count,), generator=gen).tolist()
    return [
        passkey_prompt(tokenizer, length, (i + 0.5) / count, str(k)) for i, k in enumerate(keys)
    ]


def found(tokenizer, tokens: torch.Tensor, key: str) -> bool:
    """Did the generated tokens (n,) spell out the key?"""
    return key in tokenizer.decode(tokens.tolist()).replace(" ", "")


def run_passkey(model, tokenizer, prompts: list[PasskeyPrompt], variants: dict) -> dict[str, int]:
    """Correct answers per variant. variants: name -> make_cache(); None means transformers' DynamicCache.

    Loki variants that share a cache factory's split (same d) could share a prefill; kept separate for clarity.
    """
    device = input_device(model)
    correct = dict.fromkeys(variants, 0)
    for prompt in prompts:
        ids = prompt.ids.to(device)
        for name, make_cache in variants.items():
            if make_cache is None:
                tokens, _ = greedy(model, DynamicCache(), ids, ANSWER_TOKENS)
            else:
                cache = make_cache()
                with loki_decoding(model, cache):
                    tokens, _ = greedy(model, cache, ids, ANSWER_TOKENS)
            correct[name] += int(found(tokenizer, tokens, prompt.key))
    return correct
