"""validate's decode-mode stages: real decoding check, passkey, and (on CUDA) kernel timing.

Each takes the loaded model and the checked `keyspace.validate.Inputs`, and returns JSON-ready rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from keyspace.errors import KeyspaceError

if TYPE_CHECKING:
    from keyspace.loki.grid import DChoice
    from keyspace.validate import Inputs, Log, ValidateConfig


def cache_factory(inputs: Inputs, d: DChoice, k: float):
    """A fresh LokiCache per call; a layer's split width is the largest d among its KV heads."""
    from keyspace.loki.cache import LokiCache

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
    from dataclasses import asdict

    from keyspace.loki.decode import decode_check

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
    from keyspace.loki.passkey import passkey_prompts, run_passkey

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


SPEED_SEQS = (4096, 16384)  # the model's own long-context shapes plus a longer cache


def measured_speed(model, inputs: Inputs, config: ValidateConfig, log: Log) -> list[dict] | None:
    """On CUDA: the kernel benchmark (CUDA-graph replays, same cache for SDPA and Loki) at the model's
    attention shapes, batch 16, for every fixed d and k of the grid. None elsewhere."""
    if not config.device.startswith("cuda"):
        return None
    from keyspace.kernels.bench import BenchConfig, run_sweep

    fixed = sorted({int(d.dims.max()) for d in inputs.ds if not d.label.startswith("auto")})
    if not fixed:  # the kernels take one d per cache; auto:τ varies per head
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
