"""validate's stages, one per section of validate.json: perplexity, recall vs rank, real decoding,
passkey, long-context tasks, and (on CUDA) measured speed.

Each takes the loaded model and the checked `Inputs`, and returns JSON-ready rows.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from keyspace.bench.e2e import decode_speed
from keyspace.bench.kernels import BenchConfig, run_sweep
from keyspace.errors import KeyspaceError
from keyspace.loki import Loki, SparseSettings, get_method
from keyspace.loki.core import Budget
from keyspace.models.placement import input_device
from keyspace.runfolder.store import DEFAULT_THRESHOLD
from keyspace.tasks import Decoder, cache_decoder, masked_decoder, run_tasks
from keyspace.validate.config import Log, ValidateConfig
from keyspace.validate.evaluate import decode_check, loki_recall, perplexity
from keyspace.validate.grid import DChoice, Keep, SweepPoint, ranks_at, sweep_points
from keyspace.validate.inputs import Inputs
from keyspace.validate.passkey import passkey_prompts, run_passkey
from keyspace.validate.results import ResultRow, spearman

# Recall is correlated with each head's rank at this explained-variance threshold.
RECALL_THRESHOLD = DEFAULT_THRESHOLD
SPEED_SEQS = (4096, 16384)  # the model's own long-context shapes plus a longer cache
DECODE_BATCH = 16  # sequences per decode step in the end-to-end timing
DECODE_SEQ = 4096  # prompt tokens before the timed decode steps (capped by the model's limit)
DECODE_STEPS = 32  # timed decode steps; the median step is reported
TASK_SEED = 0  # task prompts are a function of (task, length, seed, count, index)
# The methods decoded through a Loki cache, and the `Loki(select=...)` that builds it.
LOKI_SELECT = {"loki": "fixed", "loki-adaptive": "adaptive"}


def settings_for(point: SweepPoint, inputs: Inputs) -> SparseSettings:
    key_transform, query_transform = inputs.transforms(point.basis)
    spec = get_method(point.method)
    return SparseSettings(
        point.method,
        k=point.k if point.k is not None or point.budget is not None else 1.0,
        budget=point.budget,
        k_mode=point.k_mode or "window",
        dims=point.dims,
        basis=key_transform if spec.uses_basis else None,
        group_select=inputs.group_select and spec.uses_group,
        query_basis=query_transform if spec.uses_basis else None,
        key_scale=inputs.key_scale(point.basis) if spec.uses_key_scale else None,
    )


def measure_perplexity(
    model, windows: torch.Tensor, point: SweepPoint, inputs: Inputs, log: Log
) -> ResultRow:
    keep, window = point.keep, windows.shape[1]
    label = f"{point.method} d={point.d.label if point.d else '-'} k={keep.label if keep else '-'}"
    label += f" {point.k_mode or ''}" + (f" ({point.basis} basis)" if point.basis else "")
    result = perplexity(model, windows, settings_for(point, inputs))
    log(f"{label}: ppl {result.ppl:.3f} ({result.seconds:.0f} s)")
    d_mean = float(point.dims.float().mean()) if point.d else None
    spec = get_method(point.method)
    # tokens a window's last row keeps, and the share of it: a token budget's k at that context
    kept = Budget(keep.k, keep.budget).kept(window) if keep and spec.uses_k else None
    share = point.k if point.budget is None else kept / window
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
        spec.kv_bytes_fraction(inputs.head_dim, d_mean, share),
        result.seconds,
        point.basis,
        point.budget,
        kept,
    )


def recall_entry(
    model,
    windows: torch.Tensor,
    d: DChoice,
    keep: Keep,
    k_mode: str,
    inputs: Inputs,
    kind: str,
    basis: str = "key",
) -> dict:
    """Loki's recall per (layer, query head) at one (d, k or token budget) in `basis`, and its link
    to each head's rank@90: of the key spectrum, and of the score spectrum when the run's ranks
    have it."""
    point = SweepPoint("loki", d, keep.k, k_mode, basis, keep.budget)
    recall = loki_recall(model, windows, settings_for(point, inputs))
    groups = recall.mass.shape[1] // d.dims.shape[1]
    relative = recall.mass / recall.exact_mass.clamp(min=1e-12)  # Loki's mass / the best possible
    entry = {
        "d": d.value,
        **keep.fields(),
        "k_mode": k_mode,
        "basis": basis,
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
    }
    measures = {"topk": recall.topk, "mass": recall.mass, "relative_mass": relative}
    for prefix, field in (("", "rank_at"), ("score_", "score_rank_at")):
        entry[f"{prefix}rank"] = None
        entry.update({f"spearman_{prefix}rank_vs_{name}": None for name in measures})
        try:
            rank = ranks_at(inputs.ranks, kind, RECALL_THRESHOLD, field)
        except KeyspaceError:
            continue
        rank = rank.repeat_interleave(groups, dim=1)  # [L, Hq]
        entry[f"{prefix}rank"] = rank.tolist()
        for name, values in measures.items():
            entry[f"spearman_{prefix}rank_vs_{name}"] = spearman(rank, values)
    return entry


def cache_factory(
    inputs: Inputs, d: DChoice, keep: Keep | float, basis: str = "key", method: str = "loki"
):
    """A fresh LokiCache per call, from this point's `Loki` (a layer splits at its largest d):
    loki's fixed d, or loki-adaptive's per-step choice of r = d coordinates with σ from the
    calibration (`Loki(select="adaptive")`); at a fraction k or a token budget per step."""
    keep = keep if isinstance(keep, Keep) else Keep(k=keep)
    key_transform, query_transform = inputs.transforms(basis)
    select = LOKI_SELECT[method]
    loki = Loki.from_tensors(
        key_transform,
        d.dims_for(basis),
        keep.k,
        query_transform,
        inputs.group_select,
        budget=keep.budget,
        select=select,
        key_scale=inputs.key_scale(basis) if select == "adaptive" else None,
    )
    return loki.cache


def cache_methods(inputs: Inputs) -> list[str]:
    """The requested methods that decode through a Loki cache (loki, loki-adaptive), in order."""
    return [m for m in inputs.methods if m in LOKI_SELECT]


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
    """Real decoding with a Loki cache vs the dense cache, for every Loki method and (basis, d, k),
    on prompts cut from the windows."""
    if config.decode_prompts == 0 or not cache_methods(inputs):
        return []
    prompts = decode_prompts(windows, config.decode_prompts, config.decode_prompt_tokens).to(
        input_device(model)
    )
    entries = []
    grid = [
        (m, b, d, keep)
        for m in cache_methods(inputs)
        for b in inputs.bases
        for d in inputs.ds
        for keep in inputs.keeps
    ]
    for method, basis, d, keep in grid:
        make_cache = cache_factory(inputs, d, keep, basis, method)
        check = decode_check(model, prompts, config.decode_tokens, make_cache)
        log(
            f"decode {method} d={d.label} k={keep.label} ({basis} basis): token agreement {check.token_agreement:.3f}"
        )
        entries.append(
            {
                "method": method,
                "d": d.value,
                **keep.fields(),
                "k_mode": "row",
                "basis": basis,
                "gqa_select": "group" if inputs.group_select else "head",
                **asdict(check),
            }
        )
    return entries


def passkey_entries(
    model, tokenizer, inputs: Inputs, config: ValidateConfig, log: Log
) -> list[dict]:
    """Passkey accuracy per length for the dense cache and Loki at every (d, k or token budget)."""
    variants = {("full", None, Keep(k=1.0), None): None}
    variants.update(
        {
            (method, d.value, keep, basis): cache_factory(inputs, d, keep, basis, method)
            for method in cache_methods(inputs)
            for basis in inputs.bases
            for d in inputs.ds
            for keep in inputs.keeps
        }
    )
    entries = []
    for length in config.passkey_lengths:
        prompts = passkey_prompts(tokenizer, length, config.passkey_count)
        correct = run_passkey(model, tokenizer, prompts, variants)
        for (method, d, keep, basis), hits in correct.items():
            dense = method == "full"
            k_label = "-" if dense else keep.label
            log(f"passkey {method} d={d} k={k_label} @ {length}: {hits}/{len(prompts)}")
            entries.append(
                {
                    "method": method,
                    "d": d,
                    **({"k": None, "k_budget": None} if dense else keep.fields()),
                    "basis": basis,
                    "length": length,
                    "count": len(prompts),
                    "correct": hits,
                    "accuracy": hits / len(prompts),
                }
            )
    return entries


def task_variants(inputs: Inputs, log: Log = lambda _: None) -> dict[tuple, Decoder]:
    """(method, d, k, basis, k_budget) -> decoder: `full` through the dense cache, loki and
    loki-adaptive at every (basis, d, k or budget) through their Loki cache, every other requested
    method in masked mode at its decode budget ceil(k·context) or min(budget, context) (H2O
    through its heavy-hitter steps, at either)."""
    variants = {("full", None, None, None, None): cache_decoder()}
    points = sweep_points(
        inputs.methods, inputs.ds, inputs.ks, ["row"], inputs.bases, inputs.budgets
    )
    for point in points:
        key = (point.method, point.d.value if point.d else None, point.k, point.basis, point.budget)
        path = get_method(point.method).decode
        if path == "cache":
            factory = cache_factory(inputs, point.d, point.keep, point.basis, point.method)
            variants[key] = cache_decoder(factory)
        elif path != "dense":
            variants[key] = masked_decoder(settings_for(point, inputs))
    return variants


def task_entries(model, tokenizer, inputs: Inputs, config: ValidateConfig, log: Log) -> list[dict]:
    """Long-context task accuracy, one row per (method, d, k, task, length); [] without --tasks."""
    if not inputs.tasks:
        return []
    try:
        return _run_tasks(model, tokenizer, inputs, config, log)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        # torch raises OutOfMemoryError on a GPU and a RuntimeError from its CPU allocator.
        where = "GPU" if isinstance(err, torch.OutOfMemoryError) else "CPU"
        if where == "CPU" and "can't allocate memory" not in str(err):
            raise
        batch = config.task_batch
        raise KeyspaceError(
            f"out of {where} memory decoding {batch} task prompts of up to "
            f"{max(config.task_lengths)} tokens at once.",
            f"Lower --task-batch (try --task-batch {max(1, batch // 4)}) or --task-lengths.",
        ) from err


def _run_tasks(model, tokenizer, inputs: Inputs, config: ValidateConfig, log: Log) -> list[dict]:
    """Task rows with each variant's token budget as `k_budget`. run_tasks writes a row per
    variant per (task, length) cell, in the variants' order, and reads (method, d, k, basis) of
    each key: the fifth element, the budget, keeps the keys distinct and is added here."""
    variants = task_variants(inputs, log)
    rows = run_tasks(
        model,
        tokenizer,
        variants,
        inputs.tasks,
        config.task_lengths,
        config.task_count,
        TASK_SEED,
        config.task_haystack,
        log,
        config.task_batch,
    )
    keys = list(variants)
    for i, row in enumerate(rows):
        method, d, k, basis, budget = keys[i % len(keys)]
        if (row["method"], row["d"], row["k"], row.get("basis")) != (method, d, k, basis):
            raise RuntimeError(f"task row {i} is not variant {keys[i % len(keys)]}")
        row["k_budget"] = budget
    return rows


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
        budgets=tuple((d, b) for d in fixed for b in inputs.budgets),
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
        for keep in inputs.keeps:
            speed = decode_speed(
                model, DECODE_BATCH, seq, DECODE_STEPS, d, keep.k, basis, inputs.group_select,
                budget=keep.budget,
            )  # fmt: skip
            dense, loki = speed["dense"], speed["loki"]
            log(
                f"decode speed d={d} k={keep.label}: {loki['tokens_per_s']:.0f} tokens/s vs "
                f"{dense['tokens_per_s']:.0f} dense ({speed['speedup']:.2f}x)"
            )
            rows.append(
                {
                    "d": d,
                    **keep.fields(),
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
