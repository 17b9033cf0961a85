"""The task registry and the prompt generator: `TASKS[name]` and `make_prompts(name, ...)`.

Definitions follow RULER (Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context
Language Models?", arXiv 2404.06654); the code is keyspace's own. docs/notes/tasks-calibration.md
says which tasks SmolLM2-135M can do, and so which are in DEFAULT_TASKS.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass

from keyspace.errors import KeyspaceError
from keyspace.tasks.aggregation import common_words, frequent_words
from keyspace.tasks.haystack import Haystack, load_haystack
from keyspace.tasks.niah import niah
from keyspace.tasks.prompt import PromptRequest, TaskPrompt
from keyspace.tasks.scoring import exact_match, recall
from keyspace.tasks.tracking import variable_tracking

Scorer = Callable[[str, tuple[str, ...]], float]
SCORERS: dict[str, Scorer] = {"exact": exact_match, "recall": recall}


@dataclass(frozen=True)
class TaskSpec:
    """One task: how to build a prompt, how to score an answer, and how many tokens to generate.

    generator:     PromptRequest -> TaskPrompt (one prompt)
    scoring:       "exact" (one answer, 1 or 0) or "recall" (fraction of the answers found)
    answer_tokens: tokens generated for the answer; the prompt is `length - answer_tokens` long
    uses_haystack: needles in a haystack (filler or real text), or a self-contained list
    """

    name: str
    generator: Callable[[PromptRequest], TaskPrompt]
    scoring: str
    answer_tokens: int
    uses_haystack: bool
    summary: str

    def __post_init__(self) -> None:
        if self.scoring not in SCORERS:
            raise ValueError(f"scoring must be one of {sorted(SCORERS)}, got {self.scoring!r}")
        if self.answer_tokens < 1:
            raise ValueError("answer_tokens must be at least 1")

    @property
    def scorer(self) -> Scorer:
        return SCORERS[self.scoring]


def _spec(name, generator, scoring, answer_tokens, summary, uses_haystack=True) -> TaskSpec:
    return TaskSpec(name, generator, scoring, answer_tokens, uses_haystack, summary)


TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        _spec("niah", niah, "exact", 12, "one needle, a 7-digit number"),
        _spec("niah-word", functools.partial(niah, kind="word"), "exact", 8, "one needle, a word"),
        _spec("niah-uuid", functools.partial(niah, kind="uuid"), "exact", 40, "one needle, a UUID"),
        _spec("mk-niah", functools.partial(niah, keys=4), "exact", 12, "4 keys, 1 asked"),
        _spec(
            "mv-niah", functools.partial(niah, values_per_key=4), "recall", 48, "4 values of 1 key"
        ),
        _spec("mq-niah", functools.partial(niah, keys=4, asked=4), "recall", 48, "4 keys asked"),
        _spec("vt", variable_tracking, "recall", 32, "1 chain of 4 hops: name all 5 variables"),
        _spec("cwe", common_words, "recall", 48, "10 most common words of a list", False),
        _spec("fwe", frequent_words, "recall", 16, "3 most frequent coded words", False),
    )
}
# The tasks SmolLM2-135M does with full attention, >= 0.6 at 2048 tokens; mk-niah (0.5 at 1024),
# mq-niah (0.45 at 2048), vt, cwe and fwe are below (docs/notes/tasks-calibration.md).
DEFAULT_TASKS: tuple[str, ...] = ("niah", "niah-word", "niah-uuid", "mv-niah")


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise KeyspaceError(f"unknown task {name!r}.", f"Known tasks: {', '.join(TASKS)}.")
    return TASKS[name]


def make_prompts(
    task: str,
    tokenizer,
    length: int,
    count: int,
    seed: int = 0,
    haystack: str | Haystack = "filler",
) -> list[TaskPrompt]:
    """`count` prompts of `length - answer_tokens` tokens; needle depths spread evenly over (0, 1).

    Prompt i is a function of (task, length, seed, count, i) alone, so prompts are the same across
    runs and machines. `haystack`: "filler", "wikitext", "pydoc", a .txt path, or a loaded one.
    """
    spec = task_spec(task)
    if count < 1:
        raise ValueError("count must be at least 1")
    source = load_haystack(haystack, tokenizer) if spec.uses_haystack else None
    prompts = []
    for i in range(count):
        rng = random.Random(f"{task}/{length}/{seed}/{i}")
        request = PromptRequest(
            task, tokenizer, length - spec.answer_tokens, (i + 0.5) / count, rng, source
        )
        prompts.append(spec.generator(request))
    return prompts
