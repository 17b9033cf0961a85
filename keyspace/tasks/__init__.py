"""RULER-style long-context tasks, generated offline in token space to an exact length.

- `TASKS`: name -> TaskSpec (generator, scorer, answer_tokens); `DEFAULT_TASKS`: the ones
  SmolLM2-135M can do densely (docs/notes/tasks-calibration.md).
- `make_prompts(task, tokenizer, length, count, seed, haystack)`: seeded prompts.
- `run_tasks(model, tokenizer, variants, tasks, lengths, count, seed, haystack, log)`: accuracy rows.
- `cache_decoder`, `masked_decoder`: decoders for dense/Loki decoding and for masked-mode baselines.
"""

from keyspace.tasks.decoders import Decoder, cache_decoder, masked_decoder
from keyspace.tasks.haystack import FILLER, HAYSTACKS, Haystack, load_haystack
from keyspace.tasks.prompt import TaskPrompt
from keyspace.tasks.run import run_tasks
from keyspace.tasks.scoring import bootstrap_interval, exact_match, recall, wilson_interval
from keyspace.tasks.suite import DEFAULT_TASKS, TASKS, TaskSpec, make_prompts

__all__ = [
    "DEFAULT_TASKS",
    "FILLER",
    "HAYSTACKS",
    "TASKS",
    "Decoder",
    "Haystack",
    "TaskPrompt",
    "TaskSpec",
    "bootstrap_interval",
    "cache_decoder",
    "exact_match",
    "load_haystack",
    "make_prompts",
    "masked_decoder",
    "recall",
    "run_tasks",
    "wilson_interval",
]
