"""Variable tracking, after RULER (arXiv 2404.06654, section 3.2): multi-hop tracing of assignments.

A chain starts with "VAR ABCDE = 12345." and continues "VAR FGHIJ = VAR ABCDE." for `hops` more
statements, spread through the haystack in order. Asked for every variable that holds the value,
the model must follow the whole chain; other chains (with other values) are distractors.
"""

from __future__ import annotations

import itertools
import random
import string

from keyspace.tasks.prompt import PromptRequest, TaskPrompt, in_haystack

HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"


def variable_names(count: int, rng: random.Random) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    return names


def chain(names: list[str], value: str) -> list[str]:
    first = f" VAR {names[0]} = {value}."
    return [first] + [f" VAR {b} = VAR {a}." for a, b in itertools.pairwise(names)]


def question(value: str, count: int) -> str:
    return (
        f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
        f"Answer: According to the chain(s) of variable assignment in the text above, {count} "
        f"variables are assigned the value {value}, they are:"
    )


def variable_tracking(request: PromptRequest, hops: int = 4, chains: int = 1) -> TaskPrompt:
    """`chains` chains of hops + 1 variables; the first chain's variables are the answers."""
    rng, size = request.rng, hops + 1
    names = variable_names(chains * size, rng)
    values = [str(v) for v in rng.sample(range(10_000, 100_000), chains)]
    pieces = []
    for c in range(chains):
        statements = chain(names[c * size : (c + 1) * size], values[c])
        pieces += zip(sorted(rng.random() for _ in statements), statements, strict=True)
    ids = in_haystack(request, HEAD, pieces, question(values[0], size))
    return request.prompt(ids, names[:size], pieces[0][0])
