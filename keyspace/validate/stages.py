"""validate's stages, one per section of validate.json: perplexity, recall vs rank, real decoding,
passkey, and (on CUDA) measured speed.

Each takes the loaded model and the checked `Inputs`, and returns JSON-ready rows.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from keyspace.bench.e2e import decode_speed
from keyspace.bench.kernels import BenchConfig, run_sweep
from keyspace.errors import KeyspaceError
from keyspace.loki import METHODS, LokiCache, SparseSettings
from keyspace.loki.selection import kv_bytes_fraction
from keyspace.store import DEFAULT_THRESHOLD
from keyspace.validate.config import Log, ValidateConfig
from keyspace.validate.evaluate import decode_check, loki_recall, perplexity
from keyspace.validate.grid import DChoice, SweepPoint, ranks_at
from keyspace.validate.inputs import Inputs
from keyspace.validate.passkey import passkey_prompts, run_passkey
from keyspace.validate.results import ResultRow, spearman

# Recall is correlated with each head's rank at this explained-variance threshold.
RECALL_THRESHOLD = DEFAULT_THRESHOLD
SPEED_SEQS = (4096, 16384)  # the model's own long-context shapes plus a longer cache
DECODE_BATCH = 16  # sequences per decode step in the end-to-end timing
DECODE_SEQ = 4096  # prompt tokens before the timed decode steps (capped by the model's limit)
DECODE_STEPS = 32  # timed decode steps; the median step is reported


def settings_for(point: SweepPoint, inputs: Inputs) -> SparseSettings:
    spec = METHODS[point.method]
    return SparseSettings(
        point.method,
        k=point.k if point.k is not None else 1.0,
        k_mode=point.k_mode or "window",
        dims=point.d.dims if point.d is not None else None,
        basis=inputs.components if spec.uses_basis else None,
        group_select=inputs.group_select and point.method == "loki",
    )


def measure_perplexity(
    model, windows: torch.Tensor, point: SweepPoint, inputs: Inputs, log: Log
) -> ResultRow:
    label = f"{point.method} d={point.d.label if point.d else '-'} k={point.k or '-'} {point.k_mode or ''}"
    result = perplexity(model, windows, settings_for(point, inputs))
    log(f"{label}: ppl {result.ppl:.3f} ({result.seconds:.0f} s)")
    d_mean = point.d.mean if point.d else None
    return ResultRow(
        point.method,
        point.d.value if point.d else None,
        d_mean,
        point.k,
        point.k_mode,
        result.ppl,
        result.nll,
        result.tokens,
        result.predicted_tokens,
        kv_bytes_fraction(point.method, d_mean, point.k, inputs.head_dim),
        result.seconds,
    )


def recall_entry(
    model, windows: torch.Tensor, d: DChoice, k: float, k_mode: str, inputs: Inputs, kind: str
) -> dict:
    """Loki's recall per (layer, query head) at one (d, k), and its link to each head's rank@90."""
    recall = loki_recall(
        model,
        windows,
        SparseSettings("loki", k, k_mode, d.dims, inputs.components, inputs.group_select),
    )
    groups = recall.mass.shape[1] // d.dims.shape[1]
    relative = recall.mass / recall.exact_mass.clamp(min=1e-12)  # Loki's mass / the best possible
    entry = {
        "d": d.value,
        "k": k,
        "k_mode": k_mode,
        "rows": recall.rows,
        "topk_recall": recall.topk.tolist(),
        "mass_recall": recall.mass.tolist(),
        "exact_topk_mass": recall.exact_mass.tolist(),
        "relative_mass_recall": relative.tolist(),
        "per_layer": {
            "topk_recall": recall.topk.mean(1).tolist(),
            "mass_recall": recall.mass.mean(1).tolist(),
            "exact_topk_mass": recall.exact_mass.mean(1).tolist(),
            "relative_mass_recall": relative.mean(1).tolist(),
        },
        "rank_kind": kind,
        "rank_threshold": RECALL_THRESHOLD,
        "rank": None,
        "spearman_rank_vs_topk": None,
        "spearman_rank_vs_mass": None,
        "spearman_rank_vs_relative_mass": None,
    }
    try:
        rank = ranks_at(inputs.ranks, kind, RECALL_THRESHOLD)
    except KeyspaceError:
        return entry
    rank = rank.repeat_interleave(groups, dim=1)  # [L, Hq]
    entry.update(
        rank=rank.tolist(),
        spearman_rank_vs_topk=spearman(rank, recall.topk),
        spearman_rank_vs_mass=spearman(rank, recall.mass),
        spearman_rank_vs_relative_mass=spearman(rank, relative),
    )
    return entry


def cache_factory(inputs: Inputs, d: DChoice, k: float):
    """A fresh LokiCache per call; a layer's split width is the largest d among its KV heads."""
    per_layer = d.dims.max(dim=1).values.tolist()
    return lambda: LokiCache(inputs.components, per_layer, k, group_select=inputs.group_select)


def decode_prompts(windows: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """`count` prompts of `length` tokens, consecutive slices of the evaluation tokens: (count, length)."""
    flat = windows.flatten()
    if count * length > flat.numel():
        raise KeyspaceError(
            f"{count} decode prompts of {length} tokens need {count * length} tokens; the evaluation set has {flat.numel()}.",
            "Raise --max-tokens, or lower --decode-prompts / --decode-prompt-tokens.",
        )
    return flat[: count * length].view(count, length)


def decode_entries(
    model, windows: torch.Tensor, inputs: Inputs, config: ValidateConfig, log: Log
) -> list[dict]:
    """Real decoding with LokiCache vs the dense cache, for every (d, k), on prompts cut from the windows."""
    if config.decode_prompts == 0 or "loki" not in inputs.methods:
        return []
    prompts = decode_prompts(windows, config.decode_prompts, config.decode_prompt_tokens).to(
        config.device
    )
    entries = []
    for d in inputs.ds:
        for k in inputs.ks:
            check = decode_check(model, prompts, config.decode_tokens, cache_factory(inputs, d, k))
            log(f"decode loki d={d.label} k={k:g}: token agreement {check.token_agreement:.3f}")
            entries.append(
                {
                    "method": "loki",
                    "d": d.value,
                    "k": k,
                    "k_mode": "row",
                    "gqa_select": "group" if inputs.group_select else "head",
                    **asdict(check),
                }
            )
    return entries


def passkey_entries(
    model, tokenizer, inputs: Inputs, config: ValidateConfig, log: Log
) -> list[dict]:
    """Passkey accuracy per length for the dense cache and Loki at every (d, k)."""
    variants = {("full", None, None): None}
    if "loki" in inputs.methods:
        variants.update(
            {
                ("loki", d.value, k): cache_factory(inputs, d, k)
                for d in inputs.ds
                for k in inputs.ks
            }
        )
    entries = []
    for length in config.passkey_lengths:
        prompts = passkey_prompts(tokenizer, length, config.passkey_count)
        correct = run_passkey(model, tokenizer, prompts, variants)
        for (method, d, k), hits in correct.items():
            log(f"passkey {method} d={d} k={k} @ {length}: {hits}/{len(prompts)}")
            entries.append(
                {
                    "method": method,
                    "d": d,
                    "k": k,
                    "length": length,
                    "count": len(prompts),
                    "correct": hits,
                    "accuracy": hits / len(prompts),
                }
            )
    return entries


def measured_speed(model, inputs: Inputs, config: ValidateConfig, log: Log) -> list[dict] | None:
    """On CUDA: the kernel benchmark (CUDA-graph replays, same cache for SDPA and Loki) at the model's
    attention shapes, batch 16, for every fixed d and k of the grid. None elsewhere."""
    if not config.device.startswith("cuda"):
        return None
    fixed = fixed_dims(inputs)
    if not fixed:
        return None
    cfg = BenchConfig(
        batch=16,
        q_heads=model.config.num_attention_heads,
        kv_heads=(model.config.num_key_value_heads,),
        head_dim=inputs.head_dim,
        seqs=SPEED_SEQS,
        points=tuple((d, k) for d in fixed for k in inputs.ks),
        dtype="float16",
    )
    return run_sweep(cfg, log=log)["rows"]


def fixed_dims(inputs: Inputs) -> list[int]:
    """The grid's fixed d values: the kernels and caches take one d per layer, auto:τ varies."""
    return sorted({int(d.dims.max()) for d in inputs.ds if not d.label.startswith("auto")})


def decode_seq(model) -> int:
    """DECODE_SEQ, or less when the model's context cannot hold it plus the timed steps."""
    limit = getattr(model.config, "max_position_embeddings", None) or DECODE_SEQ
    return min(DECODE_SEQ, limit - DECODE_STEPS - 1)


def measured_decode(model, inputs: Inputs, config: ValidateConfig, log: Log) -> list[dict] | None:
    """On CUDA: this model's decode tokens/s through the CUDA-graph loop, dense and with Loki at
    every fixed d and k of the grid, on the run's calibrated basis. None elsewhere."""
    if not config.device.startswith("cuda") or "loki" not in inputs.methods:
        return None
    parameter = next(model.parameters())
    basis = inputs.components.to(parameter.device, parameter.dtype)
    seq, rows = decode_seq(model), []
    for d in fixed_dims(inputs):
        for k in inputs.ks:
            speed = decode_speed(
                model, DECODE_BATCH, seq, DECODE_STEPS, d, k, basis, inputs.group_select
            )
            dense, loki = speed["dense"], speed["loki"]
            log(
                f"decode speed d={d} k={k:g}: {loki['tokens_per_s']:.0f} tokens/s vs "
                f"{dense['tokens_per_s']:.0f} dense ({speed['speedup']:.2f}x)"
            )
            rows.append(
                {
                    "d": d,
                    "k": k,
                    "batch": DECODE_BATCH,
                    "seq": seq,
                    "steps": DECODE_STEPS,
                    "gqa_select": "group" if inputs.group_select else "head",
                    "dense_step_ms": dense["step_ms"],
                    "loki_step_ms": loki["step_ms"],
                    "dense_tokens_per_s": dense["tokens_per_s"],
                    "loki_tokens_per_s": loki["tokens_per_s"],
                    "speedup": speed["speedup"],
                }
            )
    return rows
