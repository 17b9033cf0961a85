"""Aggregation, after RULER (arXiv 2404.06654, section 3.3): the answer depends on the whole context.

- cwe (common-words extraction): a numbered list of words; `common` words appear `common_freq`
  times each, the others `uncommon_freq` times. Asked for the most common words.
- fwe (frequent-words extraction): "coded" words drawn from a Zipf law (p(rank) ~ rank^-alpha).
  Asked for the three most frequent.
Neither uses a haystack: the list is the context. Its last few places are padded to the exact length.
"""

from __future__ import annotations

import collections
import random

from keyspace.tasks.prompt import PromptRequest, TaskPrompt, padded, too_short
from keyspace.tasks.words import WORDS

CWE_HEAD = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
FWE_HEAD = (
    "Read the following coded text and track the frequency of each coded word. Find the three "
    "most frequently appeared coded words.\n"
)
MAX_COMMON_FREQ = 30  # RULER's frequency for common words; shorter prompts use fewer repeats
CONSONANTS, VOWELS = "bcdfghjklmnprstvz", "aeiou"


def cwe_question(common: int) -> str:
    return (
        f"\nQuestion: What are the {common} most common words in the above list? Answer: The top "
        f"{common} words that appear most often in the list are:"
    )


def fwe_question() -> str:
    return (
        "\nQuestion: What are the three most frequently appeared words in the above coded text? "
        "Answer: According to the coded text above, the three most frequently appeared words are:"
    )


def piece_ids(request: PromptRequest, texts: list[str]) -> list[list[int]]:
    return request.tokenizer(texts, add_special_tokens=False).input_ids


def word_pieces(request: PromptRequest, words: list[str]) -> dict[str, list[int]]:
    """Each word's ids as it appears in a list, after a space."""
    return dict(zip(words, piece_ids(request, [f" {w}" for w in words]), strict=True))


class NumberedList:
    """Entries " 1. word 2. word ..." whose token count is known before they are shuffled.

    Numbers and words are tokenized as separate pieces, so the total is the sum of the first n
    numbers' costs and the words' costs, whatever order the words end up in.
    """

    def __init__(self, request: PromptRequest, words: list[str], room: int):
        self.room, self.entries, self.used = room, [], 0
        self.numbers = piece_ids(request, [f" {i}." for i in range(1, room // 2 + 2)])
        self.word_ids = word_pieces(request, words)

    def add(self, words: list[str]) -> bool:
        """Append `words` if they fit in the room left; say whether they did."""
        start = len(self.entries)
        extra = sum(len(self.word_ids[w]) for w in words)
        extra += sum(len(n) for n in self.numbers[start : start + len(words)])
        if self.used + extra > self.room or start + len(words) >= len(self.numbers):
            return False
        self.entries += words
        self.used += extra
        return True

    def ids(self, rng: random.Random) -> list[int]:
        order = self.entries[:]
        rng.shuffle(order)
        return [t for i, w in enumerate(order) for t in self.numbers[i] + self.word_ids[w]]


def common_freq_for(request: PromptRequest, words: list[str], room: int, common: int) -> int:
    """Repeats of each common word: about half of the list's entries, at most MAX_COMMON_FREQ."""
    sample = piece_ids(
        request, [f" {w}" for w in words[:100]] + [f" {i}." for i in range(100, 200)]
    )
    entry_cost = 2 * sum(len(p) for p in sample) / len(sample)
    return max(min(int(room / entry_cost) // (2 * common), MAX_COMMON_FREQ), 1)


def common_words(request: PromptRequest, common: int = 10, uncommon_freq: int = 3) -> TaskPrompt:
    """A shuffled numbered list; answers: the `common` words repeated more than any other."""
    head, question = request.ids(CWE_HEAD), request.ids(cwe_question(common))
    room = request.prompt_tokens - len(head) - len(question)
    words = request.rng.sample(WORDS, len(WORDS))
    top, rest = words[:common], words[common:]
    freq = common_freq_for(request, words, room, common)
    listing = NumberedList(request, words, room)
    if freq <= uncommon_freq or not listing.add(top * freq):
        raise too_short(request, len(head) + len(question) + common * (uncommon_freq + 1))
    added = 0
    for copies in (uncommon_freq, 1):  # blocks of uncommon_freq, then single entries to the brim
        while listing.add([rest[added % len(rest)]] * copies):
            added += 1
    most = collections.Counter(listing.entries[common * freq :]).most_common(1)
    if most and most[0][1] >= freq:
        raise ValueError(f"cwe: {request.prompt_tokens} tokens need more than {len(WORDS)} words")
    body = listing.ids(request.rng)
    return request.prompt(padded(request, head, body, question), top, None)


def coded_words(count: int, rng: random.Random) -> list[str]:
    """`count` distinct pronounceable non-words (consonant-vowel, five letters)."""
    found: list[str] = []
    while len(found) < count:
        word = "".join(rng.choice(CONSONANTS if i % 2 == 0 else VOWELS) for i in range(5))
        if word not in found:
            found.append(word)
    return found


def zipf_stream(request: PromptRequest, pieces: dict[str, list[int]], alpha: float, room: int):
    """Words (keys of `pieces`, in rank order) drawn with p(rank r) ~ r^-alpha, while they fit in `room`."""
    words = list(pieces)
    weights = [rank**-alpha for rank in range(1, len(words) + 1)]
    stream, used = [], 0
    while True:
        word = request.rng.choices(words, weights)[0]
        if used + len(pieces[word]) > room:
            return stream
        stream.append(word)
        used += len(pieces[word])


def frequent_words(
    request: PromptRequest,
    vocabulary: int = 100,
    alpha: float = 2.0,
    top: int = 3,
    tries: int = 100,
) -> TaskPrompt:
    """Coded text from a Zipf law; answers: the `top` most frequent words (redrawn until unambiguous)."""
    head, question = request.ids(FWE_HEAD), request.ids(fwe_question())
    room = request.prompt_tokens - len(head) - len(question)
    for _ in range(tries):
        pieces = word_pieces(request, coded_words(vocabulary, request.rng))
        stream = zipf_stream(request, pieces, alpha, room)
        ranked = collections.Counter(stream).most_common(top + 1)
        if len(ranked) > top and ranked[top - 1][1] > ranked[top][1]:
            body = [t for w in stream for t in pieces[w]]
            return request.prompt(
                padded(request, head, body, question), [w for w, _ in ranked[:top]], None
            )
    raise too_short(request, len(head) + len(question))
