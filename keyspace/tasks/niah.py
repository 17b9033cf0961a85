"""Needle-in-a-haystack retrieval, after RULER (Hsieh et al. 2024, arXiv 2404.06654, section 3.1).

A needle says "One of the special magic numbers for <key> is: <value>." Keys are word pairs; values
are 7-digit numbers, words or UUIDs. The four forms differ in how many needles there are and what is
asked:
- niah:    one needle, asked;
- mk-niah: several needles with different keys, one asked (the others are distractors);
- mv-niah: several values under one key, all asked;
- mq-niah: several keys, all asked.
The first asked needle sits at the request's depth; the other needles at random depths.
"""

from __future__ import annotations

import random
import uuid

from keyspace.tasks.prompt import PromptRequest, TaskPrompt, in_haystack
from keyspace.tasks.words import WORDS

NOUNS = {"number": "number", "word": "word", "uuid": "UUID"}


def value_of(kind: str, rng: random.Random, words: list[str]) -> str:
    """A fresh needle value; word values are popped from `words` so they never repeat a key's word."""
    if kind == "number":
        return str(rng.randrange(1_000_000, 10_000_000))
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "word":
        return words.pop()
    raise ValueError(f"unknown needle value kind {kind!r}; known: {', '.join(NOUNS)}")


def distinct_values(kind: str, count: int, rng: random.Random, words: list[str]) -> list[str]:
    values: list[str] = []
    while len(values) < count:
        value = value_of(kind, rng, words)
        if value not in values:
            values.append(value)
    return values


def head(noun: str) -> str:
    return (
        f"Some special magic {noun}s are hidden within the following text. Make sure to memorize "
        f"them. I will quiz you about the {noun}s afterwards.\n"
    )


def needle(noun: str, key: str, value: str) -> str:
    return f" One of the special magic {noun}s for {key} is: {value}."


def listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def question(noun: str, keys: list[str], plural: bool) -> str:
    """The question and the start of the answer, which the model completes with the value(s)."""
    about = f"for {listed(keys)} mentioned in the provided text"
    if not plural:
        return f"\nWhat is the special magic {noun} {about}? The special magic {noun} {about} is"
    return (
        f"\nWhat are all the special magic {noun}s {about}? The special magic {noun}s {about} are"
    )


def niah(
    request: PromptRequest,
    kind: str = "number",
    keys: int = 1,
    values_per_key: int = 1,
    asked: int = 1,
) -> TaskPrompt:
    """`keys` keys with `values_per_key` needles each; the values of the first `asked` keys are the answers."""
    rng, noun = request.rng, NOUNS[kind]
    words = rng.sample(WORDS, 2 * keys + keys * values_per_key)
    names = [f"{words.pop()}-{words.pop()}" for _ in range(keys)]
    values = distinct_values(kind, keys * values_per_key, rng, words)
    needles = [
        (name, values[i * values_per_key + j])
        for i, name in enumerate(names)
        for j in range(values_per_key)
    ]
    depths = [request.depth] + [rng.random() for _ in needles[1:]]
    pieces = [
        (depth, needle(noun, name, value))
        for depth, (name, value) in zip(depths, needles, strict=True)
    ]
    ids = in_haystack(
        request, head(noun), pieces, question(noun, names[:asked], values_per_key * asked > 1)
    )
    answers = [value for name, value in needles if name in names[:asked]]
    return request.prompt(ids, answers, request.depth)
