"""`keyspace bench`: time the Loki decode kernels against dense SDPA on this machine's GPU."""

from __future__ import annotations

from pathlib import Path

import typer

from keyspace.cli.common import handle_errors, print_json, stderr
from keyspace.errors import KeyspaceError
from keyspace.options import parse_int


@handle_errors
def command(
    model: str = typer.Option(None, help="Alias, local folder or hub id: take its head shapes."),
    batch: list[int] = typer.Option(
        None, help="Sequences per decode step (default 16); with --e2e repeat: --batch 1 --batch 4."
    ),
    heads: int = typer.Option(None, help="Query heads (default 32, or the model's)."),
    kv_heads: list[int] = typer.Option(None, help="KV heads; repeat for several (default 32, 8)."),
    head_dim: int = typer.Option(None, help="Head dimension (default 128, or the model's)."),
    seq: list[int] = typer.Option(None, help="Cache lengths; repeat (default 4096 16384 32768)."),
    d: list[int] = typer.Option(None, help="Low-rank dims; with --k, every (d, k) pair."),
    k: list[float] = typer.Option(None, help="Kept fraction in (0, 1]; with --d."),
    budget: list[int] = typer.Option(None, help="Tokens kept per step; with --d, beside --k."),
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
    layers: int = typer.Option(None, help="With --e2e: keep the first N decoder layers."),
    steps: int = typer.Option(64, help="With --e2e: timed decode steps per row."),
) -> None:
    """Time one Loki decode step (scores, top-k, sparse attention) against dense SDPA; with --e2e,
    whole decode steps of a model (CUDA-graph loop, dense vs Loki, and transformers' generate)."""
    batch = [parse_int(v, "--batch", 1, 1 << 16) for v in batch or [16]]
    steps = parse_int(steps, "--steps", 1, 1 << 20)
    heads, head_dim, layers = (
        None if value is None else parse_int(value, flag, 1, 1 << 16)
        for value, flag in ((heads, "--heads"), (head_dim, "--head-dim"), (layers, "--layers"))
    )  # 0 is an error, never "the default"
    kv_heads = [parse_int(v, "--kv-heads", 1, 1 << 16) for v in kv_heads or []]
    seq = [parse_int(v, "--seq", 1, 1 << 24) for v in seq or []]
    d = [parse_int(v, "--d", 1, 1 << 16) for v in d or []]
    budget = [parse_int(v, "--budget", 1, 1 << 24) for v in budget or []]
    if out is not None:  # before any work: a sweep is minutes of GPU time
        from keyspace.runfolder.store import check_writable

        check_writable(out)
    if e2e:
        if budget:
            raise KeyspaceError(
                "--budget is not yet taken with --e2e.", "Give --k fractions with --e2e."
            )
        return _e2e(model, config, layers, batch, seq, d, k, steps, dtype, check, out, json_output)
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


def _e2e(model, config, layers, batch, seq, d, k, steps, dtype, check, out, json_output) -> None:
    """`keyspace bench --e2e`: build the sweep's config and run it (keyspace.bench.e2e)."""
    if bool(d) != bool(k):
        raise KeyspaceError("--d and --k go together.", "Give both, e.g. --d 32 --k 0.125.")
    from keyspace.bench.e2e import E2EConfig

    try:
        cfg = E2EConfig(
            config=None if model else (config or "llama3-8b"),
            model=model,
            layers=layers,
            batches=tuple(batch),
            seqs=tuple(seq) if seq else E2EConfig.seqs,
            steps=steps,
            points=tuple((dd, kk) for dd in d for kk in k) if d else E2EConfig.points,
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
