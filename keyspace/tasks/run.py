"""Run tasks for several decoding variants: one row per (method, d, k, task, length).

variants = {("full", None, None): cache_decoder(), ("exact-topk", None, 0.125): masked_decoder(...)}
rows = run_tasks(model, tokenizer, variants, ["niah", "vt"], [2048, 4096], count=50, batch=8)

A variant key may carry a fourth element, the basis (validate's `--basis`); rows then have it too.
Each row keeps its per-prompt `scores` (prompt order), and, when the variants include `full`, its
paired difference against full with a 95% interval (`vs_full`, `vs_full_low`, `vs_full_high`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence

import torch

from keyspace.tasks.decoders import Decoder
from keyspace.tasks.haystack import Haystack, load_haystack
from keyspace.tasks.prompt import TaskPrompt
from keyspace.tasks.scoring import interval, paired_difference
from keyspace.tasks.suite import DEFAULT_TASKS, TaskSpec, make_prompts, task_spec

VariantKey = tuple[Hashable, ...]  # (method, d, k) or (method, d, k, basis)


def score_prompts(
    model,
    tokenizer,
    decoder: Decoder,
    spec: TaskSpec,
    prompts: list[TaskPrompt],
    batch: int = 1,
) -> list[float]:
    """Each prompt's score: the decoder's answer, decoded to text, against the expected answers.
    Prompts decode `batch` at a time (a cell's prompts have one length, so they stack)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    scores = []
    for start in range(0, len(prompts), batch):
        group = prompts[start : start + batch]
        tokens = decoder(model, torch.cat([p.ids for p in group]), spec.answer_tokens)
        for prompt, row in zip(group, tokens, strict=True):
            text = tokenizer.decode(row.tolist(), skip_special_tokens=True)
            scores.append(spec.scorer(text, prompt.answers))
    return scores


def result_row(key: VariantKey, spec: TaskSpec, length: int, scores: list[float]) -> dict:
    method, d, k, *basis = key
    low, high = interval(spec.scoring, scores)
    return {
        "method": method,
        "d": d,
        "k": k,
        **({"basis": basis[0]} if basis else {}),
        "task": spec.name,
        "length": length,
        "accuracy": sum(scores) / len(scores),
        "ci_low": low,
        "ci_high": high,
        "count": len(scores),
        "scoring": spec.scoring,
        "scores": scores,
    }


def add_paired_differences(rows: list[dict]) -> None:
    """Give each non-full row of one cell its paired difference against the cell's `full` row
    (`vs_full`, `vs_full_low`, `vs_full_high`): every variant answered the same prompts."""
    full = next((r for r in rows if r["method"] == "full"), None)
    if full is None:
        return
    for row in rows:
        if row is not full:
            diff, low, high = paired_difference(row["scores"], full["scores"])
            row.update(vs_full=diff, vs_full_low=low, vs_full_high=high)


def run_tasks(
    model,
    tokenizer,
    variants: dict[VariantKey, Decoder],
    tasks: Sequence[str] = DEFAULT_TASKS,
    lengths: Sequence[int] = (4096,),
    count: int = 10,
    seed: int = 0,
    haystack: str | Haystack = "filler",
    log: Callable[[str], None] | None = None,
    batch: int = 1,
) -> list[dict]:
    """Accuracy with a 95% interval (Wilson for exact match, bootstrap for recall) per variant, task
    and length. Every variant answers the same prompts, `batch` of them per decoder call."""
    specs = [task_spec(t) for t in tasks]
    source = load_haystack(haystack, tokenizer) if any(s.uses_haystack for s in specs) else None
    rows = []
    for spec in specs:
        for length in lengths:
            prompts = make_prompts(spec.name, tokenizer, length, count, seed, source or haystack)
            cell = []
            for key, decoder in variants.items():
                start = time.perf_counter()
                scores = score_prompts(model, tokenizer, decoder, spec, prompts, batch)
                cell.append(result_row(key, spec, length, scores))
                if log is not None:
                    log(
                        f"{spec.name} @ {length}: {key} accuracy {cell[-1]['accuracy']:.3f} "
                        f"({len(prompts)} prompts, {time.perf_counter() - start:.1f} s)"
                    )
            add_paired_differences(cell)
            rows.extend(cell)
    return rows
