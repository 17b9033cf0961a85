"""Scoring rules and their confidence intervals.

As in RULER, an answer counts when it appears in the generated text (case-insensitive, here as a
whole word, so 1234567 is not found in 12345678). Single-answer tasks score 1 or 0 (exact match);
multi-value tasks score the fraction of their answers found (recall).
"""

from __future__ import annotations

import math
import re

import torch

Z_95 = 1.959963984540054  # the 97.5% quantile of the standard normal
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def found(answer: str, text: str) -> bool:
    """Does `answer` appear in `text` as a whole word (no letter or digit on either side)?"""
    pattern = rf"(?<![0-9A-Za-z]){re.escape(answer)}(?![0-9A-Za-z])"
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


def exact_match(text: str, answers: tuple[str, ...]) -> float:
    """1.0 when the one answer is in the text, else 0.0."""
    if len(answers) != 1:
        raise ValueError(f"exact match scores one answer, got {len(answers)}")
    return float(found(answers[0], text))


def recall(text: str, answers: tuple[str, ...]) -> float:
    """The fraction of the answers found in the text."""
    return sum(found(a, text) for a in answers) / len(answers)


def wilson_interval(successes: float, count: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion successes / count."""
    if count < 1:
        raise ValueError("an interval needs at least one trial")
    p = successes / count
    centre = p + z * z / (2 * count)
    spread = z * math.sqrt(p * (1 - p) / count + z * z / (4 * count * count))
    denominator = 1 + z * z / count
    return max((centre - spread) / denominator, 0.0), min((centre + spread) / denominator, 1.0)


def bootstrap_interval(
    scores: list[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean score, with a fixed seed."""
    if not scores:
        raise ValueError("an interval needs at least one score")
    values = torch.tensor(scores, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(scores), (resamples, len(scores)), generator=gen)
    means = values[picks].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(low), float(high)


def paired_difference(
    scores: list[float],
    reference: list[float],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float, float]:
    """mean(scores) - mean(reference) over the same prompts, with a paired percentile-bootstrap
    95% interval: the bootstrap of the per-prompt differences, so a drawn prompt brings both."""
    if len(scores) != len(reference) or not scores:
        raise ValueError("a paired difference needs the same, non-empty list of prompts")
    diffs = [a - b for a, b in zip(scores, reference, strict=True)]
    return sum(diffs) / len(diffs), *bootstrap_interval(diffs, resamples, seed)


def interval(scoring: str, scores: list[float]) -> tuple[float, float]:
    """Wilson for exact-match scores (0/1), the bootstrap for recall scores."""
    if scoring == "exact":
        return wilson_interval(sum(scores), len(scores))
    return bootstrap_interval(scores)
