"""A task prompt, the request that builds one, and the assembly of head + haystack + needles + question.

Prompts are built in token space: `prompt_tokens = length - answer_tokens`, so the prompt plus its
generated answer fill `length` exactly, whatever the tokenizer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from keyspace.tasks.haystack import Haystack, ids_of, insert


@dataclass
class TaskPrompt:
    """ids: (1, length - answer_tokens) token ids; answers: the strings scored in the output.

    depth: where the (first) asked needle sits in the haystack, 0 = start, 1 = end; None for tasks
    without one (cwe, fwe).
    """

    task: str
    ids: torch.Tensor
    answers: tuple[str, ...]
    depth: float | None = None

    def __post_init__(self) -> None:
        if self.ids.dim() != 2 or self.ids.shape[0] != 1:
            raise ValueError(f"ids must be (1, tokens), got {tuple(self.ids.shape)}")
        if not self.answers or not all(self.answers):
            raise ValueError("a prompt needs at least one non-empty answer")


@dataclass
class PromptRequest:
    """What one prompt's builder gets: the tokenizer, its exact size, its needle depth and its rng."""

    task: str
    tokenizer: object
    prompt_tokens: int
    depth: float
    rng: random.Random
    haystack: Haystack | None  # None for tasks that build their own context (cwe, fwe)

    def ids(self, text: str) -> list[int]:
        return ids_of(self.tokenizer, text)

    def prompt(self, ids: list[int], answers, depth: float | None) -> TaskPrompt:
        if len(ids) != self.prompt_tokens:
            raise AssertionError(f"built {len(ids)} tokens, not {self.prompt_tokens}")
        return TaskPrompt(self.task, torch.tensor([ids], dtype=torch.long), tuple(answers), depth)


def too_short(request: PromptRequest, fixed: int) -> ValueError:
    return ValueError(
        f"{request.task}: {request.prompt_tokens} prompt tokens cannot hold its {fixed} fixed tokens; "
        "use a longer length"
    )


def in_haystack(
    request: PromptRequest, head: str, pieces: list[tuple[float, str]], question: str
) -> list[int]:
    """head + haystack (with each (depth, text) piece at a sentence start) + question, exactly sized."""
    head_ids, question_ids = request.ids(head), request.ids(question)
    piece_ids = [(depth, request.ids(text)) for depth, text in pieces]
    fixed = len(head_ids) + len(question_ids) + sum(len(p) for _, p in piece_ids)
    budget = request.prompt_tokens - fixed
    if budget < 1:
        raise too_short(request, fixed)
    body = insert(request.haystack, request.haystack.take(budget, request.rng), piece_ids)
    return head_ids + body + question_ids


def pad_token(tokenizer) -> int:
    """A harmless token to fill the last few places of a list-shaped prompt: a newline where it exists."""
    for text in ("\n", " .", "."):
        ids = ids_of(tokenizer, text)
        if ids:
            return ids[-1]
    raise ValueError("the tokenizer has no token for a newline or a full stop")


def padded(
    request: PromptRequest, head: list[int], body: list[int], question: list[int]
) -> list[int]:
    """head + body + pad + question, padded to exactly prompt_tokens."""
    missing = request.prompt_tokens - len(head) - len(body) - len(question)
    if missing < 0:
        raise too_short(request, len(head) + len(question))
    return head + body + [pad_token(request.tokenizer)] * missing + question
