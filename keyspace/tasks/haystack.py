"""The text that needles hide in: repeated filler, or real text (WikiText-2, pydoc, a .txt file).

Everything is token ids. A haystack hands out `take(budget, rng)` slices of exactly `budget` ids;
needles are inserted between slice tokens at sentence ends (`insert`), so the prompt length is exact
and real text is never cut mid-word by a needle.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field

from keyspace.collect.corpora import load_corpus
from keyspace.errors import KeyspaceError

# Repeated filler, also the passkey prompt's (keyspace/validate/passkey.py imports it): one sharp
# target in uniform noise.
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
HAYSTACKS = ("filler", "wikitext", "pydoc")


def ids_of(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, without BOS/EOS."""
    return tokenizer(text, add_special_tokens=False).input_ids


@dataclass
class Haystack:
    """ids: the token ids that slices are cut from; `repeat` tiles them (filler) instead of offsetting."""

    ids: list[int]
    source: str
    repeat: bool
    tokenizer: object = field(repr=False)
    _ends: dict[int, bool] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.ids:
            raise KeyspaceError(f"haystack {self.source!r} has no tokens.", "Give it some text.")

    def take(self, budget: int, rng: random.Random) -> list[int]:
        """`budget` ids: the filler tiled from its start, or real text from a random offset."""
        if self.repeat:
            return (self.ids * (budget // len(self.ids) + 1))[:budget]
        if budget > len(self.ids):
            raise KeyspaceError(
                f"haystack {self.source!r} has {len(self.ids)} tokens, fewer than the {budget} asked.",
                "Use a shorter length, a larger corpus, or --haystack filler.",
            )
        start = rng.randrange(len(self.ids) - budget + 1)
        return self.ids[start : start + budget]

    def ends_sentence(self, token: int) -> bool:
        if token not in self._ends:
            text = self.tokenizer.decode([token])
            self._ends[token] = text.rstrip(" ").endswith((".", "!", "?", "\n"))
        return self._ends[token]


def load_haystack(spec: str | Haystack, tokenizer) -> Haystack:
    """`filler`, `wikitext` (test split; a local copy when the hub is unreachable), `pydoc`, or a .txt path."""
    if isinstance(spec, Haystack):
        return spec
    if spec == "filler":
        return Haystack(ids_of(tokenizer, FILLER), "filler", True, tokenizer)
    corpus = load_corpus(spec, "test")
    return Haystack(ids_of(tokenizer, corpus.text), corpus.source, False, tokenizer)


def sentence_starts(haystack: Haystack, ids: list[int]) -> list[int]:
    """Positions in `ids` (0..len) where an insertion lands between sentences; always 0 and len."""
    inner = [i + 1 for i, token in enumerate(ids[:-1]) if haystack.ends_sentence(token)]
    return [0, *inner, len(ids)]


def snap(position: int, allowed: list[int]) -> int:
    """The allowed position (sorted list) nearest to `position`; ties go to the earlier one."""
    at = bisect.bisect_left(allowed, position)
    candidates = allowed[max(at - 1, 0) : at + 1]
    return min(candidates, key=lambda p: (abs(p - position), p))


def insert(haystack: Haystack, ids: list[int], pieces: list[tuple[float, list[int]]]) -> list[int]:
    """Put each (depth, piece ids) into `ids` at the sentence start nearest depth·len(ids).

    Pieces keep their list order where they snap to the same place. Returns len(ids) + the pieces' ids.
    """
    allowed = sentence_starts(haystack, ids)
    placed = sorted(
        (snap(round(depth * len(ids)), allowed), order, piece)
        for order, (depth, piece) in enumerate(pieces)
    )
    out, last = [], 0
    for position, _, piece in placed:
        out += ids[last:position] + piece
        last = position
    return out + ids[last:]
