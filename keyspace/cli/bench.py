"""`keyspace bench`: time the Loki decode kernels against dense SDPA on this machine's GPU."""

from __future__ import annotations

from pathlib import Path

import typer

from keyspace.cli.common import handle_errors, print_json, stderr
from keyspace.errors import KeyspaceError
from keyspace.options import parse_fraction_list, parse_int, parse_int_list


def _ints(values: list[str] | None, flag: str, high: int) -> list[int]:
    """A repeated option's values, each a number or a comma list (--seq 4096,16384 or --seq 4096
    --seq 16384), every part checked by `parse_int`: ASCII digits only, in [1, high]."""
    return [n for v in values or [] for n in parse_int_list(v, flag, 1, high)]


@handle_errors
def command(
    model: str = typer.Option(None, help="Alias, local folder or hub id: take its head shapes."),
    batch: list[str] = typer.Option(
        None,
        help="Sequences per decode step (default 16); with --e2e several: --batch 1,4.",
        metavar="INTEGER",
    ),
    heads: str = typer.Option(
        None, help="Query heads (default 32, or the model's).", metavar="INTEGER"
    ),
    kv_heads: list[str] = typer.Option(
        None, help="KV heads; several: 32,8 (default 32, 8).", metavar="INTEGER"
    ),
    head_dim: str = typer.Option(
        None, help="Head dimension (default 128, or the model's).", metavar="INTEGER"
    ),
    seq: list[str] = typer.Option(
        None,
        help="Cache lengths: 4096,16384 or repeat (default 4096 16384 32768).",
        metavar="INTEGER",
    ),  # fmt: skip
    d: list[str] = typer.Option(
        None, help="Low-rank dims; with --k, every (d, k) pair.", metavar="INTEGER"
    ),
    k: list[str] = typer.Option(
        None, help="Kept fraction in (0, 1]: 0.125 or 0.125,0.25; with --d.", metavar="FLOAT"
    ),
    budget: list[str] = typer.Option(
        None,
        help="Tokens kept per step, min(budget, S): 2048 or 512,2048; with --d, beside --k"
        " (kernels and --e2e).",
        metavar="INTEGER",
    ),
    adaptive: bool = typer.Option(True, help="Also time adaptive Loki at r = d beside each d."),
    dtype: str = typer.Option("float16", help="float16, bfloat16 or float32."),
    per_head: bool = typer.Option(True, help="Under GQA also time per-query-head selection."),
    check: bool = typer.Option(True, help="Check the kernels against the fp32 oracle first."),
    out: Path = typer.Option(None, help="Folder for bench_decode.json and bench_decode.md."),
    json_output: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
    e2e: bool = typer.Option(
        False, "--e2e", help="Time whole decode steps of a model instead: dense vs Loki, tokens/s."
    ),
    config: str = typer.Option(
        None, help="With --e2e: random-init shape llama3-8b, llama2-7b or smollm2-135m."
    ),
    layers: str = typer.Option(
        None, help="With --e2e: keep the first N decoder layers.", metavar="INTEGER"
    ),
    steps: str = typer.Option(
        "64", help="With --e2e: timed decode steps per row.", metavar="INTEGER"
    ),
) -> None:
    """Time one Loki decode step (scores, top-k, sparse attention) against dense SDPA; with --e2e,
    whole decode steps of a model (CUDA-graph loop, dense vs Loki, and transformers' generate)."""
    batch = _ints(batch or ["16"], "--batch", 1 << 16)
    steps = parse_int(steps, "--steps", 1, 1 << 20)
    heads, head_dim, layers = (
        None if value is None else parse_int(value, flag, 1, 1 << 16)
        for value, flag in ((heads, "--heads"), (head_dim, "--head-dim"), (layers, "--layers"))
    )  # 0 is an error, never "the default"
    kv_heads = _ints(kv_heads, "--kv-heads", 1 << 16)
    seq = _ints(seq, "--seq", 1 << 24)
    d = _ints(d, "--d", 1 << 16)
    budget = sorted(set(_ints(budget, "--budget", 1 << 24)))
    k = parse_fraction_list(k, "--k")
    if out is not None:  # before any work: a sweep is minutes of GPU time
        from keyspace.runfolder.store import check_writable

        check_writable(out)
    if e2e:
        return _e2e(
            model, config, layers, batch, seq, d, k, budget, steps, dtype, check, out, json_output
        )
    if len(batch) > 1:
        raise KeyspaceError(
            "the kernel bench takes one --batch.", "Repeat --batch with --e2e only."
        )
    batch = batch[0]
    if bool(d) != bool(k or budget):
        raise KeyspaceError(
            "--d and --k (or --budget) go together.", "Give both, e.g. --d 32 --k 0.125."
        )
    from keyspace.bench.kernels import BenchConfig, default_points, model_geometry

    model_heads, model_kv, model_dim = model_geometry(model) if model else (32, None, 128)
    dim = head_dim or model_dim
    try:
        config = BenchConfig(
            batch=batch,
            q_heads=heads or model_heads,
            kv_heads=tuple(kv_heads) if kv_heads else ((model_kv,) if model else (32, 8)),
            head_dim=dim,
            seqs=tuple(seq) if seq else BenchConfig.seqs,
            points=tuple((dd, kk) for dd in d for kk in k or ()) if d else default_points(dim),
            budgets=tuple((dd, bb) for dd in d for bb in budget or ()) if d else (),
            adaptive=adaptive,
            dtype=dtype,
            per_head_under_gqa=per_head,
        )
    except ValueError as err:
        raise KeyspaceError(f"{str(err).rstrip('.')}.", "See `keyspace bench --help`.") from None

    _require_cuda("keyspace bench", "the kernels'")
    from keyspace.bench.kernel_checks import check_correctness
    from keyspace.bench.kernels import markdown_table, run_sweep, save_result

    if check:
        for row in check_correctness((dtype,)):
            stderr.print(f"check {row['dtype']} {row['case']}: rel err {row['rel_err']:.1e}")
    result = run_sweep(config, log=stderr.print)
    if out:
        save_result(result, out)
    if json_output:
        print_json(result)
    else:
        print(markdown_table(result["rows"]))


def _require_cuda(command: str, tests: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise KeyspaceError(
            f"{command} needs a CUDA GPU, and torch sees none on this machine.",
            f"Run it on a machine with an NVIDIA GPU; {tests} CPU tests run with `make test`.",
        )


def _e2e(
    model, config, layers, batch, seq, d, k, budget, steps, dtype, check, out, json_output
) -> None:
    """`keyspace bench --e2e`: build the sweep's config and run it (keyspace.bench.e2e)."""
    if bool(d) != bool(k or budget):
        raise KeyspaceError(
            "--d and --k (or --budget) go together.",
            "Give both, e.g. --d 32 --k 0.125 or --d 32 --budget 2048.",
        )
    from keyspace.bench.e2e import E2EConfig

    try:
        cfg = E2EConfig(
            config=None if model else (config or "llama3-8b"),
            model=model,
            layers=layers,
            batches=tuple(batch),
            seqs=tuple(seq) if seq else E2EConfig.seqs,
            steps=steps,
            points=tuple((dd, kk) for dd in d for kk in k or ()) if d else E2EConfig.points,
            budgets=tuple((dd, bb) for dd in d for bb in budget),
            dtype=dtype,
            check=check,
        )
    except ValueError as err:
        raise KeyspaceError(f"{str(err).rstrip('.')}.", "See `keyspace bench --help`.") from None

    _require_cuda("keyspace bench --e2e", "the decode loop's")
    from keyspace.bench.e2e import markdown_table, run_e2e, save_result

    save = (lambda result: save_result(result, out)) if out else None
    result = run_e2e(cfg, log=stderr.print, save=save)
    for row in result["checks"]:
        stderr.print(f"check {row['check']}: {row['value']:.3f}")
    if json_output:
        print_json(result)
    else:
        print(markdown_table(result["rows"]))
